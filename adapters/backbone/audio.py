"""The audio backbone family: an Audio Spectrogram Transformer written for mixed-adapter batches.

AST (Gong et al.) is a ViT over a log-mel filterbank: 16x16 patches of the (frequency, time)
image, a CLS and a distillation token, learned positions, pre-LN encoder layers, a final
LayerNorm. The layers are the shared :class:`~petserve.adapters.backbone.layers.EncoderLayer`
(family "ast": pre-LN, LayerNorm, biased linears, exact GELU), so every adapter site has the name
it has in the VL backbones (``enc.3.self.q``, ``enc.3.ffn``) and the existing kinds run on it
unchanged. Classification (PETL for AST, "ALL"): the mean of the final tokens, then each row's own
head (``StepContext.head``).

Weights load from a local Hugging Face ``ASTModel`` / ``ASTForAudioClassification`` directory
(``save_pretrained`` layout, read by transformers itself so older checkpoints' names convert);
:func:`save_audio_backbone` writes that layout back, so the embedded default is an ordinary
checkpoint. The feature extractor is transformers' ``ASTFeatureExtractor`` with this config's
settings (adapters/data/audio.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from petserve.adapters.backbone.config import AUDIO_PRESETS, LMConfig
from petserve.adapters.backbone.layers import EncoderLayer, key_mask_bias, lm_norm
from petserve.adapters.backbone.lm import SiteIndex
from petserve.adapters.runtime.context import StepContext


@dataclass(frozen=True)
class AudioConfig:
    """An AST and its input: ``max_length`` frames (10 ms each) of ``num_mel_bins`` log-mel bins,
    normalised with (mean, std) as the checkpoint was trained."""

    name: str
    lm: LMConfig                  # family "ast", encoder only (dec_layers 0, no vocabulary)
    num_mel_bins: int = 128
    max_length: int = 1024
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    sampling_rate: int = 16000
    mean: float = -4.2677393
    std: float = 4.5689974

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency, time) patches."""
        return ((self.num_mel_bins - self.patch_size) // self.frequency_stride + 1,
                (self.max_length - self.patch_size) // self.time_stride + 1)

    @property
    def num_tokens(self) -> int:
        f, t = self.grid
        return f * t + 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_hf(cls, c: dict, name: str, extractor: dict | None = None) -> AudioConfig:
        """From an ``ASTConfig`` dict (and its ``preprocessor_config.json``, if any)."""
        if c.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"AST activation {c['hidden_act']!r} is not supported (gelu only)")
        d, heads = c.get("hidden_size", 768), c.get("num_attention_heads", 12)
        lm = LMConfig(family="ast", d_model=d, num_heads=heads, d_ff=c.get("intermediate_size", 3072),
                      enc_layers=c.get("num_hidden_layers", 12), dec_layers=0, vocab_size=0,
                      d_kv=d // heads, ffn_act="gelu", norm_eps=c.get("layer_norm_eps", 1e-12))
        e = extractor or {}
        return cls(name=name, lm=lm, num_mel_bins=c.get("num_mel_bins", 128),
                   max_length=c.get("max_length", 1024), patch_size=c.get("patch_size", 16),
                   frequency_stride=c.get("frequency_stride", 10), time_stride=c.get("time_stride", 10),
                   sampling_rate=e.get("sampling_rate", 16000), mean=e.get("mean", -4.2677393),
                   std=e.get("std", 4.5689974))

    def hf_config(self) -> dict:
        lm = self.lm
        return {"hidden_size": lm.d_model, "num_attention_heads": lm.num_heads,
                "intermediate_size": lm.d_ff, "num_hidden_layers": lm.enc_layers,
                "hidden_act": "gelu", "layer_norm_eps": lm.norm_eps, "patch_size": self.patch_size,
                "num_mel_bins": self.num_mel_bins, "max_length": self.max_length,
                "frequency_stride": self.frequency_stride, "time_stride": self.time_stride,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

    def extractor_config(self) -> dict:
        return {"num_mel_bins": self.num_mel_bins, "max_length": self.max_length,
                "sampling_rate": self.sampling_rate, "mean": self.mean, "std": self.std}


def audio_preset(name: str) -> AudioConfig:
    """``tiny-ast`` (the embedded default's shape: 1 s clips, 64 mel bins, d 64) or ``ast-base``
    (MIT/ast-finetuned-audioset-10-10's shape, 10.24 s; random weights)."""
    if name == "tiny-ast":
        lm = LMConfig(family="ast", d_model=64, num_heads=4, d_ff=256, enc_layers=4, dec_layers=0,
                      vocab_size=0, d_kv=16, ffn_act="gelu", norm_eps=1e-12)
        return AudioConfig(name=name, lm=lm, num_mel_bins=64, max_length=100)
    if name == "ast-base":
        return AudioConfig.from_hf({}, name)
    raise KeyError(f"unknown audio backbone preset {name!r}; presets: {', '.join(AUDIO_PRESETS)}")


class ASTEncoder(SiteIndex):
    """The encoder stack: pre-LN layers with adapter sites and the final LayerNorm."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_layers = nn.ModuleList(EncoderLayer(cfg, f"enc.{i}") for i in range(cfg.enc_layers))
        self.dec_layers = nn.ModuleList()
        self.enc_final_norm = lm_norm(cfg)

    def encode(self, x: torch.Tensor, valid: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        bias = key_mask_bias(valid, x.dtype)
        for layer in self.enc_layers:
            x = layer(x, bias, ctx)
        return ctx.norm("enc.final_norm", self.enc_final_norm, x)


class AudioModel(nn.Module):
    """AST with per-row adapters. ``visual_embed`` is empty: kinds that train a visual embedding
    find nothing to train here (audio adapters set ``train_visual_embedding`` false)."""

    family = "audio"

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.lm.d_model
        self.lm = ASTEncoder(cfg.lm)
        self.patch = nn.Conv2d(1, d, cfg.patch_size, stride=(cfg.frequency_stride, cfg.time_stride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_tokens, d))
        self.visual_embed = nn.Module()
        self.fingerprint = ""           # set by build_audio_backbone
        self.tokenizer = None

    @property
    def device(self):
        return self.pos.device

    @property
    def dtype(self):
        return self.pos.dtype

    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, frames, mel) normalised filterbanks -> (B, N + 2, d) tokens with positions."""
        x = self.patch(fbank.to(self.dtype).unsqueeze(1).transpose(2, 3)).flatten(2).transpose(1, 2)
        B = x.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.dist_token.expand(B, -1, -1), x], 1)
        return x + self.pos

    def encode(self, fbank: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Final tokens (B, T, d) and their validity (B, T); each row's prompt vectors (prompt
        tuning) come first, padding last. Sets ``ctx.meta.enc_valid``."""
        x = self.embed(fbank)
        x, valid = self._with_prefix(x, ctx)
        ctx.meta.enc_valid = valid
        return self.lm.encode(x, valid, ctx), valid

    def _with_prefix(self, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        stack = ctx.weights.prefix()
        B, N, _ = x.shape
        lens = [0] * B if stack is None else \
            [stack.lengths_host[s] if s >= 0 else 0 for s in ctx.meta.slots_host()]
        W = N + max(lens)
        if W == N:
            return x, torch.ones(B, N, dtype=torch.bool, device=x.device)
        rows = [torch.nn.functional.pad(torch.cat([stack.vectors[s, :p].to(x.dtype), x[i]]),
                                        (0, 0, 0, W - N - p)) if p else
                torch.nn.functional.pad(x[i], (0, 0, 0, W - N))
                for i, (s, p) in enumerate(zip(ctx.meta.slots_host(), lens))]
        valid = torch.arange(W, device=x.device)[None] < torch.tensor(lens, device=x.device)[:, None] + N
        return torch.stack(rows), valid

    def pooled(self, fbank: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """(B, d): the mean of each row's valid final tokens (prompts included, as the seed)."""
        h, valid = self.encode(fbank, ctx)
        m = valid.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def classify(self, fbank: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """(B, C_max) logits of each row's head; raises when no row has one."""
        logits = ctx.head(self.pooled(fbank, ctx))
        if logits is None:
            raise ValueError("no row of this batch has a classification head")
        return logits


# ---- Hugging Face layout -------------------------------------------------------------------
# (our name, transformers 5 ASTModel name): transformers converts older checkpoints' names
# (attention.attention.query, intermediate.dense, ...) and ASTForAudioClassification's prefix
# when it loads them.
_NAMES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"dist_token", r"embeddings.distillation_token"),
    (r"pos", r"embeddings.position_embeddings"),
    (r"patch\.(\w+)", r"embeddings.patch_embeddings.projection.\1"),
    (r"lm\.enc_layers\.(\d+)\.self_attn\.([qkvo])\.(\w+)", r"layers.\1.attention.\2_proj.\3"),
    (r"lm\.enc_layers\.(\d+)\.self_norm\.(\w+)", r"layers.\1.layernorm_before.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn_norm\.(\w+)", r"layers.\1.layernorm_after.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn\.wi\.(\w+)", r"layers.\1.mlp.fc1.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn\.wo\.(\w+)", r"layers.\1.mlp.fc2.\2"),
    (r"lm\.enc_final_norm\.(\w+)", r"layernorm.\1"),
]


