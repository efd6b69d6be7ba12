"""Per-slot dense linear map (used for the per-adapter visual embedding)."""
from __future__ import annotations

import torch

from kernels.segments import SegmentMeta
from kernels.stacks import LinearStack


def grouped_linear(x: torch.Tensor, w: LinearStack, seg: SegmentMeta) -> torch.Tensor:
    """Return ``y`` with ``y[t] = x[t] @ w.W[s].T + w.b[s]`` (s = seg.token_slots[t]).

    x: (N, d_in) -> y: (N, d_out), a new tensor. Tokens with slot -1 get zeros.
    The reference runs one GEMM per slot present; it is also the CUDA path (cuBLAS GEMMs of whole
    segments are near peak for the few distinct visual embeddings a batch holds).
    """
    y = x.new_zeros(x.shape[0], w.W.shape[1])
    for s, idx in seg.segments():
        ys = torch.nn.functional.linear(x.index_select(0, idx), w.W[s], w.b[s])
        y.index_copy_(0, idx, ys)
    return y
