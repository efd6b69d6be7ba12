"""LoRA (Hu et al.; VL-Adapter's setting): ``y = W x + (alpha / r) B A x`` on chosen linears.

VL-Adapter: q and v of encoder self-attention, decoder self-attention and decoder cross-attention,
r = 128, alpha = 32, dropout 0.1 (training only); also trains all biases (LayerNorm biases
included, as VL-Adapter's code selects every parameter named "bias") and the visual embedding.
A is drawn like PEFT (Kaiming-uniform), B starts at zero, so a fresh LoRA changes nothing but the
visual embedding copy it starts from.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, all_biases
from petserve.adapters.runtime.forms import CompiledAdapter, LowRankForm

DEFAULT_TARGETS = ("enc.self.q", "enc.self.v", "dec.self.q", "dec.self.v", "dec.cross.q", "dec.cross.v")


class LoRAConfig(KindConfig):
    r: int = Field(128, ge=1, le=1024, description="rank")
    alpha: float = Field(32.0, gt=0, description="scale = alpha / r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA input (training only)")
    targets: tuple[str, ...] = Field(DEFAULT_TARGETS, description="stream.sublayer.linear patterns")
    train_biases: bool = True
    rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r) (PEFT use_rslora)")

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v):
        for t in v:
            parts = t.split(".")
            if len(parts) != 3 or parts[0] not in ("enc", "dec") or \
                    parts[1] not in ("self", "cross", "ffn"):
                raise ValueError(f"LoRA target {t!r} must look like 'enc.self.q' "
                                 "(stream enc|dec . sublayer self|cross|ffn . linear)")
        return v


class LoRA(AdapterKind):
    name = "lora"
    Config = LoRAConfig
    description = "low-rank update on chosen linears (q, v of every attention by default)"

    @classmethod
    def sites(cls, cfg: LoRAConfig, model) -> dict[str, torch.nn.Linear]:
        linears = model.lm.linear_sites()
        out = {}
        for site, lin in linears.items():
            stream, _layer, sub, name = site.split(".")
            if f"{stream}.{sub}.{name}" in cfg.targets:
                out[site] = lin
        if not out:
            raise ValueError(f"LoRA targets {list(cfg.targets)} match no linear of this backbone")
        return out

    @classmethod
    def module_shapes(cls, cfg, model):
        shapes = {}
        for site, lin in cls.sites(cfg, model).items():
            shapes[f"lora.{site}.A"] = (cfg.r, lin.in_features)
            shapes[f"lora.{site}.B"] = (lin.out_features, cfg.r)
        return shapes

    @classmethod
    def trained_vectors(cls, cfg, model):
        return all_biases(model) if cfg.train_biases else []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        params = {}
        for site, lin in cls.sites(cfg, model).items():
            bound = math.sqrt(6 / ((1 + 5) * lin.in_features))   # kaiming_uniform_(a=sqrt(5))
            params[f"lora.{site}.A"] = (torch.rand(cfg.r, lin.in_features, generator=gen) * 2 - 1) * bound
            params[f"lora.{site}.B"] = torch.zeros(lin.out_features, cfg.r)
        return params

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        scale = cfg.alpha / (cfg.r ** 0.5 if cfg.rslora else cfg.r)
        return CompiledAdapter(lowrank={
            site: LowRankForm(params[f"lora.{site}.A"], params[f"lora.{site}.B"], scale)
            for site in cls.sites(cfg, model)})
