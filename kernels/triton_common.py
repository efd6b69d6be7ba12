"""Pieces shared by the grouped Triton kernels: launch tiles, per-row groups, tile-level matmuls.

Every grouped kernel walks the tokens of one slot through ``seg.order`` (tokens sorted by slot). The
launch grid is (column tile, segment tile); a *segment tile* is at most ``block_m`` consecutive
positions of ``order`` that all belong to one slot, so a program loads one slot's weights once.
The host-side tables are built once per step and cached in ``seg._device_cache``; every layer of
the step reuses them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petserve.kernels.segments import SegmentMeta

# Rank granularity of every rank-indexed tile: tl.dot needs dims >= 16, and a finer step means a
# rank-8 slot beside a rank-64 one wastes at most half a tile, never the other slot's 64.
BLOCK_R = 16


def tile_table(seg: SegmentMeta, block_m: int, with_unassigned: bool = False):
    """Segment tiles of ``block_m`` tokens as int32 device tensors ``(slot, start, end)``.

    Tile i covers positions ``order[start[i]:end[i]]``, all of slot ``slot[i]``. With
    ``with_unassigned`` the tokens of slot -1 (the prefix of ``order``) get tiles of slot -1 too,
    for ops that must write every token (the bottleneck copies ``h`` there).
    """
    key = ("tiles", block_m, with_unassigned)
    if key not in seg._device_cache:
        slots, starts, ends = [], [], []
        spans = list(zip(seg.slots, seg.starts, seg.counts))
        if with_unassigned:
            spans.insert(0, (-1, 0, seg.num_tokens - sum(seg.counts)))
        for slot, start, count in spans:
            for lo in range(start, start + count, block_m):
                slots.append(slot)
                starts.append(lo)
                ends.append(min(lo + block_m, start + count))
        dev = seg.token_slots.device
        seg._device_cache[key] = tuple(torch.tensor(v, dtype=torch.int32, device=dev)
                                       for v in (slots, starts, ends))
    return seg._device_cache[key]


def pick_block_m(seg: SegmentMeta) -> int:
    """Token tile height from the mean segment size: decode-like batches (a few tokens per slot)
    would waste most of a 64-row tile, prefill-like ones want tall tiles for tl.dot reuse."""
    mean = sum(seg.counts) / max(len(seg.counts), 1)
    return 16 if mean <= 16 else 32 if mean <= 48 else 64


def col_block(dim: int, cap: int = 64) -> int:
    """Power-of-two tile width for a feature dim: >= 16 (tl.dot), <= cap (registers)."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE products so fp32 matches the reference to 1e-4 (tf32 would not)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def row_groups(seg: SegmentMeta):
    """Per-example groups for the small gate: ``(group, weight, count, num_groups)``.

    group:  (N,) int32, one id per (slot segment, batch row) pair; tokens of slot -1 share
            segment 0's ids, with weight 0.
    weight: (N,) fp32, 1 on tokens that count toward their group's mean (valid tokens of a
            slot), else 0.
    count:  (num_groups,) fp32, sum of weight per group.
    Matches the reference's ``_row_mean``: it averages per slot segment and row; without
    ``token_rows`` the whole segment is one group and ``token_valid`` is ignored.
    """
    if "row_groups" not in seg._device_cache:
        n = seg.num_tokens
        order = seg.order.cpu()
        # Segments follow the slot -1 prefix of ``order`` back to back: position -> segment id.
        first = n - sum(seg.counts)
        seg_index = torch.zeros(n, dtype=torch.int64)
        assigned = torch.zeros(n)
        seg_index[order[first:]] = torch.repeat_interleave(
            torch.arange(len(seg.counts)), torch.tensor(seg.counts, dtype=torch.int64))
        assigned[order[first:]] = 1.0
        weight = assigned  # slot -1 tokens share group ids with segment 0: they must weigh 0
        key = seg_index
        if seg.token_rows is not None:
            rows = seg.token_rows.cpu().to(torch.int64)
            key = seg_index * (int(rows.max()) + 1 if n else 1) + rows
            if seg.token_valid is not None:
                weight = assigned * seg.token_valid.cpu().to(torch.float32)
        uniq, group = torch.unique(key, return_inverse=True)
        count = torch.zeros(uniq.numel()).index_add_(0, group, weight)
        dev = seg.token_slots.device
        seg._device_cache["row_groups"] = (group.to(device=dev, dtype=torch.int32),
                                           weight.to(dev), count.to(dev), uniq.numel())
    return seg._device_cache["row_groups"]


@triton.jit
def gelu_tanh(z):
    """GELU, tanh approximation. 0.5 * (1 + tanh(u)) == sigmoid(2 u), and tl has no tanh."""
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z * tl.sigmoid(2.0 * u)


@triton.jit
def segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr, tile,
                 BLOCK_M: tl.constexpr):
    """-> (slot, pos (BLOCK_M,) int64 positions in order, m_mask, tok (BLOCK_M,) int64 tokens)."""
    slot = tl.load(tile_slot_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    pos = start.to(tl.int64) + tl.arange(0, BLOCK_M)
    m_mask = pos < end
    tok = tl.load(order_ptr + pos, mask=m_mask, other=0).to(tl.int64)
    return slot, pos, m_mask, tok


@triton.jit
def gathered_matmul_t(src_ptr, tok, m_mask, stride_sm, stride_sk, w_ptr, stride_wr, stride_wk,
                      offs_r, r_mask, dim, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_R) fp32 = src[tok, :dim] @ w[offs_r, :dim].T, masked rows read as 0.

    src: (N, dim) rows gathered by token index; w: one slot's (R, dim) matrix.
    """
    offs_k = tl.arange(0, BLOCK_K)
    s_ptrs = src_ptr + tok[:, None] * stride_sm + offs_k[None, :] * stride_sk
    w_ptrs = w_ptr + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        k_mask = offs_k < dim - k0
        s = tl.load(s_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(s, w, acc, input_precision=DOT_PRECISION)
        s_ptrs += BLOCK_K * stride_sk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def rank_loop_matmul_t(t_ptr, pos, m_mask, stride_tm, w_ptr, stride_wn, stride_wr, offs_n, n_mask,
                       rank, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 = t[pos, :rank] @ w[offs_n, :rank].T.

    t: (N, R) fp32 intermediate in sorted-token order; w: one slot's (d_out, R) matrix. The loop
    stops at this slot's own rank, so a rank-8 slot costs a rank-8 GEMM whatever R is.
    """
    offs_r = tl.arange(0, BLOCK_R)
    t_ptrs = t_ptr + pos[:, None] * stride_tm + offs_r[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_r[:, None] * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = offs_r < rank - r0
        w = tl.load(w_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        t = tl.load(t_ptrs, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        # The intermediate is fp32; tensor cores want both operands in the weights' dtype.
        acc = tl.dot(t.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        t_ptrs += BLOCK_R
        w_ptrs += BLOCK_R * stride_wr
    return acc
