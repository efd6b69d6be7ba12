"""Triton grouped low-rank delta (segmented shrink + expand, punica-style) for :func:`add_lowrank`.

Two launches per call:

* shrink, grid ``(rank tiles, segment tiles)``: ``T[p, :r_s] = x[order[p]] @ A[s, :r_s].T`` into an
  fp32 ``(N, R)`` intermediate kept in sorted-token order (rows of slot -1 are never written);
* expand, grid ``(d_out tiles, segment tiles)``:
  ``y[order[p]] += scale[s] * T[p, :r_s] @ B[s, :, :r_s].T``.

Heterogeneous ranks: shrink programs whose rank tile starts at or past ``r_s`` exit at once, and
the expand K-loop stops at ``r_s``; a slot's cost is its own rank rounded up to 16.

Why not fused: a single kernel would have to either recompute the shrink once per d_out tile
(``d_out / BLOCK_N`` times the shrink FLOPs and x reads) or give up the d_out axis of the grid,
leaving one program per segment tile -- too few programs to fill the GPU at decode sizes. The
fp32 intermediate is ``N * R * 4`` bytes, small next to x and y. A fused multi-slice (q, k, v in
one launch) form is not offered: the contract passes one ``LowRankStack`` per call, and its only
gain is sharing the x reads of the shrink and saving launches, which needs measuring on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import LowRankStack
from petserve.kernels.triton_common import (
    BLOCK_R,
    col_block,
    dot_precision,
    gathered_matmul_t,
    pick_block_m,
    rank_loop_matmul_t,
    segment_tile,
    tile_table,
)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, ranks_ptr, order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                   t_ptr, d_in, stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_tm,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """T[p, r0:r0+BLOCK_R] = x[order[p]] @ A[s, r0:r0+BLOCK_R].T for the p of one segment tile."""
    pid_r = tl.program_id(0)
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    rank = tl.load(ranks_ptr + slot)
    r0 = pid_r * BLOCK_R
    if r0 >= rank:  # past this slot's rank (or rank 0): nothing to compute
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    acc = gathered_matmul_t(x_ptr, tok, m_mask, stride_xm, stride_xk, a_slot, stride_ar, stride_ak,
                            offs_r, r_mask, d_in, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION)
    t_ptrs = t_ptr + pos[:, None] * stride_tm + offs_r[None, :]
    tl.store(t_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_kernel(y_ptr, t_ptr, b_ptr, scale_ptr, ranks_ptr, order_ptr, tile_slot_ptr,
                   tile_start_ptr, tile_end_ptr, d_out, stride_ym, stride_yn, stride_tm,
                   stride_bs, stride_bn, stride_br, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y[order[p], n-tile] += scale[s] * T[p, :r_s] @ B[s, n-tile, :r_s].T (read-modify-write:
    each (token, column) belongs to exactly one program, so no atomics)."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:
        return
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    acc = rank_loop_matmul_t(t_ptr, pos, m_mask, stride_tm, b_slot, stride_bn, stride_br, offs_n,
                             n_mask, rank, BLOCK_M, BLOCK_N, BLOCK_R, DOT_PRECISION)
    scale = tl.load(scale_ptr + slot).to(tl.float32)
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + scale * acc).to(y.dtype), mask=mask)


def _check(y: torch.Tensor, x: torch.Tensor, w: LowRankStack, seg: SegmentMeta) -> None:
    n, d_in = x.shape
    s, r, a_in = w.A.shape
    if y.shape != (n, w.B.shape[1]) or a_in != d_in or w.B.shape[::2] != (s, r):
        raise ValueError(f"shape mismatch: y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"A {tuple(w.A.shape)}, B {tuple(w.B.shape)}")
    if seg.num_tokens != n:
        raise ValueError(f"seg has {seg.num_tokens} tokens, x has {n}")
    if x.dtype != w.A.dtype or w.A.dtype != w.B.dtype:
        raise TypeError(f"dtype mismatch: x {x.dtype}, A {w.A.dtype}, B {w.B.dtype}")


def add_lowrank_triton(y: torch.Tensor, x: torch.Tensor, w: LowRankStack, seg: SegmentMeta,
                       block_m: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.lowrank.add_lowrank`; ``y`` (N, d_out) is updated in place.

    Semantics (s = seg.token_slots[t], r = w.ranks[s])::

        T = empty(N, R, fp32)                                   # sorted-token order
        for p, t in enumerate(seg.order):                       # shrink
            if s >= 0 and r > 0: T[p, :r] = x[t] @ w.A[s, :r].T
        for p, t in enumerate(seg.order):                       # expand
            if s >= 0 and r > 0: y[t] += w.scale[s] * T[p, :r] @ w.B[s, :, :r].T

    x: (N, d_in); w.A: (S, R, d_in); w.B: (S, d_out, R). ``block_m`` overrides the token tile
    height (16, 32 or 64; tests use it to cover every tile shape).
    """
    _check(y, x, w, seg)
    used = [w.ranks_host[s] for s in seg.slots]
    if max(used, default=0) == 0:
        return y
    block_m = block_m or pick_block_m(seg)
    tile_slot, tile_start, tile_end = tile_table(seg, block_m)
    n, d_in = x.shape
    d_out = y.shape[1]
    t = torch.empty(n, w.A.shape[1], dtype=torch.float32, device=x.device)
    block_k, block_n = col_block(d_in), col_block(d_out)
    prec = dot_precision(x.dtype)
    num_tiles = tile_slot.numel()
    ranks, scale = w.ranks.contiguous(), w.scale.contiguous()  # indexed by slot, unstrided
    _shrink_kernel[(triton.cdiv(max(used), BLOCK_R), num_tiles)](
        x, w.A, ranks, seg.order, tile_slot, tile_start, tile_end, t, d_in,
        x.stride(0), x.stride(1), *w.A.stride(), t.stride(0),
        BLOCK_M=block_m, BLOCK_R=BLOCK_R, BLOCK_K=block_k, DOT_PRECISION=prec)
    _expand_kernel[(triton.cdiv(d_out, block_n), num_tiles)](
        y, t, w.B, scale, ranks, seg.order, tile_slot, tile_start, tile_end, d_out,
        y.stride(0), y.stride(1), t.stride(0), *w.B.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=BLOCK_R, DOT_PRECISION=prec)
    return y
