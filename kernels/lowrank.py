"""Grouped low-rank delta (LoRA) over a batch of tokens that use different adapters."""
from __future__ import annotations

import torch

from petserve.kernels.dispatch import records_grad, use_triton
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import LowRankStack

# CPU heuristic (see prefers_gathered). Measured with one thread on a shared 2-core AMD EPYC
# (d 64 and 512, rank 8, 1-32 slots): the reference costs ~25-40 us of per-call overhead per slot
# present, the gathered path ~0.6 ns per weight element it copies; they break even at ~64K
# elements copied per slot present. Half that keeps a margin.
GATHER_MIN_SEGMENTS = 2
GATHER_ELEMENTS_PER_SEGMENT = 32 * 1024
GATHER_CACHE_ELEMENTS = 1 << 20     # gathered weights kept per (step, stack): 4 MiB in fp32


def add_lowrank(y: torch.Tensor, x: torch.Tensor, w: LowRankStack, seg: SegmentMeta) -> torch.Tensor:
    """Add each token's low-rank delta to ``y`` in place and return ``y``.

    Semantics (s = seg.token_slots[t], r = w.ranks[s])::

        for t in range(N):
            if s >= 0 and r > 0:
                y[t] += w.scale[s] * (x[t] @ w.A[s, :r].T) @ w.B[s, :, :r].T

    x: (N, d_in); y: (N, d_out), written in place. Tokens with slot -1, and slots of rank 0, are
    left untouched. Compute is proportional to each slot's own rank, not the largest in the stack.
    CUDA tensors take the Triton kernels unless autograd records the op (training). Elsewhere:
    :func:`add_lowrank_gathered` for decode-shaped steps (many slots, few tokens each: one bmm
    pair per distinct rank instead of one GEMM pair per slot, whose per-call overhead dominates
    at a few tokens), else :func:`add_lowrank_reference` (few slots, or many tokens per slot,
    where gathering a weight copy per token would cost more than the GEMMs).
    """
    if not seg.slots:
        return y
    if use_triton(x, x, y, w.A, w.B, w.scale):
        from petserve.kernels.triton_lowrank import add_lowrank_triton
        return add_lowrank_triton(y, x, w, seg)
    if prefers_gathered(seg, w) and not records_grad(x, y, w.A, w.B, w.scale):
        return add_lowrank_gathered(y, x, w, seg)
    return add_lowrank_reference(y, x, w, seg)


def prefers_gathered(seg: SegmentMeta, w: LowRankStack) -> bool:
    """Whether :func:`add_lowrank_gathered` beats the per-slot reference on the CPU
    (:func:`gather_pays` with max rank * (d_in + d_out) elements copied per token). Decode steps
    (one token per row, rows spread over many adapters) take it; prefills and single-adapter
    batches take the reference."""
    if len(seg.slots) < GATHER_MIN_SEGMENTS:
        return False
    rank = max(w.ranks_host[s] for s in seg.slots)
    return gather_pays(seg, rank * (w.A.shape[2] + w.B.shape[1]))


def gather_pays(seg: SegmentMeta, elements_per_token: int,
                per_segment: int = GATHER_ELEMENTS_PER_SEGMENT) -> bool:
    """At least GATHER_MIN_SEGMENTS slots present, and the weights a gathered path would copy
    (adapted tokens * ``elements_per_token``) under ``per_segment`` per slot present."""
    n = len(seg.slots)
    return n >= GATHER_MIN_SEGMENTS and sum(seg.counts) * elements_per_token <= per_segment * n


def add_lowrank_reference(y: torch.Tensor, x: torch.Tensor, w: LowRankStack,
                          seg: SegmentMeta) -> torch.Tensor:
    """Torch reference of :func:`add_lowrank`: one pair of GEMMs per slot present (on the tokens
    themselves when one slot has them all: a single-adapter batch copies nothing)."""
    whole = len(seg.slots) == 1 and seg.counts[0] == seg.num_tokens
    for s, idx in seg.segments():
        r = w.ranks_host[s]
        if r == 0:
            continue
        xs = x if whole else x.index_select(0, idx)
        delta = (xs @ w.A[s, :r].T) @ w.B[s, :, :r].T
        if whole:
            y += delta * w.scale[s].to(delta.dtype)
            continue
        # A slot's token indices are unique, so gather-add-copy equals index_add_ and avoids its
        # multi-threaded CPU kernel, which stalls on busy machines.
        y.index_copy_(0, idx, y.index_select(0, idx) + delta * w.scale[s].to(delta.dtype))
    return y


