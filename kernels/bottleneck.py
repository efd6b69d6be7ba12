"""Fused bottleneck residual with the VL-PET granularity-controlled gates."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from petserve.kernels.dispatch import records_grad, use_triton
from petserve.kernels.lowrank import GATHER_CACHE_ELEMENTS, GATHER_MIN_SEGMENTS, gather_pays
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import (
    GATE_LARGE,
    GATE_MIDDLE_X,
    GATE_MIDDLE_Y,
    GATE_NONE,
    GATE_SMALL,
    BottleneckStack,
)

# CPU heuristic (see prefers_gathered), measured like kernels.lowrank's (one thread, shared 2-core
# AMD EPYC, d 64-768, ranks 8-96, 8-24 slots, 32 decode tokens): the per-slot reference costs
# ~70-150 us per slot present, the gathered path ~0.5 ns per weight element per token; they
# break even at ~150K elements per slot present. 96K keeps a margin.
GATHER_ELEMENTS_PER_SEGMENT = 96 * 1024


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

    CUDA tensors take the Triton kernels unless autograd records the op (training). Elsewhere:
    :func:`bottleneck_residual_gathered` for decode-shaped steps (many slots, few tokens each),
    else the per-slot :func:`bottleneck_residual_reference`; the same choice as ``add_lowrank``'s.
    """
    if not seg.slots:
        return h
    weights = (w.D, w.U, w.bd, w.bu, w.gate_w, w.gate_vec, w.gate_D, w.gate_U)
    if use_triton(h, h, x, *weights):
        from petserve.kernels.triton_bottleneck import bottleneck_residual_triton
        return bottleneck_residual_triton(h, x, w, seg)
    if prefers_gathered(seg, w) and not records_grad(h, x, *weights):
        return bottleneck_residual_gathered(h, x, w, seg)
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


def _row_mean(g: torch.Tensor, seg: SegmentMeta, idx: torch.Tensor | None) -> torch.Tensor:
    """Average a per-token value over the valid tokens of each token's row; broadcast back.
    ``g`` holds the tokens ``idx`` (None: every token); needs ``seg.token_rows``, or averages
    over all of ``g``."""
    if seg.token_rows is None:
        return g.mean().expand_as(g)
    valid = None if seg.token_valid is None else _take(seg.token_valid, idx)
    return _group_mean(g, _take(seg.token_rows, idx), valid, seg.num_rows)


