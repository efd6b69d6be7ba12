"""Adapters composed per request: one CompiledAdapter that applies every member's changes.

A member's changes to the backbone's own parameters are differences from theta0 and compose by
addition, in any order: sparse deltas (SFT) on a linear or on the tied embedding (entries summed
where they overlap), low-rank deltas (LoRA: ranks concatenated, scales folded into B), vectors
and the visual embedding (``theta0 + sum_i (theta_i - theta0)``). Modules the backbone does not
have (a bottleneck or VL-PET module at a site, prompt vectors) do not add up: at most one member
may bring one per site, else :class:`CompositionError` names the pair.
"""
from __future__ import annotations

import torch

from petserve.adapters.runtime.forms import CompiledAdapter, LowRankForm, SparseForm


class CompositionError(ValueError):
    """Two members that cannot be composed; the message names them and the site."""


def compose(members: list[tuple[str, CompiledAdapter]], model) -> CompiledAdapter:
    """``members``: (name, compiled) in request order. The result is the same for any order."""
    base_vectors = {n: p.detach() for n, p in model.lm.vector_params().items()}
    base_visual = {k: v.detach() for k, v in model.visual_embed.state_dict().items()}
    out, owner, sparse = CompiledAdapter(), {}, {}
    for name, c in members:
        for site, f in c.lowrank.items():
            out.lowrank[site] = _join_lowrank(out.lowrank.get(site), f)
        for site, f in c.sparse.items():
            sparse.setdefault(site, []).append(f)
        for site, f in c.bottleneck.items():
            _claim(owner, f"a module on {site}", name)
            out.bottleneck[site] = f
        if c.prefix is not None:
            _claim(owner, "prompt vectors", name)
            out.prefix = c.prefix
        for k, v in c.vectors.items():
            base = base_vectors[k].to(v)
            out.vectors[k] = out.vectors.get(k, base) + (v - base)
        if c.visual is not None:
            current = out.visual or {k: b.to(c.visual[k]) for k, b in base_visual.items()}
            out.visual = {k: current[k] + (c.visual[k] - base_visual[k].to(c.visual[k]))
                          for k in current}
    out.sparse = {site: fs[0] if len(fs) == 1 else add_sparse_forms(*fs) for site, fs in sparse.items()}
    return out


def _claim(owner: dict, what: str, name: str) -> None:
    if what in owner:
        raise CompositionError(f"adapters {owner[what]!r} and {name!r} both bring {what}; such "
                               "modules do not add up, so at most one member may have them")
    owner[what] = name


def _join_lowrank(a: LowRankForm | None, b: LowRankForm) -> LowRankForm:
    """``a + b`` as one low-rank form: ``[B_a s_a | B_b s_b] [A_a ; A_b]``, scale 1."""
    if a is None:
        return b
    return LowRankForm(torch.cat([a.A, b.A]), torch.cat([a.B * a.scale, b.B * b.scale], 1), 1.0)


def add_sparse_forms(*forms: SparseForm) -> SparseForm:
    """The sum of ``forms`` (one matrix's deltas) with entries at the same position summed;
    sorted by (row, col), unique. One sort for all of them."""
    d_in = forms[0].shape[1]
    flat = torch.cat([f.rows * d_in + f.cols for f in forms])
    vals = torch.cat([f.vals.to(forms[0].vals) for f in forms])
    uniq, where = torch.unique(flat, return_inverse=True)
    summed = vals.new_zeros(uniq.shape[0]).index_add(0, where, vals)
    return SparseForm.from_flat(uniq, summed, forms[0].shape)
