"""Grouped low-rank delta (LoRA) over a batch of tokens that use different adapters."""
from __future__ import annotations

import itertools

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
    CUDA tensors take the Triton kernels unless autograd records the op (training), which takes
    :func:`add_lowrank_reference`. Elsewhere, from the stack's :class:`RowLayout`:
    :func:`add_lowrank_one` when one slot has every token (one GEMM pair, nothing copied),
    :func:`add_lowrank_gathered` when the rows are spread over several slots (one bmm pair for
    the whole step instead of one GEMM pair per slot, whose per-call overhead dominates at a few
    tokens per slot), else the reference (few slots with many rows each, where a weight copy per
    row would cost more than the GEMMs).
    """
    if not seg.slots:
        return y
    if use_triton(x, x, y, w.A, w.B, w.scale):
        from petserve.kernels.triton_lowrank import add_lowrank_triton
        return add_lowrank_triton(y, x, w, seg)
    if records_grad(x, y, w.A, w.B, w.scale):
        return add_lowrank_reference(y, x, w, seg)
    if len(seg.slots) == 1 and seg.counts[0] == seg.num_tokens:
        return add_lowrank_one(y, x, w, seg.slots[0])
    if prefers_gathered(seg, w):
        return add_lowrank_gathered(y, x, w, seg)
    return add_lowrank_reference(y, x, w, seg)


def add_lowrank_one(y: torch.Tensor, x: torch.Tensor, w: LowRankStack, slot: int) -> torch.Tensor:
    """:func:`add_lowrank` when every token uses ``slot``: ``y += (x @ a.T) @ b`` in place, a
    and b the slot's entries of the :class:`RowLayout` (scale folded into b)."""
    layout = row_layout(w)
    return y.addmm_(x.mm(layout.a[slot].T), layout.b[slot])


def prefers_gathered(seg: SegmentMeta, w: LowRankStack) -> bool:
    """Whether :func:`add_lowrank_gathered` beats the per-slot reference on the CPU
    (:func:`gather_pays` with rank * (d_in + d_out) elements copied per row, the stack's widest
    rank). Decode steps and prefills of rows spread over several adapters take it;
    single-adapter batches take the reference."""
    if len(seg.slots) < GATHER_MIN_SEGMENTS:
        return False
    return gather_pays(seg, seg.num_units, w.A.shape[1] * (w.A.shape[2] + w.B.shape[1]))


def gather_pays(seg: SegmentMeta, copies: int, elements_per_copy: int,
                per_segment: int = GATHER_ELEMENTS_PER_SEGMENT) -> bool:
    """At least GATHER_MIN_SEGMENTS slots present, and the weights a gathered path would copy
    (``copies`` times ``elements_per_copy``) under ``per_segment`` per slot present."""
    n = len(seg.slots)
    return n >= GATHER_MIN_SEGMENTS and copies * elements_per_copy <= per_segment * n


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
    """:func:`add_lowrank` as one pair of batched matmuls over the step's rows, whatever their
    adapters and ranks::

        a, b = RowLayout.a[u], RowLayout.b[u]        # u: each row's slot (-1: the zero entry)
        y.view(B, T, d_out) += bmm(bmm(x.view(B, T, d_in), a.mT), b)

    Each row gets its own copy of its slot's weights (B * w * (d_in + d_out) elements, w the
    widest rank loaded), so this pays off only when the rows are spread over several slots (see
    :func:`prefers_gathered`). A slot of smaller rank is zero-padded and a row without an adapter
    reads zeros: both add exactly nothing, so there is one Python step per call, none per slot.
    The copies are kept on ``seg`` for the steps that share it (:meth:`SegmentMeta.kept`); the
    slot pool never rewrites a slot that rows in flight use.
    """
    a, b = gathered_weights(w, seg)
    rows, per_row = seg.num_units, seg.num_tokens // max(1, seg.num_units)
    # (T, d_in) @ (d_in, w) against A's own (w, d_in) layout: torch's CPU bmm is faster with
    # the transposed view here, and with b contiguous as (w, d_out) (measured, d 64 and 512)
    h = torch.bmm(x.view(rows, per_row, -1), a.transpose(1, 2))      # (B, T, w)
    y.view(rows, per_row, -1).baddbmm_(h, b)                          # in place
    return y


