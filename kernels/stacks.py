"""Slot-stacked weight containers: the arguments of the grouped ops.

Every tensor has a leading slot axis ``S``. A slot that holds no adapter for a given site has rank 0
and is skipped. Host-side copies of the small per-slot integers (ranks, flags) let the reference path
branch without device synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GATE_NONE, GATE_SMALL, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_LARGE = range(5)
GATE_NAMES = {"none": GATE_NONE, "small": GATE_SMALL, "middleX": GATE_MIDDLE_X,
              "middleY": GATE_MIDDLE_Y, "large": GATE_LARGE}


@dataclass
class LowRankStack:
    """``y += scale[s] * (x @ A[s, :r_s].T) @ B[s, :, :r_s].T`` for tokens of slot s.

    A: (S, R, d_in); B: (S, d_out, R); scale: (S,); ranks: (S,) int32; ranks_host: list of S ints.
    Rows ``r_s..R`` of A and columns of B are never read.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    ranks: torch.Tensor
    ranks_host: list[int]
    # values derived from the slots by their users (kernels.lowrank's row layout); whoever writes
    # slots call kernels.lowrank.lowrank_slots_written(stack, slots) afterwards
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class BottleneckStack:
    """Bottleneck residual with optional VL-PET gate, per slot s (see ``bottleneck_residual``).

    D: (S, R, d_src); bd: (S, R); U: (S, d, R); bu: (S, d); ranks / ranks_host as in LowRankStack.
    from_input_host: per slot, True = the adapter reads the sublayer input x (parallel), False = it
        reads the sublayer output h (sequential).
    gate_host: per slot, one of GATE_NONE.. GATE_LARGE. out_scale: (S,) factor on the gated output.
    gate_w: (S, 2 d) (small: w . [x ; h'], middleX: w[:d] . (x + h')); gate_b: (S,);
    gate_vec: (S, d) (middleY: G = 1 + g); gate_D: (S, Rg, d); gate_bd: (S, Rg); gate_U: (S, d, Rg);
    gate_bu: (S, d) (large: G = sigmoid(U_g act(D_g x + b_d) + b_u)); gate_ranks_host: list of S ints.
    Gate tensors may be None when no slot uses that gate.
    """

    D: torch.Tensor
    bd: torch.Tensor
    U: torch.Tensor
    bu: torch.Tensor
    ranks: torch.Tensor
    ranks_host: list[int]
    from_input_host: list[bool]
    gate_host: list[int]
    out_scale: torch.Tensor
    gate_w: torch.Tensor | None = None
    gate_b: torch.Tensor | None = None
    gate_vec: torch.Tensor | None = None
    gate_D: torch.Tensor | None = None
    gate_bd: torch.Tensor | None = None
    gate_U: torch.Tensor | None = None
    gate_bu: torch.Tensor | None = None
    gate_ranks_host: list[int] | None = None
    # per slot, True = on a pre-LN sublayer the caller passes the residual stream as x (VL-PET's
    # gates read it); the kernels only ever see the x they are given
    residual_host: list[bool] | None = None
    # values derived from the per-slot settings (kernels.bottleneck's configurations); whoever
    # writes a slot calls kernels.bottleneck.bottleneck_slot_written(stack, slot) afterwards
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class LinearStack:
    """``y = x @ W[s].T + b[s]`` per slot. W: (S, d_out, d_in); b: (S, d_out)."""

    W: torch.Tensor
    b: torch.Tensor


@dataclass
class SparseStack:
    """Per-slot sparse deltas on one linear weight (d_out, d_in): ``y[t] += x[t] @ dW[s].T`` for
    the tokens t of slot s, dW[s] given as COO entries (composable sparse fine-tuning).

    rows, cols: (E,) int64, vals: (E,) in the compute dtype; the entries of slot s are
    ``ptr_host[s] : ptr_host[s + 1]`` (a slot without a delta has an empty range), sorted by
    (row, col) within a slot, each (row, col) at most once per slot. ptr: (S + 1,) int64 on the
    device, the same offsets. d_out, d_in: the weight's shape. ``cache``: values derived from the
    entries by their users (a stack is rebuilt, never changed, when a slot changes).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    ptr: torch.Tensor
    ptr_host: list[int]
    d_out: int
    d_in: int
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def count(self, slot: int) -> int:
        return self.ptr_host[slot + 1] - self.ptr_host[slot]


@dataclass
class ConformerStack:
    """Per-slot conformer convolution blocks on one sublayer (PETL for AST; kernels.conformer).

    W1: (S, 2R, d_src); b1: (S, 2R); dw: (S, R, K) depthwise kernels, each slot's odd kernel
    centred in the odd K; bdw: (S, R); bn_weight / bn_bias / bn_mean / bn_var: (S, R); W2: (S, d, R);
    b2: (S, d). A slot of rank r < R holds zeros beyond r (they add exactly nothing).
    ranks_host, from_input_host: per slot, as in BottleneckStack; kernel_host: each slot's own
    kernel width; bn_eps: each slot's BatchNorm epsilon.
    batch_stats: training only: normalise with the batch's statistics and update bn_mean / bn_var
    in place (BatchNorm's train mode, momentum ``bn_momentum``); serving uses the stored ones.
    """

    W1: torch.Tensor
    b1: torch.Tensor
    dw: torch.Tensor
    bdw: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    bn_mean: torch.Tensor
    bn_var: torch.Tensor
    W2: torch.Tensor
    b2: torch.Tensor
    ranks_host: list[int]
    kernel_host: list[int]
    from_input_host: list[bool]
    bn_eps: list[float]
    batch_stats: bool = False
    bn_momentum: float = 0.1