def add_lowrank_gathered(y: torch.Tensor, x: torch.Tensor, w: LowRankStack,
                         seg: SegmentMeta) -> torch.Tensor:
    """:func:`add_lowrank` as one pair of batched matmuls per distinct rank r present::

        idx = tokens whose slot has rank r;  s = token_slots[idx]      # (n,)
        h = bmm(x[idx, None, :], A[s, :r].mT)                          # (n, 1, r)
        y[idx] += bmm(h, (scale[s, None, None] * B[s, :, :r]).mT)[:, 0]  # (n, d_out)

    Each token gets its own copy of its slot's A and B (n * r * (d_in + d_out) elements), so
    this pays off only when slots hold few tokens each (see :func:`prefers_gathered`). The copies
    are kept on ``seg`` (:func:`gathered_weights`): the weights of the slots a step's tokens use
    must not change while its SegmentMeta is in use, which the slot pool guarantees (a slot
    referenced by rows in flight is never rewritten).
    """
    for _r, idx, a, b in gathered_weights(w, seg):
        xs = x if idx is None else x.index_select(0, idx)
        # Row vector times matrix, (1, d_in) @ (d_in, r): torch's CPU bmm is several times
        # faster in this orientation than as matrix times column vector.
        h = torch.bmm(xs.unsqueeze(1), a.transpose(1, 2))             # (n, 1, r)
        if idx is None:
            y.unsqueeze(1).baddbmm_(h, b.transpose(1, 2))             # (n, 1, d_out) in place
        else:
            delta = torch.bmm(h, b.transpose(1, 2)).squeeze(1)        # (n, d_out)
            y.index_copy_(0, idx, y.index_select(0, idx) + delta)
    return y


def gathered_weights(w: LowRankStack, seg: SegmentMeta) -> list:
    """[(r, token indices or None, A[s, :r] (n, r, d_in), scale[s] * B[s, :, :r] (n, d_out, r))]
    per rank group (:func:`rank_groups`), kept on ``seg`` (:meth:`SegmentMeta.kept`) unless larger
    than GATHER_CACHE_ELEMENTS; a stack whose tensors were replaced (grown) is gathered again."""
    def build():
        out = []
        for r, idx, slots in rank_groups(w, seg):
            a = w.A[:, :r].index_select(0, slots)                     # (n, r, d_in)
            b = w.B[:, :, :r].index_select(0, slots)                  # (n, d_out, r)
            out.append((r, idx, a, b * w.scale.index_select(0, slots).to(b.dtype).view(-1, 1, 1)))
        return out, sum(a.numel() + b.numel() for _, _, a, b in out)
    stamp = (w.A.data_ptr(), w.B.data_ptr(), w.scale.data_ptr(),
             tuple(w.ranks_host[s] for s in seg.slots))
    return seg.kept("lowrank_weights", w, stamp, build, GATHER_CACHE_ELEMENTS)


def rank_groups(w: LowRankStack, seg: SegmentMeta) -> list[tuple[int, torch.Tensor | None,
                                                                   torch.Tensor]]:
    """[(rank r, token indices or None = every token in order, slot of each)] for the ranks > 0
    of the slots present (:meth:`SegmentMeta.groups`)."""
    return seg.groups(tuple(w.ranks_host[s] or None for s in seg.slots))


def add_lowrank_loop(y: torch.Tensor, x: torch.Tensor, w: LowRankStack,
                     seg: SegmentMeta) -> torch.Tensor:
    """Baseline: per-adapter masking over the whole batch, the way PEFT mixes adapters."""
    for s in seg.slots:
        r = w.ranks_host[s]
        if r == 0:
            continue
        mask = (seg.token_slots == s).to(x.dtype).unsqueeze(1)
        y += mask * ((x @ w.A[s, :r].T) @ w.B[s, :, :r].T) * w.scale[s]
    return y
