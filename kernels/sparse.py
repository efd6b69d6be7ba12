"""Grouped sparse delta (composable sparse fine-tuning): per-slot COO entries added to a linear."""
from __future__ import annotations

import torch

from petserve.kernels.dispatch import records_grad, use_triton
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import SparseStack

# CPU heuristic (see prefers_gathered). Measured with one thread on the shared 2-core Xeon (d 768,
# density 0.1 / 1 / 5%, 2-64 slots, 1-64 tokens per slot, medians): the reference costs ~25 us per
# slot present plus ~2.5-4 ns per (token, entry) pair; the gathered path ~2.5-3 ns per pair with
# its pair indices kept on the SegmentMeta (64 slots x 1 token at 1%: 2.7 ms vs 0.96 ms; at 0.1%:
# 1.55 ms vs 0.07 ms; it is still 1.03x at 94K pairs per slot), and its first call on a
# SegmentMeta builds them for ~8 ns per pair more. Decode steps reuse one SegmentMeta until a row
# joins or leaves; up to ~8K pairs per slot the build is repaid within ~3 steps (1 token per slot
# at 1%: 1.3-3.3 steps, 2 tokens at 1%: 2.9-7, 1 token at 5%: 4.5-4.9), the threshold. Two
# threads measured the same when the other core was idle.
GATHER_MIN_SLOTS = 2
GATHER_PAIRS_PER_SLOT = 8 * 1024
GATHER_CACHE_PAIRS = 1 << 19     # pair indices kept per (step, stack): 6 MiB (int32, int32, fp32)
# Per slot, the reference gathers its n * nnz pairs or densifies dW[s] and takes a GEMM (see
# slot_delta), by this cost model; same machine, one slot of 768 x 768: gathering ~3 ns per pair,
# densifying ~1.2 ns per cell, the GEMM ~0.01 ns per multiply-add (512 tokens: at 0.1% 1.3 vs
# 3.8 ms, at 1% 8.5 vs 3.8 ms, at 5% 82 vs 3.8 ms; 64 tokens at 1%: 0.91 vs 0.78 ms). Decode
# tokens gather; prefill segments densify from ~0.4% density up.
GATHER_NS_PER_PAIR, DENSIFY_NS_PER_CELL, GEMM_NS_PER_MAC = 3.0, 1.2, 0.01


def add_sparse(y: torch.Tensor, x: torch.Tensor, w: SparseStack, seg: SegmentMeta) -> torch.Tensor:
    """Add each token's sparse delta to ``y`` and return the result.

    Semantics (s = seg.token_slots[t])::

        for t in range(N):
            if s >= 0:
                for e in range(w.ptr_host[s], w.ptr_host[s + 1]):
                    y[t, w.rows[e]] += x[t, w.cols[e]] * w.vals[e]

    i.e. ``y[t] += x[t] @ dW[s].T`` with dW[s] (d_out, d_in) the slot's COO entries. x: (N, d_in);
    y: (N, d_out), written in place and returned, except when autograd records the op (training):
    then :func:`add_sparse_reference` returns a new tensor and leaves ``y`` as it was. Callers
    always use the return value. Tokens with slot -1, and slots without entries, are untouched.
    CUDA tensors take the Triton kernel unless autograd records the op. Elsewhere:
    :func:`add_sparse_gathered` for decode-shaped steps (many slots, few tokens each: one
    gather/scatter over every (token, entry) pair instead of a few small ops per slot, whose
    overhead dominates there), else :func:`add_sparse_reference` (per slot: gather its pairs, or
    densify its delta and take a GEMM for prefill-sized segments).
    """
    if not seg.slots:
        return y
    if use_triton(x, x, y, w.vals):
        from petserve.kernels.triton_sparse import add_sparse_triton
        return add_sparse_triton(y, x, w, seg)
    if prefers_gathered(seg, w) and not records_grad(x, y, w.vals):
        return add_sparse_gathered(y, x, w, seg)
    return add_sparse_reference(y, x, w, seg)


