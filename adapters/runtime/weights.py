"""Where layers find adapter weights: the RuntimeWeights interface and its simple implementations.

Layers ask by site name each step; ``None`` means no row of any slot adapts that site, and the layer
runs the plain backbone path. :class:`adapters.runtime.bank.SlotBank` is the serving
implementation; :class:`SingleAdapterWeights` wraps one adapter's compiled forms differentiably for
training (slot 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter, ConformerForm, SparseForm
from petserve.kernels import (
    GATE_NAMES,
    BottleneckStack,
    ConformerStack,
    LinearStack,
    LowRankStack,
    SparseStack,
)


@dataclass
class VisualStack:
    """Per-slot visual embedding; index ``num_slots`` holds the backbone's own."""

    feat: LinearStack                # W: (S+1, d, f)
    feat_norm_w: torch.Tensor        # (S+1, d)
    feat_norm_b: torch.Tensor | None  # None: RMS norms (T5), no bias
    box: LinearStack                 # W: (S+1, d, 5)
    box_norm_w: torch.Tensor
    box_norm_b: torch.Tensor | None
    img_order: torch.Tensor          # (S+1, n_images, d)


@dataclass
class HeadStack:
    """Per-slot classification heads: W (S, C_max, d), b (S, C_max); classes_host[s] = C of slot s
    (0 = none). Logits beyond a slot's C are zeros and never read."""

    linear: LinearStack
    classes_host: list[int]


@dataclass
class PrefixStack:
    """Per-slot prefix vectors: (S, P_max, d) and each slot's length (0 = no prefix)."""

    vectors: torch.Tensor
    lengths_host: list[int]


class RuntimeWeights(Protocol):
    num_slots: int

    def lowrank(self, site: str) -> LowRankStack | None: ...
    def sparse(self, site: str) -> SparseStack | None: ...
    def bottleneck(self, site: str) -> BottleneckStack | None: ...
    def vector(self, name: str) -> torch.Tensor | None: ...
    def visual(self) -> VisualStack | None: ...
    def prefix(self) -> PrefixStack | None: ...
    def conformer(self, site: str) -> ConformerStack | None: ...
    def head(self) -> HeadStack | None: ...


class NoAdapters:
    """The frozen backbone alone."""

    num_slots = 0

    def lowrank(self, site):
        return None

    def sparse(self, site):
        return None

    def bottleneck(self, site):
        return None

    def vector(self, name):
        return None

    def visual(self):
        return None

    def prefix(self):
        return None

    def conformer(self, site):
        return None

    def head(self):
        return None


def bottleneck_stack_of_one(f: BottleneckForm) -> BottleneckStack:
    """A one-slot BottleneckStack made of the form's own tensors (keeps autograd)."""
    def one(t):
        return None if t is None else t.unsqueeze(0)
    gate_b = None if f.gate_b is None else f.gate_b.reshape(1)
    return BottleneckStack(
        D=one(f.D), bd=one(f.bd), U=one(f.U), bu=one(f.bu),
        ranks=torch.tensor([f.D.shape[0]], dtype=torch.int32, device=f.D.device),
        ranks_host=[f.D.shape[0]], from_input_host=[f.from_input], gate_host=[GATE_NAMES[f.gate]],
        out_scale=torch.tensor([f.out_scale], dtype=f.D.dtype, device=f.D.device),
        gate_w=_pad_gate_w(f), gate_b=gate_b, gate_vec=one(f.gate_vec), gate_D=one(f.gate_D),
        gate_bd=one(f.gate_bd), gate_U=one(f.gate_U), gate_bu=one(f.gate_bu),
        gate_ranks_host=[0 if f.gate_D is None else f.gate_D.shape[0]],
        residual_host=[f.gate_reads_residual])


def _pad_gate_w(f: BottleneckForm):
    if f.gate_w is None:
        return None
    d = f.U.shape[0]
    w = f.gate_w if f.gate_w.shape[0] == 2 * d else torch.cat([f.gate_w, f.gate_w.new_zeros(d)])
    return w.unsqueeze(0)


