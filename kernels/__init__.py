"""Grouped adapter ops. Each op has a torch reference beside it and picks Triton on CUDA tensors.

Dependencies point one way: ``serving -> adapters -> kernels``; this package imports torch (and
triton, lazily) only.
"""
import sys

if __name__ == "kernels":
    # This folder was found as the top-level `kernels`: the checkout root is on sys.path (pytest puts
    # its rootdir there, `python -m` its working directory), and it shadows Hugging Face's `kernels`
    # distribution, which transformers imports. The import is handed to the installed distribution;
    # petserve's own ops import as `petserve.kernels`. The imports below this block then only bind
    # names on this discarded module (petserve.kernels, loaded or found loaded, is the one in use).
    import importlib
    import os

    _root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _path = sys.path[:]
    sys.path[:] = [p for p in _path if os.path.realpath(p or os.curdir) != _root]
    del sys.modules[__name__]
    try:
        importlib.import_module("kernels")  # the import system returns what this leaves in sys.modules
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("no module named 'kernels' outside the petserve checkout (petserve's "
                                  "ops import as petserve.kernels)", name="kernels") from e
    finally:
        sys.path[:] = _path

from petserve.kernels.bottleneck import (
    act,
    bottleneck_residual,
    bottleneck_residual_reference,
    bottleneck_slot_written,
)
from petserve.kernels.conformer import conformer_reference, conformer_residual
from petserve.kernels.grouped_linear import grouped_linear, grouped_linear_reference
from petserve.kernels.lowrank import (
    add_lowrank,
    add_lowrank_loop,
    add_lowrank_reference,
    lowrank_slots_written,
)
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.sparse import add_sparse, add_sparse_gathered, add_sparse_reference
from petserve.kernels.stacks import (
    GATE_LARGE,
    GATE_MIDDLE_X,
    GATE_MIDDLE_Y,
    GATE_NAMES,
    GATE_NONE,
    GATE_SMALL,
    BottleneckStack,
    ConformerStack,
    LinearStack,
    LowRankStack,
    SparseStack,
)

__all__ = [
    "SegmentMeta", "LowRankStack", "BottleneckStack", "LinearStack", "SparseStack",
    "GATE_NONE", "GATE_SMALL", "GATE_MIDDLE_X", "GATE_MIDDLE_Y", "GATE_LARGE", "GATE_NAMES",
    "add_lowrank", "add_lowrank_reference", "add_lowrank_loop", "lowrank_slots_written",
    "bottleneck_slot_written",
    "bottleneck_residual", "bottleneck_residual_reference", "grouped_linear",
    "grouped_linear_reference", "act",
    "add_sparse", "add_sparse_reference", "add_sparse_gathered",
    "ConformerStack", "conformer_residual", "conformer_reference",
]