def pair_count(seg: SegmentMeta, w: SparseStack) -> tuple[int, int]:
    """(number of (token, entry) pairs the op computes, slots present that have entries)."""
    counts = [c * w.count(s) for s, c in zip(seg.slots, seg.counts)]
    return sum(counts), sum(1 for c in counts if c)


def prefers_gathered(seg: SegmentMeta, w: SparseStack) -> bool:
    """Whether :func:`add_sparse_gathered` beats the per-slot reference on the CPU: at least
    GATHER_MIN_SLOTS slots with entries, at most GATHER_PAIRS_PER_SLOT pairs per such slot, and
    few enough pairs that their indices are kept on ``seg`` for the next steps. Decode steps
    (one token per row, rows spread over many adapters) take it; prefills and single-adapter
    batches take the reference."""
    pairs, live = pair_count(seg, w)
    return (live >= GATHER_MIN_SLOTS and pairs <= GATHER_PAIRS_PER_SLOT * live
            and pairs <= GATHER_CACHE_PAIRS)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 deltas are summed in fp32 and rounded once, as the Triton kernel does."""
    return torch.promote_types(dtype, torch.float32)


def add_sparse_reference(y: torch.Tensor, x: torch.Tensor, w: SparseStack,
                         seg: SegmentMeta) -> torch.Tensor:
    """Torch reference of :func:`add_sparse`: per slot present, :func:`slot_delta` of its tokens
    added to their rows of ``y``, in place.

    Differentiable in ``x``, ``w.vals`` and ``y``; when autograd records it, it works on a copy of
    ``y`` (so that no tensor saved for another op's backward is overwritten) and returns that.
    """
    out = y.clone() if records_grad(x, y, w.vals) else y
    acc = _accum_dtype(y.dtype)
    for s, idx in seg.segments():
        lo, hi = w.ptr_host[s], w.ptr_host[s + 1]
        if lo == hi:
            continue
        delta = slot_delta(x.index_select(0, idx).to(acc), w, lo, hi)              # (n, d_out)
        # A slot's token indices are unique, so gather-add-copy equals index_add_ on dim 0.
        out.index_copy_(0, idx, (out.index_select(0, idx).to(acc) + delta).to(y.dtype))
    return out


def slot_delta(xs: torch.Tensor, w: SparseStack, lo: int, hi: int) -> torch.Tensor:
    """``xs @ dW.T`` for the entries ``lo:hi`` of one slot; xs: (n, d_in) -> (n, d_out)::

        zeros(n, d_out).index_add(1, rows, xs[:, cols] * vals)     # gather: n * nnz pairs
        xs @ zeros(d_out, d_in).index_put((rows, cols), vals).T    # densify, when it pays

    whichever :func:`densify_pays` says is cheaper (prefill-sized segments of denser deltas)."""
    rows, cols, vals = w.rows[lo:hi], w.cols[lo:hi], w.vals[lo:hi].to(xs.dtype)
    if densify_pays(xs.shape[0], hi - lo, w.d_out, w.d_in):
        return xs @ xs.new_zeros(w.d_out, w.d_in).index_put_((rows, cols), vals).T
    contrib = xs.index_select(1, cols) * vals                                    # (n, nnz)
    return contrib.new_zeros(xs.shape[0], w.d_out).index_add_(1, rows, contrib)


def densify_pays(tokens: int, nnz: int, d_out: int, d_in: int) -> bool:
    """Whether densifying one slot's delta and taking a GEMM beats gathering its pairs."""
    cells = d_out * d_in
    return GATHER_NS_PER_PAIR * tokens * nnz > cells * (DENSIFY_NS_PER_CELL + GEMM_NS_PER_MAC * tokens)


def add_sparse_gathered(y: torch.Tensor, x: torch.Tensor, w: SparseStack,
                        seg: SegmentMeta) -> torch.Tensor:
    """:func:`add_sparse` as one gather and one scatter over every (token t, entry e) pair::

        y.view(-1).index_add_(0, t * d_out + rows[e], x.view(-1)[t * d_in + cols[e]] * vals[e])

    The pair indices and gathered values (:func:`gathered_pairs`) are kept on ``seg``: the entries
    of the slots a step's tokens use must not change while its SegmentMeta is in use, which the
    slot pool guarantees (a slot referenced by rows in flight is never rewritten). Not
    differentiable (add_sparse sends training to the reference); ``y`` is updated in place.
    """
    pairs = gathered_pairs(w, seg)
    if pairs is None:
        return y
    x_at, y_at, vals = pairs
    acc = _accum_dtype(y.dtype)
    contrib = x.contiguous().view(-1).index_select(0, x_at).to(acc) * vals      # (P,)
    if y.is_contiguous() and y.dtype == acc:
        y.view(-1).index_add_(0, y_at, contrib)
        return y
    out = y.to(acc).contiguous()                     # (N, d_out): a copy, y is strided or narrow
    out.view(-1).index_add_(0, y_at, contrib)
    return y.copy_(out)


def gathered_pairs(w: SparseStack, seg: SegmentMeta):
    """``(x offsets, y offsets, values)`` of every (token, entry) pair, (P,) each, or None when
    there are none: int32 offsets into the row-major flattened x (N, d_in) and y (N, d_out), the
    entries' values in the accumulation dtype. Kept on ``seg`` (:meth:`SegmentMeta.kept`) unless
    over GATHER_CACHE_PAIRS; a stack whose tensors were replaced is gathered again."""
    def build():
        value = _build_pairs(w, seg)
        return value, 0 if value is None else value[0].numel()
    stamp = (w.rows.data_ptr(), w.cols.data_ptr(), w.vals.data_ptr(), w.d_in, w.d_out,
             tuple((w.ptr_host[s], w.ptr_host[s + 1]) for s in seg.slots))
    return seg.kept("sparse_pairs", w, stamp, build, GATHER_CACHE_PAIRS)


def _build_pairs(w: SparseStack, seg: SegmentMeta):
    """Vectorised over tokens: the pairs of the adapted tokens in slot order, each token's
    entries one contiguous run, laid out with two cumulative sums (no Python step per slot)."""
    dev, n, adapted = w.rows.device, seg.num_tokens, sum(seg.counts)
    tokens = seg.order[n - adapted:].to(dev)                      # slot -1 tokens sort first
    ptr = torch.tensor(w.ptr_host, dtype=torch.int64, device=dev)
    slot = torch.repeat_interleave(torch.tensor(seg.slots, dtype=torch.int64, device=dev),
                                   torch.tensor(seg.counts, dtype=torch.int64, device=dev))
    first, count = ptr[slot], ptr[slot + 1] - ptr[slot]
    keep = count > 0
    tokens, first, count = tokens[keep], first[keep], count[keep]
    total = int(count.sum())
    if total == 0:
        return None
    # int32 halves the kept indices and the build's passes; int64 only for huge steps
    index = torch.int64 if n * max(w.d_in, w.d_out) >= 2 ** 31 else torch.int32
    run_start = torch.cumsum(count, 0) - count                     # each token's first pair
    last = first + count - 1                                       # each token's last entry
    # entry of pair p: +1 within a token's run, a jump to the next token's first entry between
    step = torch.ones(total, dtype=index, device=dev)
    step[run_start] = (first - torch.cat([first.new_zeros(1), last[:-1]])).to(index)
    entry = torch.cumsum(step, 0, dtype=index)
    mark = torch.zeros(total, dtype=index, device=dev)
    mark[run_start] = (tokens - torch.cat([tokens.new_zeros(1), tokens[:-1]])).to(index)
    token = torch.cumsum(mark, 0, dtype=index)                    # token of pair p
    x_at = w.cols.index_select(0, entry).to(index).add_(token, alpha=w.d_in)
    y_at = w.rows.index_select(0, entry).to(index).add_(token, alpha=w.d_out)
    return x_at, y_at, w.vals.index_select(0, entry).to(_accum_dtype(w.vals.dtype))
