"""The frozen CLIP vision tower (ViT), our own forward pass: the same parameter names, the same math
and the same initialisation as transformers' CLIPVisionModel, without importing the transformers
modeling stack (it pulls torch._dynamo into every backbone process, about 190 MB of memory).
tests/test_backbone_hf.py checks it against CLIPVisionModel: equal outputs and equal random
initialisation for a seed.

    x = patch_conv(pixels) (+ CLS) + positions;  x = LN_pre(x)
    per layer:  x += out(attn(LN_1(x)));  x += fc2(act(fc1(LN_2(x))))
    returns x (the last hidden state); ``post_layernorm`` is applied by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
         "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class ClipConfig:
    """CLIPVisionConfig's fields that the vision tower uses, with its defaults (ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    num_channels: int = 3

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CLIP vision options: {unknown}")
        if d.get("hidden_act", "quick_gelu") not in _ACTS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTS)}, got {d['hidden_act']!r}")
        return cls(**d)


class _Embeddings(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=c.patch_size,
                                         stride=c.patch_size, bias=False)
        self.num_positions = (c.image_size // c.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:        # (n, 3, S, S) -> (n, 1+P, d)
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class _Attention(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        d = c.hidden_size
        self.heads, self.scale = c.num_attention_heads, (d // c.num_attention_heads) ** -0.5
        self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.q_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, T, d); ``mask`` (n, 1, T, T) bool, True = may attend (the text tower's)."""
        n, T, d = x.shape
        split = lambda t: t.view(n, T, self.heads, -1).transpose(1, 2)     # (n, H, T, d/H)
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), attn_mask=mask,
                                             scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(n, T, d))


class _Mlp(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.act = _ACTS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.self_attn = _Attention(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _Mlp(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c.num_hidden_layers)])


class ClipVision(nn.Module):
    """CLIP's vision transformer; ``forward(pixels)`` -> (n, 1 + patches, d) last hidden state."""

    def __init__(self, c: ClipConfig):
        super().__init__()
        self.config = c
        self.embeddings = _Embeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)   # CLIP's spelling
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.apply(self._init_weights)

    @property
    def dtype(self) -> torch.dtype:
        return self.pre_layrnorm.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x

    @torch.no_grad()
    def _init_weights(self, m: nn.Module) -> None:
        """CLIP's initialisation (as transformers' CLIPPreTrainedModel gives it)."""
        c = self.config
        f, d, L = c.initializer_factor, c.hidden_size, c.num_hidden_layers
        if isinstance(m, (nn.Linear, nn.Conv2d)):     # every module first, children before parents
            m.weight.normal_(0.0, c.initializer_range)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, c.initializer_range)
        if isinstance(m, _Embeddings):
            m.class_embedding.normal_(0.0, d ** -0.5 * f)
            m.patch_embedding.weight.normal_(0.0, c.initializer_range * f)
            m.position_embedding.weight.normal_(0.0, c.initializer_range * f)
        elif isinstance(m, _Attention):
            for p, std in ((m.q_proj, d ** -0.5 * (2 * L) ** -0.5 * f),
                           (m.k_proj, d ** -0.5 * (2 * L) ** -0.5 * f),
                           (m.v_proj, d ** -0.5 * (2 * L) ** -0.5 * f), (m.out_proj, d ** -0.5 * f)):
                p.weight.normal_(0.0, std)
        elif isinstance(m, _Mlp):
            m.fc1.weight.normal_(0.0, (2 * d) ** -0.5 * f)
            m.fc2.weight.normal_(0.0, d ** -0.5 * (2 * L) ** -0.5 * f)


# ---- the text tower (CapS-Adapter's classes and captions) --------------------------------------
@dataclass(frozen=True)
class ClipTextConfig:
    """CLIPTextConfig's fields that the text tower uses, with its defaults (ViT-B/32's), plus the
    projection width shared with the image side."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 2
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> ClipTextConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class _TextEmbeddings(nn.Module):
    def __init__(self, c: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class ClipText(nn.Module):
    """CLIP's text transformer with its projection (transformers' CLIPTextModelWithProjection:
    the same parameter names, ``text_model.`` dropped): causal self-attention over the tokens, the
    final norm, the hidden state at the end-of-text token, projected. ``forward(ids, valid)`` ->
    (n, projection_dim) text embeddings, not normalised."""

    def __init__(self, c: ClipTextConfig):
        super().__init__()
        self.config = c
        self.embeddings = _TextEmbeddings(c)
        self.encoder = _Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.text_projection = nn.Linear(c.hidden_size, c.projection_dim, bias=False)
        self._init()

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(pos)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        mask = (causal & valid[:, None, :]).unsqueeze(1)          # (n, 1, T, T)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        x = self.final_layer_norm(x)
        if self.config.eos_token_id == 2:     # transformers' rule for checkpoints of that era
            end = ids.argmax(-1)
        else:
            end = (ids == self.config.eos_token_id).int().argmax(-1)
        return self.text_projection(x[torch.arange(n, device=ids.device), end])

    @torch.no_grad()
    def _init(self) -> None:
        c = self.config
        f, d, L = c.initializer_factor, c.hidden_size, c.num_hidden_layers
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, c.initializer_range)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            if isinstance(m, _Attention):
                for p in (m.q_proj, m.k_proj, m.v_proj):
                    p.weight.normal_(0.0, d ** -0.5 * (2 * L) ** -0.5 * f)
                m.out_proj.weight.normal_(0.0, d ** -0.5 * f)
            elif isinstance(m, _Mlp):
                m.fc1.weight.normal_(0.0, (2 * d) ** -0.5 * f)
                m.fc2.weight.normal_(0.0, d ** -0.5 * (2 * L) ** -0.5 * f)
        self.embeddings.token_embedding.weight.normal_(0.0, 0.02 * f)
        self.embeddings.position_embedding.weight.normal_(0.0, 0.02 * f)
        self.text_projection.weight.normal_(0.0, d ** -0.5 * f)
