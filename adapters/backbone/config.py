"""Backbone configuration: the language model, the vision side and named presets."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LMConfig:
    """Shape of a T5 or BART encoder-decoder (field names follow the papers, not HF)."""

    family: str                 # "t5" | "bart" | "ast" (encoder only, adapters/backbone/audio.py)
    d_model: int
    num_heads: int
    d_ff: int
    enc_layers: int
    dec_layers: int
    vocab_size: int
    d_kv: int = 64              # T5 per-head width (BART: d_model / num_heads)
    ffn_act: str = "relu"       # "relu" | "gelu" | "gelu_new" | "gated-gelu"
    norm_eps: float = 1e-6
    rel_buckets: int = 32       # T5 relative position buckets
    rel_max_distance: int = 128
    max_positions: int = 1024   # BART learned positions
    scale_embedding: bool = False
    scale_decoder_outputs: bool = True   # T5 with tied embeddings scales by d_model**-0.5
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int | None = None
    decoder_start_id: int = 0

    @property
    def pre_norm(self) -> bool:
        """Pre-LN sublayers ``x + F(LN x)`` (T5, AST) rather than post-LN ``LN(x + F x)`` (BART)."""
        return self.family in ("t5", "ast")

    @property
    def linear_bias(self) -> bool:
        """Whether the attention and FFN linears have biases (BART, AST; not T5)."""
        return self.family in ("bart", "ast")

    @property
    def norm(self) -> str:
        """T5's RMS norm or a LayerNorm (BART, AST)."""
        return "rms" if self.family == "t5" else "layer"

    @property
    def head_dim(self) -> int:
        return self.d_kv if self.family == "t5" else self.d_model // self.num_heads

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class VisionConfig:
    """Where visual features come from.

    kind "clip": a frozen CLIP ViT (adapters/backbone/clip.py) computes them from pixels; ``clip``
    holds its CLIPVisionConfig fields. kind "features": only precomputed features of width ``feat_dim`` are
    accepted (VL-Adapter's CLIP RN101 grid features: 2048-d, 6x6 = 36 per image).
    """

    kind: str = "features"
    feat_dim: int = 2048
    clip: dict = field(default_factory=dict)
    image_size: int = 224


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    lm: LMConfig
    vision: VisionConfig
    n_images: int = 2           # image-order embeddings (NLVR2: 2 images)
    # rows the seeds' vocabulary adds to the checkpoint's (counted by ``petserve params``): VL-BART
    # adds 100 <extra_id_k> + 100 <vis_extra_id_k> to bart-base's 50265; VL-T5 resizes t5-base's
    # 32128 rows to its tokenizer's 32000 + 100 + 100 = 32200
    extra_vis_tokens: int = 100
    # The visual embedding's structure (adapters/backbone/visual.py), as in the seeds' code: T5
    # normalises with its RMS norm (no bias), BART with LayerNorm; ``object_order`` adds the
    # frozen token embedding's row V-1-i to visual token i of each image.
    visual_norm: str = "layer"  # "layer" | "rms"
    object_order: bool = True

    def to_json(self) -> str:
        return json.dumps(self.identity(), sort_keys=True)

    def identity(self) -> dict:
        """The config as fingerprinted: a field at the value it had before the field existed is
        left out, so backbones saved then keep their fingerprints (and their adapters load)."""
        d = asdict(self)
        for key, before in LEGACY.items():
            if d[key] == before:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        """A saved config; fields it lacks take the values backbones had before those fields
        existed (``LEGACY``), which is what its weights were trained with."""
        return cls(name=d["name"], lm=LMConfig(**d["lm"]), vision=VisionConfig(**d["vision"]),
                   n_images=d.get("n_images", 2), extra_vis_tokens=d.get("extra_vis_tokens", 100),
                   **{k: d.get(k, before) for k, before in LEGACY.items()})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))


# What a backbone saved before these fields existed was built with (LayerNorm, no object order).
LEGACY = {"visual_norm": "layer", "object_order": False}


