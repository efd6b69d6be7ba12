"""Prompt tuning (Lester et al.; VL-Adapter's encoder prompts), kind ``prompt``.

P prompt vectors come out of a reparameterising MLP::

    prompt = W2 tanh(W1 E + b1) + b2        E: (P, d) embedding table, W1: (mid, d), W2: (d, mid)

and are prepended to each row's text embeddings in the encoder (``VLModel._with_prefix``): BART gives
them no position and normalises them with the text by layernorm_embedding; T5 gives them the text
positions 0..P-1 (the text then starts at P) for its relative position bias. At load time the P
vectors are materialised once (CompiledAdapter.prefix, (P, d)), so serving only prepends vectors;
rows with different prompt lengths, and rows without a prompt, share one batch.

VL-Adapter (``--encoder_prompt_len 40 --mid_dim 800``): P = 40, mid = 800; it trains the prompt
module and the visual embedding only (no LayerNorms): 2.00% of VL-BART-base.
Initialisation: the modules' own defaults (``nn.Embedding`` N(0, 1), ``nn.Linear`` default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, linear_init
from petserve.adapters.runtime.forms import CompiledAdapter


class PromptConfig(KindConfig):
    length: int = Field(40, description="number of prompt vectors P (>= 1)")
    mid_dim: int = Field(800, ge=1, description="hidden width of the reparameterising MLP")

    @field_validator("length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"prompt length must be at least 1 (got {v}); "
                             "an adapter without prompt vectors is not a prompt adapter")
        return v


class Prompt(AdapterKind):
    name = "prompt"
    Config = PromptConfig
    description = "prompt tuning: P vectors (embedding -> MLP) prepended to the encoder's text"

    @classmethod
    def module_shapes(cls, cfg: PromptConfig, model):
        d, m = model.cfg.lm.d_model, cfg.mid_dim
        return {"prompt.embed": (cfg.length, d), "prompt.fc1.weight": (m, d), "prompt.fc1.bias": (m,),
                "prompt.fc2.weight": (d, m), "prompt.fc2.bias": (d,)}

    @classmethod
    def trained_vectors(cls, cfg, model):
        return []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        d, m = model.cfg.lm.d_model, cfg.mid_dim
        w1, b1 = linear_init(gen, m, d)
        w2, b2 = linear_init(gen, d, m)
        return {"prompt.embed": torch.randn(cfg.length, d, generator=gen), "prompt.fc1.weight": w1,
                "prompt.fc1.bias": b1, "prompt.fc2.weight": w2, "prompt.fc2.bias": b2}

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        """prefix (P, d) = W2 tanh(W1 E + b1) + b2."""
        p = params
        h = torch.tanh(F.linear(p["prompt.embed"], p["prompt.fc1.weight"], p["prompt.fc1.bias"]))  # (P, mid)
        return CompiledAdapter(prefix=F.linear(h, p["prompt.fc2.weight"], p["prompt.fc2.bias"]))
