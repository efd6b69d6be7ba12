"""Transformer building blocks shared by T5, BART and AST, with named adapter sites.

Every linear, norm and sublayer has a site name (``enc.3.self.q``, ``enc.3.self_norm``,
``dec.0.cross``); the StepContext applies the adapters of each row at these sites.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from petserve.adapters.backbone.config import LMConfig
from petserve.adapters.runtime.context import StepContext


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in fp32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x) * self.weight

    def forward_with(self, x, weight, bias=None):
        out = self.normalize(x) * weight
        return out if bias is None else out + bias


class LayerNorm(nn.LayerNorm):
    def forward_with(self, x, weight, bias):
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * weight + bias


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    """``rms`` (T5's) or ``layer`` (LayerNorm, BART's) over width ``d``."""
    return RMSNorm(d, eps) if kind == "rms" else LayerNorm(d, eps)


def lm_norm(cfg: LMConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)


def activation(name: str):
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_tanh"):
        return lambda z: F.gelu(z, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r}")


class Attention(nn.Module):
    """Multi-head attention whose q, k, v, o linears are adapter sites ``{site}.q`` etc."""

    def __init__(self, cfg: LMConfig, site: str):
        super().__init__()
        bias = cfg.linear_bias
        self.site, self.h, self.dh = site, cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=bias)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=bias)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=bias)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=bias)
        # T5 folds the 1/sqrt(d) into its initialisation; BART scales the query.
        self.scale = 1.0 if cfg.family == "t5" else self.dh ** -0.5

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.h, self.dh).transpose(1, 2)   # (B, H, T, dh)

    def keys_values(self, src: torch.Tensor, ctx: StepContext, stream: str):
        """(k, v), each (B, H, T, dh), of ``src`` (B, T, d)."""
        k = ctx.linear(f"{self.site}.k", self.k, src, stream)
        v = ctx.linear(f"{self.site}.v", self.v, src, stream)
        return self._heads(k), self._heads(v)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
               ctx: StepContext, stream: str) -> torch.Tensor:
        """Queries from x (B, Tq, d) over keys/values (B, H, Tk, dh); bias: (B, 1|H, Tq, Tk)."""
        q = self._heads(ctx.linear(f"{self.site}.q", self.q, x, stream))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        B, _, Tq, _ = out.shape
        out = out.transpose(1, 2).reshape(B, Tq, self.h * self.dh)
        return ctx.linear(f"{self.site}.o", self.o, out, stream)


class FeedForward(nn.Module):
    """``wo(act(wi x))`` (gated: ``wo(act(wi_0 x) * wi_1 x)``); sites ``{site}.wi``, ``{site}.wo``."""

    def __init__(self, cfg: LMConfig, site: str):
        super().__init__()
        bias = cfg.linear_bias
        self.site, self.gated = site, cfg.ffn_act.startswith("gated-")
        act = cfg.ffn_act.removeprefix("gated-")
        # HF maps "gated-gelu" to the tanh approximation.
        self.act = activation("gelu_new" if self.gated and act == "gelu" else act)
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)

    def forward(self, x: torch.Tensor, ctx: StepContext, stream: str) -> torch.Tensor:
        if self.gated:
            z = self.act(ctx.linear(f"{self.site}.wi_0", self.wi_0, x, stream)) * \
                ctx.linear(f"{self.site}.wi_1", self.wi_1, x, stream)
        else:
            z = self.act(ctx.linear(f"{self.site}.wi", self.wi, x, stream))
        return ctx.linear(f"{self.site}.wo", self.wo, z, stream)


def residual_sublayer(x, fn, norm: nn.Module, site: str, pre_norm: bool, ctx: StepContext,
                      stream: str) -> torch.Tensor:
    """One sublayer with its adapter site: pre-LN (T5) ``x + A(F(LN x))`` or post-LN (BART)
    ``LN(x + A(F x))``, where A is the row's bottleneck module (identity without one; its gates
    may read the residual stream x itself)."""
    a = ctx.norm(f"{site}_norm", norm, x) if pre_norm else x
    h = ctx.sublayer(site, fn(a), a, stream, residual=x if pre_norm else None)
    x = x + h
    return x if pre_norm else ctx.norm(f"{site}_norm", norm, x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, site: str):
        super().__init__()
        self.site, self.pre_norm = site, cfg.pre_norm
        self.self_attn = Attention(cfg, f"{site}.self")
        self.self_norm = lm_norm(cfg)
        self.ffn = FeedForward(cfg, f"{site}.ffn")
        self.ffn_norm = lm_norm(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        def attn(a):
            k, v = self.self_attn.keys_values(a, ctx, "enc")
            return self.self_attn.attend(a, k, v, bias, ctx, "enc")
        x = residual_sublayer(x, attn, self.self_norm, f"{self.site}.self", self.pre_norm, ctx, "enc")
        return residual_sublayer(x, lambda a: self.ffn(a, ctx, "enc"), self.ffn_norm,
                                 f"{self.site}.ffn", self.pre_norm, ctx, "enc")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig, site: str):
        super().__init__()
        self.site, self.pre_norm = site, cfg.pre_norm
        self.self_attn = Attention(cfg, f"{site}.self")
        self.self_norm = lm_norm(cfg)
        self.cross_attn = Attention(cfg, f"{site}.cross")
        self.cross_norm = lm_norm(cfg)
        self.ffn = FeedForward(cfg, f"{site}.ffn")
        self.ffn_norm = lm_norm(cfg)

    def forward(self, x, self_bias, cross_bias, cache, layer: int, ctx: StepContext):
        """x: (B, L, d) new decoder tokens; cache: DecoderCache (self K/V appended in place)."""
        def self_attn(a):
            k, v = self.self_attn.keys_values(a, ctx, "dec")
            k, v = cache.append(layer, k, v)
            return self.self_attn.attend(a, k, v, self_bias, ctx, "dec")

        def cross_attn(a):
            return self.cross_attn.attend(a, cache.cross_k[layer], cache.cross_v[layer],
                                          cross_bias, ctx, "dec")
        x = residual_sublayer(x, self_attn, self.self_norm, f"{self.site}.self", self.pre_norm, ctx, "dec")
        x = residual_sublayer(x, cross_attn, self.cross_norm, f"{self.site}.cross", self.pre_norm,
                              ctx, "dec")
        return residual_sublayer(x, lambda a: self.ffn(a, ctx, "dec"), self.ffn_norm,
                                 f"{self.site}.ffn", self.pre_norm, ctx, "dec")


def t5_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's relative-position bucket of ``rel = key_pos - query_pos``."""
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out = out + (rel > 0).long() * num_buckets
        n = rel.abs()
    else:
        n = (-rel).clamp_min(0)
    exact = num_buckets // 2
    large = exact + (torch.log(n.float().clamp_min(1) / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = large.clamp_max(num_buckets - 1)
    return out + torch.where(n < exact, n, large)


def key_mask_bias(valid: torch.Tensor, dtype) -> torch.Tensor:
    """(B, Tk) bool -> (B, 1, 1, Tk) additive bias: 0 where valid, the dtype's minimum elsewhere."""
    neg = torch.finfo(dtype).min
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
        ~valid, neg)[:, None, None, :]