def _take(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The rows ``idx`` of ``t`` (None: all of them, no copy)."""
    return t if idx is None else t.index_select(0, idx)


def _group_mean(g: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None,
                size: int) -> torch.Tensor:
    """Mean of ``g`` over the (valid) tokens of each token's group (ids < size); broadcast back."""
    weight = torch.ones_like(g) if valid is None else valid.to(g.dtype)
    total = g.new_zeros(size).index_add(0, group, g * weight)
    count = g.new_zeros(size).index_add(0, group, weight).clamp_min(1.0)
    return (total / count).index_select(0, group)


# ---- CPU decode path -----------------------------------------------------------------------
def prefers_gathered(seg: SegmentMeta, w: BottleneckStack) -> bool:
    """Whether :func:`bottleneck_residual_gathered` beats the per-slot reference on the CPU: the
    LoRA path's rule (``kernels.lowrank.gather_pays``) on the weights copied per row of a (B, T)
    block, else per token (down and up projections, bias, gate)."""
    if len(seg.slots) < GATHER_MIN_SEGMENTS:
        return False
    most = max(map(slot_configs(w)[1].__getitem__, seg.slots))
    copies = sum(seg.counts) // (seg.tokens_per_row if seg.per_row is not None else 1)
    return gather_pays(seg, copies, most, GATHER_ELEMENTS_PER_SEGMENT)


def bottleneck_slot_written(w: BottleneckStack, slot: int) -> None:
    """``slot``'s weights or settings were just written: values derived from ``w`` are rebuilt."""
    w.cache.clear()


def slot_configs(w: BottleneckStack) -> tuple[list, list[int]]:
    """Per slot: its configuration (rank, source, gate kind, gate rank), None at rank 0, and the
    elements a per-token copy of its weights holds. Derived once per change of the stack
    (:func:`bottleneck_slot_written`), so a step looks them up without a Python loop."""
    got = w.cache.get("configs")
    if got is None:
        d, d_src = w.U.shape[1], w.D.shape[2]
        keys, sizes = [], []
        for s, r in enumerate(w.ranks_host):
            rg = _gate_rank(w, s)
            keys.append((r, bool(w.from_input_host[s]), w.gate_host[s], rg) if r else None)
            sizes.append(r * (d_src + d + 1) + (0 if w.gate_host[s] == GATE_NONE else 3 * d)
                         + rg * (2 * d + 1) + 2 * d)
        got = w.cache["configs"] = (keys, sizes)
    return got


def bottleneck_residual_gathered(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack,
                                 seg: SegmentMeta) -> torch.Tensor:
    """:func:`bottleneck_residual` as batched matmuls per group of slots that share one
    configuration (rank r, source, gate kind, gate rank)::

        idx = rows of the group;  s = slot of each                               # (n,)
        z   = act(bmm(src[idx], D[s, :r].mT) + bd[s, None, :r])                  # (n, T, r)
        hp  = h[idx] + bmm(z, U[s, :, :r].mT) + bu[s, None]                      # (n, T, d)
        out[idx] = out_scale[s] * G * hp      # G per gate kind, with per-row weights

    with the tokens as (rows, T, d) when they are a (B, T) block (a prefill: a row's tokens
    share its slot), else each token a row of T = 1. Each row gets its own copy of its slot's
    weights, so this pays off only when slots hold few rows each (:func:`prefers_gathered`);
    the copies are kept on ``seg`` like LoRA's (``kernels.lowrank.gathered_weights``). Returns
    a new tensor, as the reference does.
    """
    units = seg.per_row or seg
    T = seg.tokens_per_row if units is not seg else 1
    h3, x3 = h.view(-1, T, h.shape[1]), x.view(-1, T, x.shape[1])
    valid = None if units is seg or seg.token_valid is None else seg.token_valid.view(-1, T)
    out = h3.clone()
    for (_r, from_input, gate, _), idx, slots, g in gathered_bottleneck(w, units):
        hs, xs = _take(h3, idx), _take(x3, idx)
        src = xs if from_input else hs
        z = act(torch.baddbmm(g["bd"], src, g["D"].transpose(1, 2)))
        hp = torch.baddbmm(hs + g["bu"].unsqueeze(1), z, g["U"].transpose(1, 2))
        gate_value = _gathered_gate(gate, g, xs, hp, units, idx, slots, w.D.shape[0],
                                    None if valid is None else _take(valid, idx))
        res = (hp if gate_value is None else gate_value * hp) * g["scale"].unsqueeze(1)
        if idx is None:
            out = res
        else:
            out.index_copy_(0, idx, res)
    return out.view(h.shape)


def _gathered_gate(kind: int, g: dict, xs: torch.Tensor, hp: torch.Tensor, units: SegmentMeta,
                   idx: torch.Tensor | None, slots: torch.Tensor, num_slots: int,
                   valid: torch.Tensor | None):
    """The gate of each (row, token) of hp (n, T, d); ``valid`` (n, T) when T > 1 (else None)."""
    d = hp.shape[2]
    if kind == GATE_NONE:
        return None
    if kind == GATE_MIDDLE_Y:
        return 1.0 + g["gate_vec"].unsqueeze(1)
    if kind == GATE_MIDDLE_X:
        return torch.sigmoid(((xs + hp) * g["gate_w"][:, None, :d]).sum(2)
                             + g["gate_b"].unsqueeze(1)).unsqueeze(2)
    if kind == GATE_LARGE:
        z = act(torch.baddbmm(g["gate_bd"], xs, g["gate_D"].transpose(1, 2)))
        return torch.sigmoid(torch.baddbmm(g["gate_bu"], z, g["gate_U"].transpose(1, 2)))
    if kind == GATE_SMALL:
        v = torch.sigmoid((xs * g["gate_w"][:, None, :d]).sum(2)
                          + (hp * g["gate_w"][:, None, d:]).sum(2) + g["gate_b"].unsqueeze(1))
        if hp.shape[1] > 1:                 # a row's tokens together: the mean of its valid ones
            weight = torch.ones_like(v) if valid is None else valid.to(v.dtype)
            mean = (v * weight).sum(1) / weight.sum(1).clamp_min(1.0)
            return mean.view(-1, 1, 1)
        v = v[:, 0]
        if units.token_rows is None:        # no row ids: one mean per slot, as the reference
            return _group_mean(v, slots, None, num_slots).view(-1, 1, 1)
        return _row_mean(v, units, idx).view(-1, 1, 1)
    raise ValueError(f"unknown gate kind {kind}")


def _gate_rank(w: BottleneckStack, s: int) -> int:
    if w.gate_host[s] != GATE_LARGE:
        return 0
    return w.gate_ranks_host[s] if w.gate_ranks_host is not None else w.gate_D.shape[1]


def gathered_bottleneck(w: BottleneckStack, seg: SegmentMeta) -> list:
    """[((r, from_input, gate, gate rank), token indices or None, slot of each, {name: per-token
    weights})] per configuration group (:meth:`SegmentMeta.groups`), kept on ``seg``."""
    keys = tuple(map(slot_configs(w)[0].__getitem__, seg.slots))

    def build():
        out = []
        for key, idx, slots in seg.groups(keys):
            r, _, gate, rg = key

            def pick(t: torch.Tensor, slots=slots) -> torch.Tensor:
                return t.index_select(0, slots)
            g = {"D": pick(w.D[:, :r]), "bd": pick(w.bd[:, :r]).unsqueeze(1),
                 "U": pick(w.U[:, :, :r]), "bu": pick(w.bu),
                 "scale": pick(w.out_scale).unsqueeze(1)}
            if gate in (GATE_SMALL, GATE_MIDDLE_X):
                g.update(gate_w=pick(w.gate_w), gate_b=pick(w.gate_b))
            elif gate == GATE_MIDDLE_Y:
                g.update(gate_vec=pick(w.gate_vec))
            elif gate == GATE_LARGE:
                g.update(gate_D=pick(w.gate_D[:, :rg]), gate_bd=pick(w.gate_bd[:, :rg]).unsqueeze(1),
                         gate_U=pick(w.gate_U[:, :, :rg]), gate_bu=pick(w.gate_bu).unsqueeze(1))
            out.append((key, idx, slots, g))
        return out, sum(t.numel() for *_, g in out for t in g.values())

    tensors = (w.D, w.bd, w.U, w.bu, w.out_scale, w.gate_w, w.gate_b, w.gate_vec, w.gate_D,
               w.gate_bd, w.gate_U, w.gate_bu)
    stamp = tuple(None if t is None else t.data_ptr() for t in tensors) + (keys,)
    return seg.kept("bottleneck_weights", w, stamp, build, GATHER_CACHE_ELEMENTS)
