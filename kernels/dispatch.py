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


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("PETSERVE_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        return triton_available()
    return t.is_cuda and triton_available()