# ... and as transformers writes them to disk (save_pretrained keeps the 4.x names, which is
# also how the published AST checkpoints name them)
_SAVED_NAMES = [
    *_NAMES[:4],
    (r"lm\.enc_layers\.(\d+)\.self_attn\.q\.(\w+)", r"encoder.layer.\1.attention.attention.query.\2"),
    (r"lm\.enc_layers\.(\d+)\.self_attn\.k\.(\w+)", r"encoder.layer.\1.attention.attention.key.\2"),
    (r"lm\.enc_layers\.(\d+)\.self_attn\.v\.(\w+)", r"encoder.layer.\1.attention.attention.value.\2"),
    (r"lm\.enc_layers\.(\d+)\.self_attn\.o\.(\w+)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"lm\.enc_layers\.(\d+)\.self_norm\.(\w+)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn_norm\.(\w+)", r"encoder.layer.\1.layernorm_after.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn\.wi\.(\w+)", r"encoder.layer.\1.intermediate.dense.\2"),
    (r"lm\.enc_layers\.(\d+)\.ffn\.wo\.(\w+)", r"encoder.layer.\1.output.dense.\2"),
    _NAMES[-1],
]


def hf_names(model: AudioModel, table=_NAMES) -> dict[str, str]:
    """Our parameter name -> its transformers ASTModel name (``table``: _NAMES, the module's;
    _SAVED_NAMES, the file's), for every weight of ``model``."""
    out = {}
    for name in model.state_dict():
        for ours, hf in table:
            m = re.fullmatch(ours, name)
            if m:
                out[name] = m.expand(hf)
                break
        else:
            raise KeyError(f"no Hugging Face name for {name!r}")
    return out


HF_PREFIX = "audio_spectrogram_transformer."     # ASTForAudioClassification's nesting


def load_audio_directory(path: Path) -> AudioModel:
    """A local Hugging Face AST checkpoint directory into an AudioModel. Weights named as
    transformers saves them (or as its 5.x modules name them) are read directly (safetensors
    only); any other layout goes through transformers' own loader and its conversions (imported
    only then: it costs ~190 MiB)."""
    from petserve.adapters.backbone.hf_weights import read_state_dict
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face AST checkpoint)")
    c = json.loads((path / "config.json").read_text())
    if c.get("model_type") != "audio-spectrogram-transformer":
        raise ValueError(f"{path}: config.json is a {c.get('model_type')!r} model, not an "
                         "audio-spectrogram-transformer")
    pre = path / "preprocessor_config.json"
    cfg = AudioConfig.from_hf(c, path.name, json.loads(pre.read_text()) if pre.exists() else None)
    model = AudioModel(cfg)
    theirs = {k.removeprefix(HF_PREFIX): v for k, v in read_state_dict(path).items()}
    for table in (_SAVED_NAMES, _NAMES):
        names = hf_names(model, table)
        if set(names.values()) <= set(theirs):
            break
    else:
        from transformers import ASTConfig, ASTModel
        hf = ASTModel.from_pretrained(str(path), config=ASTConfig(**{**c, **cfg.hf_config()}))
        names, theirs = hf_names(model), hf.state_dict()
    model.load_state_dict({ours: theirs[name] for ours, name in names.items()})
    return model


