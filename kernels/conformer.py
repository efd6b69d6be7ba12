"""The conformer convolution block of PETL for AST, per slot, over whole rows of tokens.

Unlike the other forms it mixes neighbouring tokens (a depthwise convolution along the sequence),
so it works on (B, T, d) rows rather than on a flat list of tokens: every row whose slot has a
block at this site gets its slot's weights gathered, and the whole group runs as batched matmuls
and one grouped convolution (no Python loop over slots).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from petserve.kernels.stacks import ConformerStack


def conformer_residual(h: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None,
                       w: ConformerStack, row_slots: list[int]) -> torch.Tensor:
    """Return ``h`` with each row's conformer block added. h, x: (B, T, d); valid: (B, T) bool
    (None: every token); row_slots: the slot of each row (-1 = none).

    Semantics, for a row of slot s (r = w.ranks_host[s]; rows with s == -1 or r == 0 keep h)::

        src = x if w.from_input_host[s] else h                      # parallel / sequential
        a   = src @ W1[s].T + b1[s]                                 # (T, 2r)
        g   = a[:, :r] * sigmoid(a[:, r:]) * valid                  # GLU; padding is zero
        z   = depthwise_conv(g, dw[s], "same" padding) + bdw[s]     # along T, per channel
        z   = (z - mean) / sqrt(var + eps) * bn_weight[s] + bn_bias[s]   # running statistics
        out = h + silu(z) @ W2[s].T + b2[s]

    Padding at the end of a row is zeroed before the convolution, so a row padded in a batch gets
    exactly what it gets alone. Returns a new tensor.
    """
    rows = [i for i, s in enumerate(row_slots) if s >= 0 and w.ranks_host[s] > 0]
    if not rows:
        return h
    idx = torch.tensor(rows, device=h.device)
    slots = torch.tensor([row_slots[i] for i in rows], device=h.device)
    from_input = torch.tensor([w.from_input_host[row_slots[i]] for i in rows], device=h.device)
    hs, xs = h.index_select(0, idx), x.index_select(0, idx)
    src = torch.where(from_input.view(-1, 1, 1), xs, hs)
    n, T, _ = src.shape
    R, K = w.dw.shape[1], w.dw.shape[2]
    a = torch.baddbmm(w.b1[slots].unsqueeze(1), src, w.W1[slots].transpose(1, 2))    # (n, T, 2R)
    g = a[..., :R] * torch.sigmoid(a[..., R:])
    mask = None if valid is None else valid.index_select(0, idx).unsqueeze(-1).to(g.dtype)
    if mask is not None:
        g = g * mask
    z = F.conv1d(g.transpose(1, 2).reshape(1, n * R, T), w.dw[slots].reshape(n * R, 1, K),
                 w.bdw[slots].reshape(n * R), padding=K // 2, groups=n * R).view(n, R, T)
    z = z.transpose(1, 2)                                                                # (n, T, R)
    mean, var = _statistics(z, mask, w, slots)
    eps = torch.tensor([w.bn_eps[row_slots[i]] for i in rows], device=h.device, dtype=z.dtype)
    z = (z - mean) * torch.rsqrt(var + eps.view(-1, 1, 1)) * w.bn_weight[slots].unsqueeze(1) \
        + w.bn_bias[slots].unsqueeze(1)
    out = torch.baddbmm(w.b2[slots].unsqueeze(1), F.silu(z), w.W2[slots].transpose(1, 2))
    return h.index_copy(0, idx, hs + out)


def _statistics(z: torch.Tensor, mask: torch.Tensor | None, w: ConformerStack,
                slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, var), each (n, 1, R): the stored running statistics, or in training (batch_stats,
    one slot) the batch's over its valid tokens, which also update the running ones."""
    if not w.batch_stats:
        return w.bn_mean[slots].unsqueeze(1), w.bn_var[slots].unsqueeze(1)
    if len(set(slots.tolist())) != 1:
        raise ValueError("batch statistics are for training one adapter at a time")
    m = torch.ones_like(z[..., :1]) if mask is None else mask
    count = m.sum()
    mean = (z * m).sum((0, 1)) / count
    var = (((z - mean) ** 2) * m).sum((0, 1)) / count
    with torch.no_grad():
        s = int(slots[0])
        mom = w.bn_momentum
        w.bn_mean[s].mul_(1 - mom).add_(mom * mean.detach())
        w.bn_var[s].mul_(1 - mom).add_(mom * var.detach() * count / (count - 1).clamp_min(1))
    return mean.view(1, 1, -1), var.view(1, 1, -1)


def conformer_reference(h: torch.Tensor, x: torch.Tensor, valid: torch.Tensor | None,
                        w: ConformerStack, row_slots: list[int]) -> torch.Tensor:
    """Torch reference of :func:`conformer_residual` with the modules the block is made of
    (Conv1d, GLU, BatchNorm1d in eval mode, SiLU), one row at a time on its valid tokens."""
    out = h.clone()
    for i, s in enumerate(row_slots):
        r = w.ranks_host[s] if s >= 0 else 0
        if r == 0:
            continue
        T = int(valid[i].sum()) if valid is not None else h.shape[1]
        src = (x if w.from_input_host[s] else h)[i, :T].T.unsqueeze(0)                  # (1, d, T)
        R = w.dw.shape[1]
        k = w.kernel_host[s]
        lo = (w.dw.shape[2] - k) // 2
        pw1 = torch.nn.Conv1d(src.shape[1], 2 * r, 1).to(h)
        pw1.weight.data = torch.cat([w.W1[s, :r], w.W1[s, R:R + r]]).unsqueeze(-1)
        pw1.bias.data = torch.cat([w.b1[s, :r], w.b1[s, R:R + r]])
        dw = torch.nn.Conv1d(r, r, k, padding="same", groups=r).to(h)
        dw.weight.data, dw.bias.data = w.dw[s, :r, lo:lo + k].unsqueeze(1), w.bdw[s, :r]
        bn = torch.nn.BatchNorm1d(r, eps=w.bn_eps[s]).to(h).eval()
        bn.weight.data, bn.bias.data = w.bn_weight[s, :r], w.bn_bias[s, :r]
        bn.running_mean.data, bn.running_var.data = w.bn_mean[s, :r], w.bn_var[s, :r]
        pw2 = torch.nn.Conv1d(r, h.shape[2], 1).to(h)
        pw2.weight.data, pw2.bias.data = w.W2[s, :, :r].unsqueeze(-1), w.b2[s]
        y = pw2(F.silu(bn(dw(F.glu(pw1(src), dim=1)))))
        out[i, :T] = h[i, :T] + y[0].T
    return out

