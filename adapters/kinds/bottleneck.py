"""Bottleneck adapters (Houlsby et al.; Pfeiffer et al.; VL-Adapter's setting), kind ``adapter``.

``h <- h + U act(D h + b_d) + b_u`` on a sublayer's output, before dropout / residual / LayerNorm.
Houlsby: after self-attention and FFN in the encoder, after self-attention, cross-attention and FFN
in the decoder. Pfeiffer: after the FFN only. Parallel: the adapter reads the sublayer's input,
``y = x + F(x) + A(x)``. Reduction factor 8 (768 -> 96). Also trains every LayerNorm and the visual
embedding. Initialisation: ``nn.Linear``'s default, as VL-Adapter's code (so not an identity);
``zero_init_up`` makes a fresh adapter an exact identity.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from adapters.kinds.base import AdapterKind, KindConfig, all_norms, layer_sites, linear_init
from adapters.runtime.forms import BottleneckForm, CompiledAdapter


class BottleneckConfig(KindConfig):
    reduction_factor: int = Field(8, ge=1, description="d_model / bottleneck width")
    dim: int | None = Field(None, ge=1, description="bottleneck width (overrides reduction_factor)")
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    mode: Literal["sequential", "parallel"] = "sequential"
    train_norms: bool = True
    zero_init_up: bool = False


class Bottleneck(AdapterKind):
    name = "adapter"
    Config = BottleneckConfig
    description = "bottleneck adapter (Houlsby / Pfeiffer placement, sequential or parallel)"

    @classmethod
    def width(cls, cfg: BottleneckConfig, model) -> int:
        d = model.cfg.lm.d_model
        if cfg.dim is None and d % cfg.reduction_factor:
            raise ValueError(f"reduction_factor {cfg.reduction_factor} does not divide d_model {d}")
        return cfg.dim or d // cfg.reduction_factor

    @classmethod
    def sites(cls, cfg: BottleneckConfig, model) -> list[str]:
        if cfg.placement == "pfeiffer":
            return layer_sites(model, "enc", ("ffn",)) + layer_sites(model, "dec", ("ffn",))
        return layer_sites(model, "enc", ("self", "ffn")) + layer_sites(model, "dec", ("self", "cross", "ffn"))

    @classmethod
    def module_shapes(cls, cfg, model):
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        shapes = {}
        for site in cls.sites(cfg, model):
            shapes.update({f"adapter.{site}.down.weight": (r, d), f"adapter.{site}.down.bias": (r,),
                           f"adapter.{site}.up.weight": (d, r), f"adapter.{site}.up.bias": (d,)})
        return shapes

    @classmethod
    def trained_vectors(cls, cfg, model):
        return all_norms(model) if cfg.train_norms else []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        params = {}
        for site in cls.sites(cfg, model):
            dw, db = linear_init(gen, r, d)
            uw, ub = linear_init(gen, d, r)
            if cfg.zero_init_up:
                uw, ub = torch.zeros_like(uw), torch.zeros_like(ub)
            params.update({f"adapter.{site}.down.weight": dw, f"adapter.{site}.down.bias": db,
                           f"adapter.{site}.up.weight": uw, f"adapter.{site}.up.bias": ub})
        return params

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        forms = {}
        for site in cls.sites(cfg, model):
            p = lambda n: params[f"adapter.{site}.{n}"]  # noqa: E731
            forms[site] = BottleneckForm(D=p("down.weight"), bd=p("down.bias"), U=p("up.weight"),
                                         bu=p("up.bias"), from_input=cfg.mode == "parallel")
        return CompiledAdapter(bottleneck=forms)
