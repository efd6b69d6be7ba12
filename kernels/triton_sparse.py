"""Triton grouped sparse delta for :func:`kernels.sparse.add_sparse`: gather, multiply, atomic add.

Grid ``(entry blocks, segment tiles)``: the program for segment tile ``i`` (at most ``block_m``
tokens of one slot s, see :func:`kernels.triton_common.tile_table`) and entry block ``j`` loads
entries ``ptr[s] + j * BLOCK_E ..`` (rows, cols, vals) once, gathers ``x[tok, cols]`` for its
tokens, multiplies in fp32 and atomically adds the (BLOCK_M, BLOCK_E) products into
``out[tok, rows]``. Entries of one slot share rows, and different entry blocks of a slot write the
same rows, hence atomics. Programs past their slot's entries exit at once, so a slot costs its
own nnz rounded up to BLOCK_E, whatever the largest slot's is.

fp32 ``y`` is the atomics' target itself. fp16 / bf16 ``y`` would lose precision (and bf16 atomics
need sm_90), so the products go to an fp32 scratch ``(adapted tokens, d_out)`` in sorted-token
order, and a second launch (grid ``(d_out tiles, segment tiles)``) adds it to ``y`` with one
rounding. Atomics make fp32 sums order-nondeterministic in the last bit.

Why not atomics-free: entries are sorted by row, so a program could own a (tokens, d_out tile)
block and sum its rows' entries, but a register tile cannot be scattered into; the one-hot
``tl.dot`` that would do it costs BLOCK_N times the FLOPs and rounds the products to the
weights' dtype. Open question for a GPU: at prefill sizes, whether densifying dW per slot and
taking a grouped GEMM beats both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import SparseStack
from petserve.kernels.triton_common import col_block, segment_tile, tile_table

# Products per program (BLOCK_M * BLOCK_E): enough independent loads in flight to hide the
# gather latency, few enough registers for 4 warps.
PAIRS_PER_PROGRAM = 2048


@triton.jit
def _delta_kernel(x_ptr, out_ptr, rows_ptr, cols_ptr, vals_ptr, entry_ptr, order_ptr,
                  tile_slot_ptr, tile_start_ptr, tile_end_ptr, first, stride_xm, stride_xk,
                  stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                  ON_POSITIONS: tl.constexpr):
    """out[row of tok, rows[e]] += x[tok, cols[e]] * vals[e] for one segment tile and entry block.

    ON_POSITIONS: out is the fp32 scratch indexed by position in order minus ``first`` (the slot
    -1 prefix), else y itself indexed by token.
    """
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    lo = tl.load(entry_ptr + slot)
    hi = tl.load(entry_ptr + slot + 1)
    e0 = lo + tl.program_id(0) * BLOCK_E
    if e0 >= hi:  # past this slot's entries (or a slot without a delta)
        return
    offs_e = e0 + tl.arange(0, BLOCK_E)
    e_mask = offs_e < hi
    rows = tl.load(rows_ptr + offs_e, mask=e_mask, other=0).to(tl.int64)
    cols = tl.load(cols_ptr + offs_e, mask=e_mask, other=0).to(tl.int64)
    vals = tl.load(vals_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    mask = m_mask[:, None] & e_mask[None, :]
    xv = tl.load(x_ptr + tok[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    prod = xv.to(tl.float32) * vals[None, :]                           # (BLOCK_M, BLOCK_E)
    if ON_POSITIONS:
        dest = pos - first
    else:
        dest = tok
    tl.atomic_add(out_ptr + dest[:, None] * stride_om + rows[None, :] * stride_on, prod,
                  mask=mask, sem="relaxed")


@triton.jit
def _finish_kernel(y_ptr, acc_ptr, entry_ptr, order_ptr, tile_slot_ptr, tile_start_ptr,
                   tile_end_ptr, first, d_out, stride_ym, stride_yn, stride_am,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[tok, n-tile] += acc[pos - first, n-tile], rounded once to y's dtype."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    if tl.load(entry_ptr + slot + 1) == tl.load(entry_ptr + slot):  # no delta: acc is all zero
        return
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (offs_n < d_out)[None, :]
    acc = tl.load(acc_ptr + (pos - first)[:, None] * stride_am + offs_n[None, :], mask=mask,
                  other=0.0)
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _check(y: torch.Tensor, x: torch.Tensor, w: SparseStack, seg: SegmentMeta) -> None:
    n = x.shape[0]
    if x.shape != (n, w.d_in) or y.shape != (n, w.d_out):
        raise ValueError(f"shape mismatch: y {tuple(y.shape)}, x {tuple(x.shape)}, "
                         f"delta ({w.d_out}, {w.d_in})")
    if seg.num_tokens != n:
        raise ValueError(f"seg has {seg.num_tokens} tokens, x has {n}")
    if x.dtype != w.vals.dtype or y.dtype != x.dtype:
        raise TypeError(f"dtype mismatch: y {y.dtype}, x {x.dtype}, vals {w.vals.dtype}")


def pick_blocks(seg: SegmentMeta) -> tuple[int, int]:
    """(block_m, block_e): token tile from the mean tokens per slot (1 for decode, where taller
    tiles would be all mask), entry block filling PAIRS_PER_PROGRAM."""
    mean = sum(seg.counts) / max(len(seg.counts), 1)
    block_m = min(16, triton.next_power_of_2(max(1, round(mean))))
    return block_m, PAIRS_PER_PROGRAM // block_m


def add_sparse_triton(y: torch.Tensor, x: torch.Tensor, w: SparseStack, seg: SegmentMeta,
                      block_m: int | None = None, block_e: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.sparse.add_sparse`; ``y`` (N, d_out) is updated in place.

    Semantics (s = seg.token_slots[t])::

        for t with s >= 0, for e in range(w.ptr[s], w.ptr[s + 1]):
            y[t, w.rows[e]] += x[t, w.cols[e]] * w.vals[e]      # fp32 products and sums

    x: (N, d_in); any strides. ``block_m`` / ``block_e`` override the token tile height and the
    entry block (powers of two; tests use them to cover several tile shapes). No autograd.
    """
    _check(y, x, w, seg)
    nnz = [w.count(s) for s in seg.slots]
    if max(nnz, default=0) == 0:
        return y
    auto_m, auto_e = pick_blocks(seg)
    block_m, block_e = block_m or auto_m, block_e or auto_e
    tile_slot, tile_start, tile_end = tile_table(seg, block_m)
    grid = (triton.cdiv(max(nnz), block_e), tile_slot.numel())
    tiles = (seg.order, tile_slot, tile_start, tile_end)
    entries = (w.rows, w.cols, w.vals, w.ptr)
    if y.dtype == torch.float32:
        _delta_kernel[grid](x, y, *entries, *tiles, 0, *x.stride(), *y.stride(),
                            BLOCK_M=block_m, BLOCK_E=block_e, ON_POSITIONS=False)
        return y
    adapted = sum(seg.counts)
    first = seg.num_tokens - adapted                         # slot -1 tokens sort first
    acc = torch.zeros(adapted, w.d_out, dtype=torch.float32, device=y.device)
    _delta_kernel[grid](x, acc, *entries, *tiles, first, *x.stride(), *acc.stride(),
                        BLOCK_M=block_m, BLOCK_E=block_e, ON_POSITIONS=True)
    block_n = col_block(w.d_out)
    _finish_kernel[(triton.cdiv(w.d_out, block_n), tile_slot.numel())](
        y, acc, w.ptr, *tiles, first, w.d_out, *y.stride(), acc.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n)
    return y
