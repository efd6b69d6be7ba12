"""Grouped low-rank delta (LoRA) over a batch of tokens that use different adapters."""
from __future__ import annotations

import torch

from kernels.dispatch import use_triton
from kernels.segments import SegmentMeta
from kernels.stacks import LowRankStack


def add_lowrank(y: torch.Tensor, x: torch.Tensor, w: LowRankStack, seg: SegmentMeta) -> torch.Tensor:
    """Add each token's low-rank delta to ``y`` in place and return ``y``.

    Semantics (s = seg.token_slots[t], r = w.ranks[s])::

        for t in range(N):
            if s >= 0 and r > 0:
                y[t] += w.scale[s] * (x[t] @ w.A[s, :r].T) @ w.B[s, :, :r].T

    x: (N, d_in); y: (N, d_out), written in place. Tokens with slot -1, and slots of rank 0, are
    left untouched. Compute is proportional to each slot's own rank, not the largest in the stack.
    CUDA tensors take the Triton kernels unless autograd records the op (training).
    """
    if not seg.slots:
        return y
    if use_triton(x, x, y, w.A, w.B, w.scale):
        from kernels.triton_lowrank import add_lowrank_triton
        return add_lowrank_triton(y, x, w, seg)
    return add_lowrank_reference(y, x, w, seg)


def add_lowrank_reference(y: torch.Tensor, x: torch.Tensor, w: LowRankStack,
                          seg: SegmentMeta) -> torch.Tensor:
    """Torch reference of :func:`add_lowrank`: one pair of GEMMs per slot present."""
    for s, idx in seg.segments():
        r = w.ranks_host[s]
        if r == 0:
            continue
        xs = x.index_select(0, idx)
        delta = (xs @ w.A[s, :r].T) @ w.B[s, :, :r].T
        # A slot's token indices are unique, so gather-add-copy equals index_add_ and avoids its
        # multi-threaded CPU kernel, which stalls on busy machines.
        y.index_copy_(0, idx, y.index_select(0, idx) + delta * w.scale[s].to(delta.dtype))
    return y


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
