"""Run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, i.e. when kernels.triton_* is
first imported, so it is set here, before any test module of this directory imports them. With
CUDA the compiled kernels are tested instead (the interpreter would also mangle bf16). Triton is a hard
dependency (imported, never skipped); the ``@pytest.mark.gpu`` tests skip themselves without CUDA.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
