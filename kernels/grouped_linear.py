"""Per-slot dense linear map (used for the per-adapter visual embedding)."""
from __future__ import annotations

import torch

from petserve.kernels.dispatch import use_triton
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import LinearStack


def grouped_linear(x: torch.Tensor, w: LinearStack, seg: SegmentMeta) -> torch.Tensor:
    """Return ``y`` with ``y[t] = x[t] @ w.W[s].T + w.b[s]`` (s = seg.token_slots[t]).

    x: (N, d_in) -> y: (N, d_out), a new tensor. Tokens with slot -1 get zeros.
    CUDA tensors take one Triton launch for every slot (no Python loop over slots), unless autograd
    must record the op (training), which takes the differentiable reference.
    """
    if use_triton(x, x, w.W, w.b):
        from petserve.kernels.triton_grouped_linear import grouped_linear_triton
        return grouped_linear_triton(x, w, seg)
    return grouped_linear_reference(x, w, seg)


def grouped_linear_reference(x: torch.Tensor, w: LinearStack, seg: SegmentMeta) -> torch.Tensor:
    """Torch reference of :func:`grouped_linear`: one GEMM per slot present."""
    y = x.new_zeros(x.shape[0], w.W.shape[1])
    for s, idx in seg.segments():
        ys = torch.nn.functional.linear(x.index_select(0, idx), w.W[s], w.b[s])
        y.index_copy_(0, idx, ys)
    return y