def save_audio_backbone(model: AudioModel, directory: Path) -> None:
    """Write ``model`` as a Hugging Face ASTModel directory (config, weights, preprocessor)."""
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel
    directory = Path(directory)
    hf = ASTModel(ASTConfig(**model.cfg.hf_config()))
    state = model.state_dict()
    hf.load_state_dict({name: state[ours].detach().cpu() for ours, name in hf_names(model).items()})
    hf.save_pretrained(str(directory))
    ASTFeatureExtractor(**model.cfg.extractor_config()).save_pretrained(str(directory))


def build_audio_backbone(spec: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> AudioModel:
    """The frozen audio backbone named by ``spec`` (preset or HF directory), eval mode, grads off."""
    from petserve.adapters.backbone.loading import fingerprint
    path = Path(spec)
    torch.manual_seed(seed)
    if path.is_dir():
        model = load_audio_directory(path)
    elif str(spec) in AUDIO_PRESETS:
        model = AudioModel(audio_preset(str(spec)))
        init_audio_weights(model)
    else:
        raise FileNotFoundError(f"audio backbone {spec!r} is neither a preset nor a directory")
    model.requires_grad_(False)
    model.fingerprint = fingerprint(model)
    model.eval().to(device=device, dtype=dtype)
    return model


def init_audio_weights(model: AudioModel) -> None:
    """ViT-style initialisation (transformers' AST: normal(0.02) weights, zero biases)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.trunc_normal_(p, std=0.02)
