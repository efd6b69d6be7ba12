"""Composable sparse fine-tuning (Ansell et al., ACL 2022; LT-SFT), kind ``sft``.

An SFT is a sparse, real-valued difference on the backbone's *own* weights, ``theta = theta0 +
delta``, plus optional dense replacements (the seed code's ``abs``). SFTs compose by addition:
``theta0 + d_task + d_lang`` (serving/composition in ``adapters/runtime/compose.py``).

File tensors, for every touched backbone parameter ``P`` (its name in the backbone's state dict,
e.g. ``lm.enc_layers.0.self_attn.q.weight``): ``P.idx`` (int64 row-major flat indices, sorted,
unique, in range) and ``P.val`` (float32 values), or ``P.dense`` (the parameter's new value, its
shape). The config's ``entries`` maps each P to its entry count (-1 for a dense replacement), so
the file's tensors are checked like every kind's.

What a parameter's delta becomes at load time (``compile``):

| parameter | runtime form |
|---|---|
| a linear's weight (``...{q,k,v,o,wi,wo}.weight``) | sparse delta on that linear, ``y += x dW^T`` |
| the tied token embedding ``lm.tokens.weight`` | sparse delta on the input embeddings and the logits |
| a norm weight / bias, a linear bias | a per-slot vector, ``theta0 + delta`` |
| the visual embedding ``visual_embed.*`` | a per-slot visual embedding, ``theta0 + delta`` |

Other parameters (relative position biases, learned positions, the CLIP tower) are refused.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig
from petserve.adapters.runtime.forms import EMBEDDING_SITE, CompiledAdapter, SparseForm

DENSE = -1


class SFTConfig(KindConfig):
    entries: dict[str, int] = Field(default_factory=dict, description=(
        "touched backbone parameter -> number of changed entries (-1: a dense replacement)"))
    names: dict[str, str] = Field(default_factory=dict, description=(
        "entry -> its name in the file it was imported from (export-sft writes that name back)"))
    train_visual_embedding: bool = Field(False, description="always false: visual deltas are entries")

    @field_validator("train_visual_embedding")
    @classmethod
    def _no_visual_copy(cls, v: bool) -> bool:
        if v:
            raise ValueError("an sft adapter changes the visual embedding through its entries "
                             "(visual_embed.*), not a copy of it")
        return v

    @field_validator("entries")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [n for n, k in v.items() if k < DENSE]
        if bad:
            raise ValueError(f"entry count of {bad[0]!r} must be >= 0 (or -1 for dense)")
        return v


def targets(model) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Every backbone parameter an SFT may change: state-dict name -> (what, runtime name, shape),
    what = "linear" (site), "embed", "vector" (vector name) or "visual" (visual key)."""
    cached = getattr(model, "_sft_targets", None)
    if cached is not None:
        return cached
    by_id = {}
    for site, lin in model.lm.linear_sites().items():
        by_id[id(lin.weight)] = ("linear", site)
    for name, p in model.lm.vector_params().items():
        by_id[id(p)] = ("vector", name)
    out = {}
    for name, p in model.lm.named_parameters():
        hit = by_id.get(id(p))
        if hit is not None:
            out[f"lm.{name}"] = (*hit, tuple(p.shape))
    if model.lm.lm_head is None:          # tied: the embedding is the output projection too
        out["lm.tokens.weight"] = ("embed", EMBEDDING_SITE, tuple(model.lm.tokens.weight.shape))
    for key, t in model.visual_embed.state_dict().items():
        out[f"visual_embed.{key}"] = ("visual", key, tuple(t.shape))
    model._sft_targets = out
    return out


class SFT(AdapterKind):
    name = "sft"
    Config = SFTConfig
    description = "composable sparse fine-tuning: sparse deltas on the backbone's own weights"

    @classmethod
    def module_shapes(cls, cfg: SFTConfig, model):
        known = targets(model)
        shapes = {}
        for name, k in cfg.entries.items():
            if name not in known:
                raise ValueError(f"sft entry {name!r}: the backbone has no such parameter an sft "
                                 f"may change (e.g. {next(iter(known))!r}; relative position "
                                 "biases, learned positions and the CLIP tower are not supported)")
            if k == DENSE:
                shapes[f"{name}.dense"] = known[name][2]
            else:
                shapes[f"{name}.idx"] = (k,)
                shapes[f"{name}.val"] = (k,)
        return shapes

    @classmethod
    def trained_vectors(cls, cfg, model):
        return []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        """Zero deltas on ``entries[P]`` distinct random entries of each P (a support to train)."""
        known, params = targets(model), {}
        for name, k in cfg.entries.items():
            shape = known[name][2]
            if k == DENSE:
                params[f"{name}.dense"] = base_value(model, name).detach().clone().float()
                continue
            numel = math.prod(shape)
            params[f"{name}.idx"] = torch.randperm(numel, generator=gen)[:k].sort().values
            params[f"{name}.val"] = torch.zeros(k)
        return params

    @classmethod
    def check_params(cls, cfg: SFTConfig, params: dict[str, torch.Tensor], model) -> None:
        """Indices int64, sorted, unique and in range; values float32 (the backbone's dtype)."""
        known = targets(model)
        for name in cfg.entries:
            dense = params.get(f"{name}.dense")
            if dense is not None:
                if dense.dtype != torch.float32:
                    raise ValueError(f"{name}.dense has dtype {dense.dtype}; sft values are float32")
                continue
            idx, val = params[f"{name}.idx"], params[f"{name}.val"]
            if idx.dtype != torch.int64:
                raise ValueError(f"{name}.idx has dtype {idx.dtype}; indices are int64")
            if val.dtype != torch.float32:
                raise ValueError(f"{name}.val has dtype {val.dtype}; sft values are float32")
            numel = math.prod(known[name][2])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"{name}.idx has indices outside 0..{numel - 1}")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise ValueError(f"{name}.idx must be sorted and unique (flat row-major indices)")

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        known, out = targets(model), CompiledAdapter()
        visual = {}
        for name in cfg.entries:
            what, key, shape = known[name]
            dense = params.get(f"{name}.dense")
            if what in ("linear", "embed"):
                if dense is not None:
                    delta = dense.to(model.dtype) - base_value(model, name)
                    idx = delta.reshape(-1).nonzero().squeeze(1)
                    out.sparse[key] = SparseForm.from_flat(idx, delta.reshape(-1)[idx], shape)
                else:
                    out.sparse[key] = SparseForm.from_flat(params[f"{name}.idx"].to(model.device),
                                                           params[f"{name}.val"], shape)
                continue
            base = base_value(model, name)
            value = dense.to(base) if dense is not None else base.reshape(-1).index_put(
                (params[f"{name}.idx"].to(base.device),), params[f"{name}.val"].to(base),
                accumulate=True).view(shape)
            if what == "vector":
                out.vectors[key] = value
            else:
                visual[key] = value
        if visual:
            base_visual = model.visual_embed.state_dict()
            out.visual = {k: visual.get(k, v.detach()) for k, v in base_visual.items()}
        return out


def base_value(model, name: str) -> torch.Tensor:
    """The backbone's value of a state-dict parameter (detached)."""
    return model.get_parameter(name).detach()
