"""T5 and BART encoder-decoders written for mixed-adapter batches.

Weights load from Hugging Face checkpoints (see ``hf_weights``), but the forward pass is ours so that
every row can carry its own adapter, rows can sit at different decoding positions, and the encoder
can take VL-T5's layout (relative position bias on the text-text block only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from petserve.adapters.backbone.cache import DecoderCache
from petserve.adapters.backbone.config import LMConfig
from petserve.adapters.backbone.layers import DecoderLayer, EncoderLayer, key_mask_bias, lm_norm, t5_bucket
from petserve.adapters.runtime.context import StepContext

BART_POS_OFFSET = 2   # BART's learned positions start at index 2


class SiteIndex(nn.Module):
    """The adapter sites of a stack of ``enc_layers`` / ``dec_layers`` and its final norms."""

    enc_layers: nn.ModuleList
    dec_layers: nn.ModuleList

    # ---- adapter sites -------------------------------------------------------------------
    def vector_params(self) -> dict[str, nn.Parameter]:
        """Every norm weight/bias and linear bias by site name (``enc.0.self_norm.weight``,
        ``enc.0.self.q.bias``): the vectors an adapter may train and override per slot."""
        out: dict[str, nn.Parameter] = {}
        for layer in [*self.enc_layers, *self.dec_layers]:
            for name, mod in layer.named_children():
                if name.endswith("_norm"):
                    self._add_norm(out, f"{layer.site}.{name}", mod)
                for lin_name, lin in mod.named_children():
                    if isinstance(lin, nn.Linear) and lin.bias is not None:
                        out[f"{mod.site}.{lin_name}.bias"] = lin.bias
        for site, attr in (("enc.final_norm", "enc_final_norm"), ("dec.final_norm", "dec_final_norm"),
                           ("enc.embed_norm", "enc_embed_norm"), ("dec.embed_norm", "dec_embed_norm")):
            if hasattr(self, attr):
                self._add_norm(out, site, getattr(self, attr))
        return out

    @staticmethod
    def _add_norm(out: dict, site: str, mod: nn.Module) -> None:
        out[f"{site}.weight"] = mod.weight
        if getattr(mod, "bias", None) is not None:
            out[f"{site}.bias"] = mod.bias

    def linear_sites(self) -> dict[str, nn.Linear]:
        """Every adapter-able linear by site name (``enc.0.self.q``, ``dec.1.ffn.wo``)."""
        out = {}
        for layer in [*self.enc_layers, *self.dec_layers]:
            for mod in layer.children():
                for lin_name, lin in mod.named_children():
                    if isinstance(lin, nn.Linear):
                        out[f"{mod.site}.{lin_name}"] = lin
        return out


class Seq2SeqLM(SiteIndex):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.t5 = cfg.family == "t5"
        d = cfg.d_model
        self.tokens = nn.Embedding(cfg.vocab_size, d)
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg, f"enc.{i}") for i in range(cfg.enc_layers))
        self.dec_layers = nn.ModuleList(DecoderLayer(cfg, f"dec.{i}") for i in range(cfg.dec_layers))
        if self.t5:
            self.enc_rel_bias = nn.Embedding(cfg.rel_buckets, cfg.num_heads)
            self.dec_rel_bias = nn.Embedding(cfg.rel_buckets, cfg.num_heads)
            self.enc_final_norm = lm_norm(cfg)
            self.dec_final_norm = lm_norm(cfg)
        else:
            self.enc_pos = nn.Embedding(cfg.max_positions + BART_POS_OFFSET, d)
            self.dec_pos = nn.Embedding(cfg.max_positions + BART_POS_OFFSET, d)
            self.enc_embed_norm = lm_norm(cfg)
            self.dec_embed_norm = lm_norm(cfg)
            self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        self.lm_head: nn.Linear | None = None    # set only for untied checkpoints
        self.embed_scale = d ** 0.5 if cfg.scale_embedding else 1.0

    # ---- encoder -------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor, pos: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Token (+ BART learned position) embeddings. ids, pos: (B, L); pos -1 = no position."""
        e = ctx.embed(ids, self.tokens, "text") * self.embed_scale
        if not self.t5:
            e = e + self.enc_pos(pos.clamp_min(0) + BART_POS_OFFSET) * (pos >= 0).unsqueeze(-1).to(e.dtype)
        return e

    def finish_text(self, e: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """BART normalises the text part (prompt included) with layernorm_embedding; T5 does not."""
        return e if self.t5 else ctx.norm("enc.embed_norm", self.enc_embed_norm, e)

    def encode(self, x: torch.Tensor, valid: torch.Tensor, text_pos: torch.Tensor,
               ctx: StepContext) -> torch.Tensor:
        """x: (B, T, d) laid-out encoder input; valid: (B, T) bool; text_pos: (B, T), -1 for
        tokens without a position (visual tokens, padding). Returns (B, T, d)."""
        bias = key_mask_bias(valid, x.dtype)
        if self.t5:
            bias = bias + self._t5_text_bias(text_pos)
        for layer in self.enc_layers:
            x = layer(x, bias, ctx)
        if self.t5:
            x = ctx.norm("enc.final_norm", self.enc_final_norm, x)
        return x

    def _t5_text_bias(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) relative position bias between positioned tokens, 0 elsewhere (VL-T5)."""
        rel = pos.unsqueeze(1) - pos.unsqueeze(2)                        # key - query
        bucket = t5_bucket(rel, True, self.cfg.rel_buckets, self.cfg.rel_max_distance)
        bias = self.enc_rel_bias(bucket)                                 # (B, T, T, H)
        both = (pos >= 0).unsqueeze(1) & (pos >= 0).unsqueeze(2)
        return (bias * both.unsqueeze(-1).to(bias.dtype)).permute(0, 3, 1, 2)

    # ---- decoder -------------------------------------------------------------------------
    def init_cache(self, enc_out: torch.Tensor, enc_valid: torch.Tensor, ctx: StepContext) -> DecoderCache:
        """Empty self-attention cache plus the cross-attention K/V of every decoder layer."""
        B = enc_out.shape[0]
        cross = [layer.cross_attn.keys_values(enc_out, ctx, "enc") for layer in self.dec_layers]
        empty = enc_out.new_zeros(B, self.cfg.num_heads, 0, self.cfg.head_dim)
        n = len(self.dec_layers)
        return DecoderCache([empty] * n, [empty] * n,
                            torch.zeros(B, 0, dtype=torch.long, device=enc_out.device),
                            [k for k, _ in cross], [v for _, v in cross], enc_valid)

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, cache: DecoderCache,
               ctx: StepContext) -> torch.Tensor:
        """Logits (B, L, V) for new decoder tokens ids/pos (B, L); extends ``cache`` in place."""
        x = ctx.embed(ids, self.tokens, "dec") * self.embed_scale
        if not self.t5:
            x = x + self.dec_pos(pos + BART_POS_OFFSET)
            x = ctx.norm("dec.embed_norm", self.dec_embed_norm, x)
        key_pos = cache.begin_step(pos)
        self_bias = self._decoder_self_bias(pos, key_pos, x.dtype)
        cross_bias = key_mask_bias(cache.enc_valid, x.dtype)
        for i, layer in enumerate(self.dec_layers):
            x = layer(x, self_bias, cross_bias, cache, i, ctx)
        cache.end_step()
        return self._logits(x, ctx)

    def _decoder_self_bias(self, pos, key_pos, dtype) -> torch.Tensor:
        """Causal mask by position (B, 1|H, L, Lk), plus T5's one-directional relative bias."""
        allowed = (key_pos >= 0).unsqueeze(1) & (key_pos.unsqueeze(1) <= pos.unsqueeze(2))
        bias = torch.zeros(allowed.shape, dtype=dtype, device=pos.device).masked_fill(
            ~allowed, torch.finfo(dtype).min).unsqueeze(1)
        if self.t5:
            rel = key_pos.unsqueeze(1) - pos.unsqueeze(2)
            bucket = t5_bucket(rel, False, self.cfg.rel_buckets, self.cfg.rel_max_distance)
            bias = bias + self.dec_rel_bias(bucket).permute(0, 3, 1, 2).to(dtype)
        return bias

    def _logits(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.t5:
            x = ctx.norm("dec.final_norm", self.dec_final_norm, x)
            if self.cfg.scale_decoder_outputs and self.lm_head is None:
                x = x * self.cfg.d_model ** -0.5
        if self.lm_head is not None:
            logits = F.linear(x, self.lm_head.weight)
        else:
            logits = ctx.logits(x, self.tokens.weight, "dec")
        return logits if self.t5 else logits + self.final_logits_bias