T5_BASE = LMConfig(family="t5", d_model=768, num_heads=12, d_ff=3072, enc_layers=12, dec_layers=12,
                   vocab_size=32128, d_kv=64, ffn_act="relu", norm_eps=1e-6,
                   pad_id=0, eos_id=1, decoder_start_id=0)
BART_BASE = LMConfig(family="bart", d_model=768, num_heads=12, d_ff=3072, enc_layers=6, dec_layers=6,
                     vocab_size=50265, ffn_act="gelu", norm_eps=1e-5, max_positions=1024,
                     scale_embedding=False, scale_decoder_outputs=False,
                     pad_id=1, eos_id=2, bos_id=0, decoder_start_id=2)
CLIP_VIT_B32 = VisionConfig(kind="clip", feat_dim=768, image_size=224, clip=dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    patch_size=32, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5))
RN101_FEATURES = VisionConfig(kind="features", feat_dim=2048)
TINY_CLIP = VisionConfig(kind="clip", feat_dim=64, image_size=224, clip=dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    patch_size=32, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5))


def tiny_lm(family: str, vocab_size: int) -> LMConfig:
    """A tiny T5 or BART for tests and the embedded default (ids match the tiny tokenizer)."""
    common = dict(d_model=64, num_heads=4, d_ff=128, enc_layers=2, dec_layers=2,
                  vocab_size=vocab_size, d_kv=16)
    if family == "t5":
        return LMConfig(family="t5", ffn_act="relu", pad_id=0, eos_id=1, decoder_start_id=0, **common)
    return LMConfig(family="bart", ffn_act="gelu", norm_eps=1e-5, max_positions=128,
                    scale_decoder_outputs=False, pad_id=0, eos_id=1, bos_id=3,
                    decoder_start_id=1, **common)


def preset(name: str) -> BackboneConfig:
    """Named presets: LM preset, optionally '+' a vision preset (``bart-base+clip-vit-b32``).

    LM presets: t5-base, bart-base, tiny-t5 (alias tiny), tiny-bart. Vision presets: rn101
    (precomputed 2048-d features, the papers' setting and the default for the base models),
    clip-vit-b32, tiny-clip (the default for the tiny models).
    """
    from petserve.adapters.backbone.tokenizer import TINY_VOCAB_SIZE
    lm_name, _, vis_name = name.partition("+")
    lms = {"t5-base": T5_BASE, "bart-base": BART_BASE, "tiny": tiny_lm("t5", TINY_VOCAB_SIZE),
           "tiny-t5": tiny_lm("t5", TINY_VOCAB_SIZE), "tiny-bart": tiny_lm("bart", TINY_VOCAB_SIZE)}
    visions = {"rn101": RN101_FEATURES, "clip-vit-b32": CLIP_VIT_B32, "tiny-clip": TINY_CLIP}
    if lm_name not in lms:
        raise ValueError(f"unknown backbone preset {lm_name!r}; choose one of {sorted(lms)}")
    if vis_name and vis_name not in visions:
        raise ValueError(f"unknown vision preset {vis_name!r}; choose one of {sorted(visions)}")
    default_vis = "tiny-clip" if lm_name.startswith("tiny") else "rn101"
    lm = lms[lm_name]
    return BackboneConfig(name=name, lm=lm, vision=visions[vis_name or default_vis],
                          extra_vis_tokens=SEED_ADDED_TOKENS.get(lm_name, 0),
                          visual_norm=visual_norm_of(lm.family))


AUDIO_PRESETS = ("tiny-ast", "ast-base")   # the audio family's (adapters/backbone/audio.py)

SEED_ADDED_TOKENS = {"t5-base": 32200 - 32128, "bart-base": 200}


def visual_norm_of(family: str) -> str:
    """The seeds' visual-embedding norm for a language-model family."""
    return "rms" if family == "t5" else "layer"


PRESETS = ("t5-base", "bart-base", "tiny", "tiny-t5", "tiny-bart")