def gathered_weights(w: LowRankStack, seg: SegmentMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's rows' (A (B, w, d_in), scale * B^T (B, w, d_out)) from the stack's
    :class:`RowLayout`, kept on ``seg`` unless larger than GATHER_CACHE_ELEMENTS."""
    layout = row_layout(w)

    def build():
        units = seg.unit_index(layout.none)
        a, b = layout.a.index_select(0, units), layout.b.index_select(0, units)
        return (a, b), a.numel() + b.numel()
    return seg.kept("lowrank_weights", w, (id(layout), layout.version), build,
                    GATHER_CACHE_ELEMENTS)


_LAYOUT_VERSIONS = itertools.count()


def lowrank_slots_written(w: LowRankStack, slots: list[int]) -> None:
    """``slots``' A, B, scale or rank were just written: values derived from ``w`` follow."""
    layout = w.cache.get("rows")
    if layout is not None:
        layout.update(w, slots)


class RowLayout:
    """A stack's weights laid out for :func:`add_lowrank_gathered`, kept in ``w.cache`` and
    updated for the slots written (:func:`lowrank_slots_written`).

    a: (S + 1, width, d_in), A[s, :r_s] zero-padded to ``width`` (the widest rank when built);
    b: (S + 1, width, d_out), ``scale[s] * B[s, :, :r_s].T`` zero-padded; entry ``none`` = S is
    all zeros (rows without an adapter). A stack whose tensors were replaced (grown), or a slot
    wider than ``width``, builds a new layout.
    """

    def __init__(self, w: LowRankStack):
        S, _, d_in = w.A.shape
        self.width = max(1, max(w.ranks_host, default=0))
        self.none, self.version = S, next(_LAYOUT_VERSIONS)
        self.stamp = (w.A.data_ptr(), w.B.data_ptr(), w.scale.data_ptr())
        self.a = w.A.new_zeros(S + 1, self.width, d_in)
        self.b = w.B.new_zeros(S + 1, self.width, w.B.shape[1])
        self._write(w, None)

    def _write(self, w: LowRankStack, idx: torch.Tensor | None) -> None:
        """The entries of slots ``idx`` (an index tensor; None: every slot) from the stack."""
        width = self.width
        A, B, scale, ranks = w.A.narrow(1, 0, width), w.B.narrow(2, 0, width), w.scale, w.ranks
        if idx is not None:
            A, B, scale, ranks = (t.index_select(0, idx) for t in (A, B, scale, ranks))
        kept = (torch.arange(width, device=A.device) < ranks.view(-1, 1)).unsqueeze(-1)
        a = torch.where(kept, A, 0)                 # where, not *: past a slot's rank may lie
        b = torch.where(kept, (B * scale.to(B.dtype).view(-1, 1, 1)).transpose(1, 2), 0)  # anything
        if idx is None:
            self.a[:self.none], self.b[:self.none] = a, b
        else:
            self.a.index_copy_(0, idx, a)
            self.b.index_copy_(0, idx, b)

    def valid_for(self, w: LowRankStack) -> bool:
        return self.stamp == (w.A.data_ptr(), w.B.data_ptr(), w.scale.data_ptr())

    def _write_one(self, w: LowRankStack, s: int) -> None:
        """:meth:`_write` of one slot with plain views (a third of the ops of the indexed form)."""
        r = w.ranks_host[s]
        if r < self.width:
            self.a[s, r:].zero_()
            self.b[s, r:].zero_()
        if r:
            self.a[s, :r].copy_(w.A[s, :r])
            torch.mul(w.B[s, :, :r].mT, w.scale[s].to(w.B.dtype), out=self.b[s, :r])

    def update(self, w: LowRankStack, slots: list[int]) -> None:
        if not self.valid_for(w) or max(w.ranks_host[s] for s in slots) > self.width:
            w.cache.pop("rows", None)        # rebuilt on its next use
            return
        if len(slots) == 1:
            self._write_one(w, slots[0])
        else:
            self._write(w, torch.tensor(slots, dtype=torch.long, device=w.A.device))
        self.version = next(_LAYOUT_VERSIONS)


def row_layout(w: LowRankStack) -> RowLayout:
    layout = w.cache.get("rows")
    if layout is None or not layout.valid_for(w):
        layout = w.cache["rows"] = RowLayout(w)
    return layout


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
