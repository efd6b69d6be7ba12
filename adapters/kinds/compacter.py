"""Compacter (Karimi Mahabadi et al., NeurIPS 2021; VL-Adapter's setting), kind ``compacter``.

A bottleneck adapter (placement, sharing across tasks, trained LayerNorms and visual embedding all as
kind ``adapter``) whose down and up projections are PHM layers. A PHM layer d_in -> d_out is

    y = x H + b,    H = sum_{i=1..n} A_i (kron) B_i          H: (d_in, d_out)
    A_i: (n, n) "rule";  B_i: (d_in/n, d_out/n), or B_i = s_i t_i with s_i: (d_in/n, k), t_i: (k, d_out/n)

(the Compacter code's convention: H maps in -> out from the right). The runtime form wants
``nn.Linear`` weights, so ``compile`` materialises W = H^T (d_out, d_in) once, differentiably:
D = H_down^T (r, d), U = H_up^T (d, r), and serving sees a plain bottleneck adapter.

Options: ``n`` (hypercomplex_division), ``shared_phm_rule`` (one A (n, n, n) for every PHM layer of
the model), ``factorized_phm`` with ``phm_rank`` k. VL-Adapter's runs: n = 2, A per layer, B not
factorised, reduction factor 8, Houlsby, biases: 2.70% of VL-BART-base (``sharing=multiple``, 4 tasks:
7.05%). Initialisation as the Compacter code with VL-Adapter's flags: A ~ N(0, phm_init_range = 0.01),
B_i (s_i, t_i) Glorot-uniform with gain sqrt(2), biases zero.

Tensors per projection (``<prefix>`` as kind ``adapter`` names it, e.g. ``compacter.enc.0.self.down``):
``<prefix>.A`` (n, n, n) unless shared (then ``compacter.phm_rule``), ``<prefix>.B`` (n, d_in/n,
d_out/n) or ``<prefix>.s`` (n, d_in/n, k) + ``<prefix>.t`` (n, k, d_out/n), ``<prefix>.bias`` (d_out,).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from petserve.adapters.kinds.bottleneck import Bottleneck, BottleneckConfig


def phm_weight(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W = (sum_i A_i kron B_i)^T: A (n, n, n), B (n, p, q) -> W (n*q, n*p), an nn.Linear weight.

    H[a*p + b, c*q + e] = sum_i A[i, a, c] B[i, b, e]; W[c*q + e, a*p + b] = H[a*p + b, c*q + e].
    """
    n, p, q = B.shape
    return torch.einsum("iac,ibe->ceab", A, B).reshape(n * q, n * p)


def _glorot(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """xavier_uniform_(gain=sqrt(2)) on each (rows, cols) slice, as Compacter's ``glorot_uniform``."""
    bound = math.sqrt(2.0) * math.sqrt(6.0 / (shape[-2] + shape[-1]))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


class CompacterConfig(BottleneckConfig):
    n: int = Field(2, ge=1, description="PHM dimension (number of Kronecker terms)")
    shared_phm_rule: bool = Field(False, description="one rule A for every PHM layer of the model")
    factorized_phm: bool = Field(False, description="B_i = s_i t_i of rank phm_rank")
    phm_rank: int = Field(1, ge=1)
    phm_init_range: float = Field(0.01, gt=0, description="std of the rule A at initialisation")

    @model_validator(mode="after")
    def _n_divides_dim(self):
        if self.block != "bottleneck":
            raise ValueError("Compacter replaces the bottleneck's projections; it has no "
                             f"{self.block!r} block")
        if self.dim is not None and self.dim % self.n:
            raise ValueError(f"PHM n={self.n} does not divide the adapter width dim={self.dim}")
        return self


class Compacter(Bottleneck):
    name = "compacter"
    Config = CompacterConfig
    description = "Compacter: bottleneck adapter with PHM (sum of Kronecker products) projections"

    @classmethod
    def width(cls, cfg: CompacterConfig, model) -> int:
        r, d = super().width(cfg, model), model.cfg.lm.d_model
        if d % cfg.n or r % cfg.n:
            raise ValueError(f"PHM n={cfg.n} must divide both d_model ({d}) and the adapter "
                             f"width ({r}); choose n among the common divisors")
        return r

    @classmethod
    def _in_out(cls, cfg, model, part: str) -> tuple[int, int]:
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        return (d, r) if part == "down" else (r, d)

    @classmethod
    def part_shapes(cls, cfg, model, part):
        (d_in, d_out), n, k = cls._in_out(cfg, model, part), cfg.n, cfg.phm_rank
        shapes = {} if cfg.shared_phm_rule else {"A": (n, n, n)}
        if cfg.factorized_phm:
            shapes.update({"s": (n, d_in // n, k), "t": (n, k, d_out // n)})
        else:
            shapes["B"] = (n, d_in // n, d_out // n)
        shapes["bias"] = (d_out,)
        return shapes

    @classmethod
    def init_part(cls, cfg, model, part, gen):
        out = {}
        for key, shape in cls.part_shapes(cfg, model, part).items():
            if key == "A":
                out[key] = torch.randn(shape, generator=gen) * cfg.phm_init_range
            elif key == "bias":
                out[key] = torch.zeros(shape)
            else:
                out[key] = _glorot(gen, shape)
        if part == "up" and cfg.zero_init_up:     # W = sum A_i kron B_i = 0 and no bias: identity
            out = {k: (v if k in ("A", "s") else torch.zeros_like(v)) for k, v in out.items()}
        return out

    @classmethod
    def part_linear(cls, cfg, params, prefix):
        A = params[f"{cls.name}.phm_rule"] if cfg.shared_phm_rule else params[f"{prefix}.A"]
        B = (torch.bmm(params[f"{prefix}.s"], params[f"{prefix}.t"]) if cfg.factorized_phm
             else params[f"{prefix}.B"])
        return phm_weight(A, B), params[f"{prefix}.bias"]

    @classmethod
    def module_shapes(cls, cfg, model):
        shapes = super().module_shapes(cfg, model)
        if cfg.shared_phm_rule:
            shapes[f"{cls.name}.phm_rule"] = (cfg.n,) * 3
        return shapes

    @classmethod
    def init_modules(cls, cfg, model, gen):
        params = super().init_modules(cfg, model, gen)
        if cfg.shared_phm_rule:
            params[f"{cls.name}.phm_rule"] = torch.randn((cfg.n,) * 3, generator=gen) * cfg.phm_init_range
        return params