class SingleAdapterWeights:
    """One adapter in slot 0, built from tensors that may require grad (training, tests).

    Vector and visual stacks hold [adapter ; backbone] so rows of slot -1 still see the backbone.
    ``batch_stats``: conformer blocks normalise with the batch's statistics and update the stored
    running ones in place (training; BatchNorm's train mode).
    """

    num_slots = 1

    def __init__(self, compiled: CompiledAdapter, base_vectors: dict[str, torch.Tensor],
                 base_visual: dict[str, torch.Tensor], batch_stats: bool = False):
        self.c, self.batch_stats = compiled, batch_stats
        self._vectors = {n: torch.stack([v, base_vectors[n].to(v)]) for n, v in compiled.vectors.items()}
        self._visual = None
        if compiled.visual is not None:
            pair = {k: torch.stack([compiled.visual[k], base_visual[k].to(compiled.visual[k])])
                    for k in compiled.visual}
            self._visual = visual_stack_from(pair)

    def lowrank(self, site):
        f = self.c.lowrank.get(site)
        if f is None:
            return None
        r = f.A.shape[0]
        return LowRankStack(A=f.A.unsqueeze(0), B=f.B.unsqueeze(0),
                            scale=torch.tensor([f.scale], dtype=f.A.dtype, device=f.A.device),
                            ranks=torch.tensor([r], dtype=torch.int32, device=f.A.device),
                            ranks_host=[r])

    def sparse(self, site):
        f = self.c.sparse.get(site)
        return None if f is None else sparse_stack_of([f])

    def bottleneck(self, site):
        f = self.c.bottleneck.get(site)
        return None if f is None else bottleneck_stack_of_one(f)

    def vector(self, name):
        return self._vectors.get(name)

    def visual(self):
        return self._visual

    def prefix(self):
        p = self.c.prefix
        return None if p is None else PrefixStack(p.unsqueeze(0), [p.shape[0]])

    def conformer(self, site):
        f = self.c.conformer.get(site)
        return None if f is None else conformer_stack_of_one(f, self.batch_stats)

    def head(self):
        f = self.c.head
        if f is None:
            return None
        return HeadStack(LinearStack(f.W.unsqueeze(0), f.b.unsqueeze(0)), [f.W.shape[0]])


def conformer_stack_of_one(f: ConformerForm, batch_stats: bool = False) -> ConformerStack:
    """A one-slot ConformerStack of the form's own tensors (keeps autograd; with batch_stats the
    running statistics it updates are the form's)."""
    r, k = f.dw.shape
    one = lambda t: t.unsqueeze(0)  # noqa: E731
    return ConformerStack(one(f.W1), one(f.b1), one(f.dw), one(f.bdw), one(f.bn_weight),
                          one(f.bn_bias), one(f.bn_mean), one(f.bn_var), one(f.W2), one(f.b2),
                          [r], [k], [f.from_input], [f.bn_eps], batch_stats)


def sparse_stack_of(forms: list[SparseForm | None]) -> SparseStack:
    """A SparseStack with slot s holding ``forms[s]`` (None: no delta); keeps autograd."""
    present = [f for f in forms if f is not None]
    shape = present[0].shape
    ptr = [0]
    for f in forms:
        ptr.append(ptr[-1] + (0 if f is None else f.rows.shape[0]))
    cat = lambda name: torch.cat([getattr(f, name) for f in present])  # noqa: E731
    return SparseStack(cat("rows"), cat("cols"), cat("vals"),
                       torch.tensor(ptr, dtype=torch.int64, device=present[0].rows.device), ptr,
                       shape[0], shape[1])


def visual_stack_from(t: dict[str, torch.Tensor]) -> VisualStack:
    """VisualStack from stacked visual-embedding tensors keyed like ``VisualEmbedding``'s state."""
    return VisualStack(
        feat=LinearStack(t["feat.weight"], t["feat.bias"]),
        feat_norm_w=t["feat_norm.weight"], feat_norm_b=t.get("feat_norm.bias"),
        box=LinearStack(t["box.weight"], t["box.bias"]),
        box_norm_w=t["box_norm.weight"], box_norm_b=t.get("box_norm.bias"),
        img_order=t["img_order.weight"])
