"""StepContext: how a layer applies whatever adapters the rows of this step use.

Layers never launch kernels or look at slots themselves; they call these methods with a site
name, and the context picks the adapter weights (if any) and the grouped ``kernels`` op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from petserve.adapters.runtime.forms import EMBEDDING_SITE
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import NoAdapters, RuntimeWeights
from petserve.kernels import (
    SparseStack,
    add_lowrank,
    add_sparse,
    bottleneck_residual,
    conformer_residual,
    grouped_linear,
)


@dataclass
class StepContext:
    weights: RuntimeWeights
    meta: BatchMeta
    lowrank_dropout: float = 0.0    # training only: dropout on the low-rank branch's input (LoRA)

    @classmethod
    def backbone_only(cls, batch_size: int, device) -> StepContext:
        return cls(NoAdapters(), BatchMeta.build([-1] * batch_size, 0, device))

    def linear(self, site: str, mod: torch.nn.Linear, x: torch.Tensor, stream: str) -> torch.Tensor:
        """``mod(x)`` plus each row's adapter on this linear. x: (B, T, d_in) -> (B, T, d_out).

        Per-slot bias (trainable biases), low-rank delta (LoRA), sparse delta (SFT) and a
        bottleneck on the linear's output reading its input (VL-PET's value adapter) are applied
        when some slot has them.
        """
        bias = self.weights.vector(f"{site}.bias") if mod.bias is not None else None
        y = F.linear(x, mod.weight, mod.bias if bias is None else None)
        if bias is not None:
            y = y + bias[self.meta.vector_index()].unsqueeze(1)
        lowrank = self.weights.lowrank(site)
        sparse = self.weights.sparse(site)
        bneck = self.weights.bottleneck(site)
        if lowrank is None and bneck is None and sparse is None:
            return y
        B, T, _ = x.shape
        seg = self.meta.seg(stream, T)
        x2, y2 = x.reshape(B * T, -1), y.reshape(B * T, -1)
        if lowrank is not None:
            xl = F.dropout(x2, self.lowrank_dropout) if self.lowrank_dropout > 0 else x2
            y2 = add_lowrank(y2, xl, lowrank, seg)
        if sparse is not None:
            y2 = add_sparse(y2, x2, sparse, seg)
        if bneck is not None:
            y2 = bottleneck_residual(y2, x2, bneck, seg)
        return y2.view(B, T, -1)

    def embed(self, ids: torch.Tensor, tokens: torch.nn.Embedding, stream: str) -> torch.Tensor:
        """Token embeddings (B, T, d) of ids (B, T), with each row's sparse delta on the tied
        embedding (an SFT's changed rows). ``stream`` names the block for its token grouping:
        "text" (the encoder's text), "visual" (object-order rows), "dec"."""
        e = tokens(ids)
        delta = self.weights.sparse(EMBEDDING_SITE)
        if delta is None:
            return e
        B, T = ids.shape
        seg = self.meta.seg(stream, T)
        return e + embedding_rows(ids.reshape(-1), delta, seg).view(B, T, -1).to(e.dtype)

    def logits(self, x: torch.Tensor, weight: torch.Tensor, stream: str) -> torch.Tensor:
        """``x @ weight.T`` over the vocabulary, with the rows' sparse deltas on the tied
        embedding (a changed embedding row changes that token's logit too)."""
        y = F.linear(x, weight)
        delta = self.weights.sparse(EMBEDDING_SITE)
        if delta is None:
            return y
        B, T, _ = x.shape
        return add_sparse(y.reshape(B * T, -1), x.reshape(B * T, -1), delta,
                          self.meta.seg(stream, T)).view(B, T, -1)

    def norm(self, site: str, mod: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``mod(x)`` with each row's own norm weight/bias when some slot trains this norm."""
        w = self.weights.vector(f"{site}.weight")
        b = self.weights.vector(f"{site}.bias")
        if w is None and b is None:
            return mod(x)
        idx = self.meta.vector_index()
        # A kind may train only the bias (LoRA's "all biases") or only the weight.
        w = mod.weight if w is None else w[idx].unsqueeze(1)
        b = getattr(mod, "bias", None) if b is None else b[idx].unsqueeze(1)
        return mod.forward_with(x, w, b)

    def sublayer(self, site: str, h: torch.Tensor, x: torch.Tensor, stream: str,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        """Bottleneck module on a sublayer: h = F(x) is the sublayer output, x its input; on a
        pre-LN sublayer ``residual`` is the stream before the norm, which rows whose adapter gates
        from it (VL-PET) get as their x. A conformer block on the site (PETL for AST) reads the
        same x (parallel) or h (sequential), over each row's tokens in order."""
        bneck = self.weights.bottleneck(site)
        conformer = self.weights.conformer(site)
        if conformer is not None:
            valid = self.meta.enc_valid if stream == "enc" else None
            h = conformer_residual(h, x, valid, conformer, self.meta.slots_host())
        if bneck is None:
            return h
        if residual is not None and bneck.residual_host and any(bneck.residual_host):
            rows = self.meta.rows_of(bneck.residual_host)
            x = residual if rows is True else torch.where(rows, residual, x)
        B, T, d = h.shape
        out = bottleneck_residual(h.reshape(B * T, d), x.reshape(B * T, -1), bneck,
                                  self.meta.seg(stream, T))
        return out.view(B, T, d)

    def head(self, pooled: torch.Tensor) -> torch.Tensor | None:
        """(B, C_max) logits of each row's classification head on its pooled features (B, d), in
        one grouped matmul; None when no slot has a head. A row's classes are the first
        ``weights.head().classes_host[slot]`` columns."""
        stack = self.weights.head()
        if stack is None:
            return None
        return grouped_linear(pooled, stack.linear, self.meta.seg("head", 1))

    def select(self, rows: torch.Tensor) -> StepContext:
        return StepContext(self.weights, self.meta.select(rows), self.lowrank_dropout)


def embedding_rows(ids: torch.Tensor, delta: SparseStack, seg) -> torch.Tensor:
    """(N, d) rows of each token's slot delta dE[s] at its id (zero where its slot changed no
    such row): a slot's changed rows are densified once per stack, then looked up (keeps
    autograd: a training step builds its stack afresh)."""
    out = delta.vals.new_zeros(ids.shape[0], delta.d_in)
    for s, idx in seg.segments():
        if delta.count(s) == 0:
            continue
        changed, table = _changed_rows(delta, s)
        tok = ids.index_select(0, idx)
        pos = torch.searchsorted(changed, tok).clamp_max(changed.shape[0] - 1)
        hit = (changed[pos] == tok).unsqueeze(1).to(table.dtype)
        out = out.index_add(0, idx, table[pos] * hit)
    return out


def _changed_rows(delta: SparseStack, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted changed rows, their dense (rows, d_in) deltas) of slot ``s``, kept on the stack."""
    got = delta.cache.get(("rows", s))
    if got is None:
        lo, hi = delta.ptr_host[s], delta.ptr_host[s + 1]
        rows, cols, vals = delta.rows[lo:hi], delta.cols[lo:hi], delta.vals[lo:hi]
        changed, where = torch.unique(rows, return_inverse=True)
        table = vals.new_zeros(changed.shape[0], delta.d_in).index_put((where, cols), vals,
                                                                       accumulate=True)
        got = delta.cache[("rows", s)] = (changed, table)
    return got
