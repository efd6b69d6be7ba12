"""Pick the implementation of an op: Triton for CUDA tensors, the torch reference otherwise.

``PETSERVE_KERNELS=reference`` forces the reference everywhere (debugging, baselines);
``PETSERVE_KERNELS=triton`` forces Triton even on CPU tensors (tests under TRITON_INTERPRET=1).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - import failure depends on the platform
        return False
    return True


def records_grad(*tensors) -> bool:
    """True when autograd must record an op on these tensors (training): the Triton kernels have no
    backward, so such calls take the differentiable torch reference."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def use_triton(t: torch.Tensor, *grad_inputs) -> bool:
    """Triton for ``t`` (see module doc), unless autograd records the op on ``grad_inputs``."""
    if grad_inputs and records_grad(*grad_inputs):
        return False
    mode = os.environ.get("PETSERVE_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        return triton_available()
    return t.is_cuda and triton_available()
