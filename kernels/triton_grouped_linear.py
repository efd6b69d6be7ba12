"""Triton grouped dense linear (per-slot ``x @ W[s].T + b[s]``) for :func:`grouped_linear`.

One launch, grid ``(d_out tiles, segment tiles)``: a program gathers the ``BLOCK_M`` tokens of one
segment tile through ``seg.order``, runs the K-loop over ``d_in`` against its slot's ``W`` tile,
adds the bias and scatters the rows back. Every (token, column) of ``y`` belongs to exactly one
program, so ``y`` needs neither zero-filling nor atomics: the tokens of slot -1 get tiles of their
own (``tile_table(..., with_unassigned=True)``) whose programs store zeros.

Real use is the per-adapter visual embedding: ``d_in`` = 2048 (CLIP RN101 features) or 5 (boxes),
``d_out`` = d_model (768), a handful of distinct slots per batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import LinearStack
from petserve.kernels.triton_common import (
    col_block,
    dot_precision,
    gathered_matmul_t,
    pick_block_m,
    segment_tile,
    tile_table,
)


@triton.jit
def _grouped_linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, order_ptr, tile_slot_ptr, tile_start_ptr,
                           tile_end_ptr, d_in, d_out, stride_xm, stride_xk, stride_ws, stride_wn,
                           stride_wk, stride_bs, stride_bn, stride_ym, stride_yn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """y[order[p], n-tile] = x[order[p]] @ W[s, n-tile].T + b[s, n-tile] (zeros when s == -1)."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    if slot < 0:  # tokens without an adapter
        tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty), mask=mask)
        return
    slot64 = slot.to(tl.int64)
    acc = gathered_matmul_t(x_ptr, tok, m_mask, stride_xm, stride_xk, w_ptr + slot64 * stride_ws,
                            stride_wn, stride_wk, offs_n, n_mask, d_in, BLOCK_M, BLOCK_N, BLOCK_K,
                            DOT_PRECISION)
    bias = tl.load(b_ptr + slot64 * stride_bs + offs_n * stride_bn, mask=n_mask, other=0.0)
    acc += bias.to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, w: LinearStack, seg: SegmentMeta) -> None:
    if x.dim() != 2 or w.W.dim() != 3 or w.b.dim() != 2:
        raise ValueError(f"expected x (N, d_in), W (S, d_out, d_in), b (S, d_out); got "
                         f"x {tuple(x.shape)}, W {tuple(w.W.shape)}, b {tuple(w.b.shape)}")
    s, d_out, d_in = w.W.shape
    if x.shape[1] != d_in or w.b.shape != (s, d_out):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W {tuple(w.W.shape)}, "
                         f"b {tuple(w.b.shape)}")
    if seg.num_tokens != x.shape[0]:
        raise ValueError(f"seg has {seg.num_tokens} tokens, x has {x.shape[0]}")
    if max(seg.slots, default=-1) >= s:
        raise IndexError(f"slot {max(seg.slots)} outside a stack of {s} slots")
    if not x.dtype == w.W.dtype == w.b.dtype:
        raise TypeError(f"dtype mismatch: x {x.dtype}, W {w.W.dtype}, b {w.b.dtype}")


def grouped_linear_triton(x: torch.Tensor, w: LinearStack, seg: SegmentMeta,
                          block_m: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.grouped_linear.grouped_linear`; returns a new ``y`` (N, d_out).

    Semantics (s = seg.token_slots[t]; fp32 accumulation, one rounding to x.dtype)::

        y = empty(N, d_out, x.dtype)
        for t in range(N):
            y[t] = x[t] @ w.W[s].T + w.b[s] if s >= 0 else 0

    x: (N, d_in); w.W: (S, d_out, d_in); w.b: (S, d_out); any strides. ``block_m`` overrides the
    token tile height (16, 32 or 64; tests use it to cover every tile shape).
    """
    _check(x, w, seg)
    n, d_in = x.shape
    d_out = w.W.shape[1]
    y = torch.empty(n, d_out, dtype=x.dtype, device=x.device)
    if n == 0 or d_out == 0:
        return y
    block_m = block_m or pick_block_m(seg)
    tile_slot, tile_start, tile_end = tile_table(seg, block_m, with_unassigned=True)
    block_n, block_k = col_block(d_out), col_block(d_in)
    _grouped_linear_kernel[(triton.cdiv(d_out, block_n), tile_slot.numel())](
        x, w.W, w.b, y, seg.order, tile_slot, tile_start, tile_end, d_in, d_out,
        x.stride(0), x.stride(1), *w.W.stride(), *w.b.stride(), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=dot_precision(x.dtype))
    return y
