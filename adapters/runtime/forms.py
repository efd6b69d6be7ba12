"""The canonical runtime forms every adapter kind compiles into (docs/ARCHITECTURE.md, docs/METHODS.md §2).

The hot path knows only these: a low-rank delta on a linear, a sparse delta on a linear or on the
tied token embedding (composable sparse fine-tuning), a bottleneck residual (with an optional
VL-PET gate) on a sublayer or a linear, a conformer convolution block on a sublayer (PETL for
AST), per-slot vectors that replace backbone norms/biases, a per-slot visual embedding, prefix
vectors for the encoder input and a per-slot classification head (audio family).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

import torch


@dataclass
class LowRankForm:
    """``y += scale * (x @ A.T) @ B.T``; A: (r, d_in), B: (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclass
class BottleneckForm:
    """``h <- out_scale * G * (h + U act(D src + bd) + bu)``, src = x if from_input else h.

    D: (r, d_src); bd: (r,); U: (d, r); bu: (d,). gate: "none" | "small" | "middleX" | "middleY" |
    "large" with its tensors (see kernels.BottleneckStack).
    """

    D: torch.Tensor
    bd: torch.Tensor
    U: torch.Tensor
    bu: torch.Tensor
    from_input: bool = False
    gate: str = "none"
    out_scale: float = 1.0
    # on a pre-LN sublayer the gates read the residual stream x, not the normalised LN(x) (VL-PET)
    gate_reads_residual: bool = False
    gate_w: torch.Tensor | None = None     # (2d,) small | (d,) middleX
    gate_b: torch.Tensor | None = None     # () small / middleX
    gate_vec: torch.Tensor | None = None   # (d,) middleY
    gate_D: torch.Tensor | None = None     # (rg, d) large
    gate_bd: torch.Tensor | None = None
    gate_U: torch.Tensor | None = None     # (d, rg)
    gate_bu: torch.Tensor | None = None


@dataclass
class SparseForm:
    """``W <- W + dW`` with dW (d_out, d_in) given by COO entries: rows, cols (E,) int64 sorted
    by (row, col) and unique, vals (E,)."""

    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, int]

    @staticmethod
    def from_flat(idx: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> SparseForm:
        """Entries at row-major flat indices ``idx`` (sorted, unique) of a (d_out, d_in) matrix."""
        d_in = shape[1]
        return SparseForm(torch.div(idx, d_in, rounding_mode="floor"), idx % d_in, vals, shape)

    def dense(self) -> torch.Tensor:
        out = self.vals.new_zeros(self.shape)
        out[self.rows, self.cols] = self.vals
        return out


@dataclass
class ConformerForm:
    """``h <- h + W2 silu(BN(dwconv(glu(W1 src + b1)))) + b2`` over each row's tokens in order,
    src = x if from_input else h (kernels.conformer_residual has the exact semantics).

    W1: (2r, d_src), b1: (2r,); dw: (r, k) depthwise kernel (k odd, "same" padding), bdw: (r,);
    bn_*: (r,) BatchNorm affine and running statistics (serving uses the running ones);
    W2: (d, r), b2: (d,).
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
    from_input: bool = False
    bn_eps: float = 1e-5


@dataclass
class HeadForm:
    """A classification head on the pooled encoder output: ``logits = W f + b``; W: (C, d)."""

    W: torch.Tensor
    b: torch.Tensor


EMBEDDING_SITE = "embed"     # the tied token embedding: input embeddings and output logits


@dataclass
class CompiledAdapter:
    """One adapter in runtime form. Site names are the backbone's (``enc.3.self.q``, ``dec.0.ffn``).

    vectors: replacements for backbone vectors (``enc.0.self_norm.weight``, ``enc.0.self.q.bias``).
    visual: the full visual-embedding parameter set (the keys of the backbone's
        ``visual_embed.state_dict()``), or None = backbone's.
    prefix: (P, d) vectors prepended to the encoder's text, or None.
    """

    lowrank: dict[str, LowRankForm] = field(default_factory=dict)
    sparse: dict[str, SparseForm] = field(default_factory=dict)   # site or EMBEDDING_SITE
    bottleneck: dict[str, BottleneckForm] = field(default_factory=dict)
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    visual: dict[str, torch.Tensor] | None = None
    prefix: torch.Tensor | None = None
    conformer: dict[str, ConformerForm] = field(default_factory=dict)
    head: HeadForm | None = None

    def to(self, device=None, dtype=None) -> CompiledAdapter:
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        return CompiledAdapter(
            lowrank={k: LowRankForm(mv(f.A), mv(f.B), f.scale) for k, f in self.lowrank.items()},
            sparse={k: SparseForm(f.rows.to(device), f.cols.to(device), mv(f.vals), f.shape)
                    for k, f in self.sparse.items()},
            bottleneck={k: BottleneckForm(**{n: (mv(v) if isinstance(v, torch.Tensor) else v)
                                             for n, v in vars(f).items()})
                        for k, f in self.bottleneck.items()},
            vectors={k: mv(v) for k, v in self.vectors.items()},
            visual=None if self.visual is None else {k: mv(v) for k, v in self.visual.items()},
            prefix=mv(self.prefix),
            conformer={k: ConformerForm(**{n: (mv(v) if isinstance(v, torch.Tensor) else v)
                                           for n, v in vars(f).items()})
                       for k, f in self.conformer.items()},
            head=None if self.head is None else HeadForm(mv(self.head.W), mv(self.head.b)))


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensor storages reachable from ``objs`` (tensors, dicts, lists,
    dataclasses such as CompiledAdapter and its forms): what keeping them in memory costs, each
    storage counted once however many views share it."""
    seen: set[int] = set()
    total = 0
    todo = list(objs)
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
        elif is_dataclass(o) and not isinstance(o, type):
            todo.extend(getattr(o, f.name) for f in fields(o))
    return total
