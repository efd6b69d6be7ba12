"""VL-PET (Hu et al., ICCV 2023): granularity-controlled gates on encoder modules, kind ``vlpet``.

Per encoder sublayer (self-attention, FFN) with input x and output h = F(x)::

    dh  = U act(concat_i D_i h) + b_u        (N_h heads; concat_i D_i is one (r x d) matrix)
    h'  = h + dh ;   h'' = scale * G (.) h' ;   out = LN(x + dropout(h''))   (BART post-LN)

G: small (one scalar per example, from [x ; h']), middleX (per token, from x + h'), middleY
(per channel, 1 + g), large (per token and channel, sigmoid(U_g act(D_g x + b_d) + b_u)).
Decoder: a parallel adapter on the cross-attention values, ``V = W_v E + b_v + U act(D E + b) + b_u``.
Trains the encoder norms (layernorm_embedding included) and the visual embedding.
The gates (and the small / middleX inputs) read x, the sublayer's input before any norm: for pre-LN
T5 the residual stream, not LN(x) (``gate_input="residual"``; files of format version 1 were
trained gating from LN(x), ``"normed"``). BART: r = 96, N_h = 4, gate rank 96. T5 (the released
T5 scripts): r = 192, N_h = 4, gate rank 192, gate output scaled by 0.3, up-projections, the
large gate's up-projection and the small / middleX gate layers zero-initialised (middleY g = 0).
The multi-head down projection is stored as its (r x d) concatenation: the same function and
parameter count as N_h separate (r/N_h x d) heads.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, all_norms, layer_sites, linear_init
from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter

GATE_TENSORS = {
    "small": lambda d, rg: {"gate.weight": (1, 2 * d), "gate.bias": (1,)},
    "middleX": lambda d, rg: {"gate.weight": (1, d), "gate.bias": (1,)},
    "middleY": lambda d, rg: {"gate.vec": (d,)},
    "large": lambda d, rg: {"gate_down.weight": (rg, d), "gate_down.bias": (rg,),
                            "gate_up.weight": (d, rg), "gate_up.bias": (d,)},
}


class VLPETConfig(KindConfig):
    gate: Literal["small", "middleX", "middleY", "large"] = "large"
    r: int | None = Field(None, ge=1, description="encoder module width (BART 96, T5 192)")
    heads: int = Field(4, ge=1, description="N_h heads of the down projection")
    gate_rank: int | None = Field(None, ge=1, description="rank of the large gate (BART 96, T5 192)")
    gate_input: Literal["residual", "normed"] = Field(
        "residual", description="what the gates read on pre-LN T5: the residual stream x or LN(x)")
    gate_scale: float | None = Field(None, gt=0, description="factor on the gated output (T5 0.3)")
    zero_init_up: bool | None = Field(None, description="zero-init up projections (T5 yes)")
    decoder_value_adapter: bool = True
    decoder_r: int = Field(96, ge=1)
    train_encoder_norms: bool = True

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.r is not None and self.r % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide r ({self.r})")
        return self


class VLPET(AdapterKind):
    name = "vlpet"
    Config = VLPETConfig
    description = "VL-PET: gated encoder modules (small/middleX/middleY/large) + decoder value adapter"

    @classmethod
    def resolve(cls, cfg: VLPETConfig, model) -> VLPETConfig:
        t5 = model.cfg.lm.family == "t5"
        fill = {"r": 192 if t5 else 96, "gate_rank": 192 if t5 else 96, "gate_scale": 0.3 if t5 else 1.0,
                "zero_init_up": t5}
        return cfg.model_copy(update={k: v for k, v in fill.items() if getattr(cfg, k) is None})

    @classmethod
    def value_sites(cls, cfg, model) -> list[str]:
        return [f"{s}.v" for s in layer_sites(model, "dec", ("cross",))] if cfg.decoder_value_adapter else []

    @classmethod
    def module_shapes(cls, cfg, model):
        d = model.cfg.lm.d_model
        shapes = {}
        for site in layer_sites(model, "enc", ("self", "ffn")):
            shapes.update(_pair(f"vlpet.{site}", d, cfg.r))
            gate = GATE_TENSORS[cfg.gate](d, cfg.gate_rank)
            shapes.update({f"vlpet.{site}.{k}": s for k, s in gate.items()})
        for site in cls.value_sites(cfg, model):
            shapes.update(_pair(f"vlpet.{site}", d, cfg.decoder_r))
        return shapes

    @classmethod
    def trained_vectors(cls, cfg, model):
        return all_norms(model, "enc") if cfg.train_encoder_norms else []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        d = model.cfg.lm.d_model
        params = {}
        for site in layer_sites(model, "enc", ("self", "ffn")):
            params.update(_init_pair(gen, f"vlpet.{site}", d, cfg.r, cfg.zero_init_up))
            params.update(_init_gate(gen, f"vlpet.{site}", cfg, d))
        for site in cls.value_sites(cfg, model):
            params.update(_init_pair(gen, f"vlpet.{site}", d, cfg.decoder_r, cfg.zero_init_up))
        return params

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        forms = {}
        for site in layer_sites(model, "enc", ("self", "ffn")):
            p = lambda n, site=site: params.get(f"vlpet.{site}.{n}")
            forms[site] = BottleneckForm(
                D=p("down.weight"), bd=p("down.bias"), U=p("up.weight"), bu=p("up.bias"),
                gate=cfg.gate, out_scale=cfg.gate_scale, gate_reads_residual=cfg.gate_input == "residual",
                gate_w=None if p("gate.weight") is None else p("gate.weight")[0],
                gate_b=None if p("gate.bias") is None else p("gate.bias")[0],
                gate_vec=p("gate.vec"), gate_D=p("gate_down.weight"), gate_bd=p("gate_down.bias"),
                gate_U=p("gate_up.weight"), gate_bu=p("gate_up.bias"))
        for site in cls.value_sites(cfg, model):
            p = lambda n, site=site: params[f"vlpet.{site}.{n}"]
            forms[site] = BottleneckForm(D=p("down.weight"), bd=p("down.bias"), U=p("up.weight"),
                                         bu=p("up.bias"), from_input=True)
        return CompiledAdapter(bottleneck=forms)


def _pair(prefix: str, d: int, r: int) -> dict:
    return {f"{prefix}.down.weight": (r, d), f"{prefix}.down.bias": (r,),
            f"{prefix}.up.weight": (d, r), f"{prefix}.up.bias": (d,)}


def _init_pair(gen, prefix: str, d: int, r: int, zero_up: bool) -> dict:
    dw, db = linear_init(gen, r, d)    # N_h heads of nn.Linear(d, r/N_h): the same distribution
    uw, ub = linear_init(gen, d, r)
    if zero_up:
        uw, ub = torch.zeros_like(uw), torch.zeros_like(ub)
    return {f"{prefix}.down.weight": dw, f"{prefix}.down.bias": db,
            f"{prefix}.up.weight": uw, f"{prefix}.up.bias": ub}


def _init_gate(gen, prefix: str, cfg: VLPETConfig, d: int) -> dict:
    if cfg.gate == "middleY":
        g = torch.randn(d, generator=gen) * 0.02
        return {f"{prefix}.gate.vec": torch.zeros_like(g) if cfg.zero_init_up else g}
    if cfg.gate in ("small", "middleX"):
        w, b = linear_init(gen, 1, 2 * d if cfg.gate == "small" else d)
        if cfg.zero_init_up:
            w, b = torch.zeros_like(w), torch.zeros_like(b)
        return {f"{prefix}.gate.weight": w, f"{prefix}.gate.bias": b}
    gd, gbd = linear_init(gen, cfg.gate_rank, d)
    gu, gbu = linear_init(gen, d, cfg.gate_rank)
    if cfg.zero_init_up:
        gu, gbu = torch.zeros_like(gu), torch.zeros_like(gbu)
    return {f"{prefix}.gate_down.weight": gd, f"{prefix}.gate_down.bias": gbd,
            f"{prefix}.gate_up.weight": gu, f"{prefix}.gate_up.bias": gbu}
