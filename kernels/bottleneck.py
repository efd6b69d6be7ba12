"""Fused bottleneck residual with the VL-PET granularity-controlled gates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import use_triton
from kernels.segments import SegmentMeta
from kernels.stacks import (GATE_LARGE, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_NONE, GATE_SMALL,
                            BottleneckStack)


def act(z: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation ("gelu_new" in the papers' code)."""
    return F.gelu(z, approximate="tanh")


def bottleneck_residual(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack,
                        seg: SegmentMeta) -> torch.Tensor:
    """Return the sublayer output with each token's bottleneck module applied.

    Semantics (s = seg.token_slots[t], r = w.ranks[s]; tokens with s == -1 or r == 0 keep h[t])::

        src   = x[t] if w.from_input[s] else h[t]                  # parallel / sequential
        hp    = h[t] + w.U[s, :, :r] @ act(w.D[s, :r] @ src + w.bd[s, :r]) + w.bu[s]
        G     = 1                                          # GATE_NONE
              | mean_{t' in row(t), valid} sigmoid(w.gate_w[s] . [x[t'] ; hp[t']] + w.gate_b[s])
                                                           # GATE_SMALL: one scalar per example
              | sigmoid(w.gate_w[s, :d] . (x[t] + hp) + w.gate_b[s])   # GATE_MIDDLE_X: per token
              | 1 + w.gate_vec[s]                          # GATE_MIDDLE_Y: per channel
              | sigmoid(w.gate_U[s] @ act(w.gate_D[s] @ x[t] + w.gate_bd[s]) + w.gate_bu[s])
                                                           # GATE_LARGE: per token and channel
        out[t] = w.out_scale[s] * G * hp

    h, x: (N, d); returns a new (N, d) tensor (``h`` itself when no token has a slot: callers never
    write into the result). GATE_SMALL averages over the valid tokens of a row
    (seg.token_rows / seg.token_valid), so padding never changes a row's result.
    """
    if not seg.slots:
        return h
    if use_triton(h, h, x, w.D, w.U, w.bd, w.bu, w.gate_w, w.gate_vec, w.gate_D, w.gate_U):
        from kernels.triton_bottleneck import bottleneck_residual_triton
        return bottleneck_residual_triton(h, x, w, seg)
    return bottleneck_residual_reference(h, x, w, seg)


def bottleneck_residual_reference(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack,
                                  seg: SegmentMeta) -> torch.Tensor:
    """Torch reference of :func:`bottleneck_residual`: one small chain of GEMMs per slot."""
    out = h.clone()
    for s, idx in seg.segments():
        r = w.ranks_host[s]
        if r == 0:
            continue
        hs, xs = h.index_select(0, idx), x.index_select(0, idx)
        src = xs if w.from_input_host[s] else hs
        hp = hs + act(src @ w.D[s, :r].T + w.bd[s, :r]) @ w.U[s, :, :r].T + w.bu[s]
        gate = _gate(w, s, xs, hp, seg, idx)
        res = hp if gate is None else gate * hp
        out.index_copy_(0, idx, res * w.out_scale[s].to(res.dtype))
    return out


def _gate(w: BottleneckStack, s: int, xs: torch.Tensor, hp: torch.Tensor, seg: SegmentMeta,
          idx: torch.Tensor) -> torch.Tensor | None:
    kind = w.gate_host[s]
    d = hp.shape[1]
    if kind == GATE_NONE:
        return None
    if kind == GATE_MIDDLE_Y:
        return 1.0 + w.gate_vec[s]
    if kind == GATE_MIDDLE_X:
        return torch.sigmoid((xs + hp) @ w.gate_w[s, :d] + w.gate_b[s]).unsqueeze(1)
    if kind == GATE_LARGE:
        rg = w.gate_ranks_host[s]
        z = act(xs @ w.gate_D[s, :rg].T + w.gate_bd[s, :rg])
        return torch.sigmoid(z @ w.gate_U[s, :, :rg].T + w.gate_bu[s])
    if kind == GATE_SMALL:
        g = torch.sigmoid(xs @ w.gate_w[s, :d] + hp @ w.gate_w[s, d:] + w.gate_b[s])
        return _row_mean(g, seg, idx).unsqueeze(1)
    raise ValueError(f"unknown gate kind {kind} in slot {s}")


def _row_mean(g: torch.Tensor, seg: SegmentMeta, idx: torch.Tensor) -> torch.Tensor:
    """Average a per-token value over the valid tokens of each token's row; broadcast back."""
    if seg.token_rows is None:
        return g.mean().expand_as(g)
    rows = seg.token_rows.index_select(0, idx)
    valid = (torch.ones_like(g) if seg.token_valid is None
             else seg.token_valid.index_select(0, idx).to(g.dtype))
    total = g.new_zeros(seg.num_rows).index_add(0, rows, g * valid)
    count = g.new_zeros(seg.num_rows).index_add(0, rows, valid).clamp_min(1.0)
    return (total / count).index_select(0, rows)
