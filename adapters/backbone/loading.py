"""Build, save and fingerprint backbones.

A backbone is named by a preset (``tiny``, ``t5-base``, ``bart-base+clip-vit-b32``; random weights,
seeded) or a local directory:

* a petserve backbone directory: ``backbone.json`` + ``model.safetensors`` (+ ``tokenizer/``), as
  written by :func:`save_backbone`;
* a Hugging Face T5/BART checkpoint directory (``config.json`` + ``*.safetensors``), optionally with
  a ``vision/`` subdirectory holding a CLIP vision checkpoint. Without one the backbone takes
  precomputed 2048-d features (VL-Adapter's CLIP RN101 setting).

The fingerprint (sha256 of the config and every weight) is recorded in each adapter file, so an
adapter is never served on a backbone it was not trained for.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from petserve.adapters.backbone.config import (
    RN101_FEATURES,
    BackboneConfig,
    VisionConfig,
    preset,
    visual_norm_of,
)
from petserve.adapters.backbone.hf_weights import lm_config_from_hf, load_lm_weights, read_state_dict
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.backbone.tokenizer import load_tokenizer


def build_backbone(spec: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> VLModel:
    """The frozen backbone named by ``spec`` (preset or directory), in eval mode, grads off."""
    path = Path(spec)
    torch.manual_seed(seed)     # weights a directory lacks must match across replicas
    if path.is_dir():
        model = _from_directory(path)
    elif str(spec).split("+")[0] in ("tiny", "tiny-t5", "tiny-bart", "t5-base", "bart-base"):
        cfg = preset(str(spec))
        model = VLModel(cfg, load_tokenizer(None, cfg.lm.family))
        init_weights(model)
    else:
        raise FileNotFoundError(f"backbone {spec!r} is neither a preset nor a directory")
    model.requires_grad_(False)
    model.fingerprint = fingerprint(model)   # of the weights as stored, before any cast
    model.eval().to(device=device, dtype=dtype)
    return model


def _from_directory(path: Path) -> VLModel:
    if (path / "backbone.json").exists():
        cfg = BackboneConfig.from_dict(json.loads((path / "backbone.json").read_text()))
        model = VLModel(cfg, load_tokenizer(path / "tokenizer", cfg.lm.family))
        state = read_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match backbone.json "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: neither backbone.json nor a Hugging Face config.json")
    lm_cfg = lm_config_from_hf(path)
    vision = _vision_config(path / "vision")
    cfg = BackboneConfig(name=path.name, lm=lm_cfg, vision=vision,
                         visual_norm=visual_norm_of(lm_cfg.family))
    model = VLModel(cfg, load_tokenizer(path, lm_cfg.family))
    init_weights(model)
    load_lm_weights(model.lm, path)
    if model.vision is not None:
        load_clip_weights(model.vision.clip, path / "vision")
    return model


def load_clip_weights(clip: torch.nn.Module, directory: Path) -> None:
    """A Hugging Face CLIP (or CLIP vision) checkpoint into our ClipVision (the same names, less
    the ``vision_model.`` nesting of transformers 4.x and the text tower)."""
    state = {}
    for k, v in read_state_dict(directory).items():
        if k.startswith("text_model.") or k in ("logit_scale",) or "projection" in k \
                or k.endswith("position_ids"):
            continue
        state[k.removeprefix("vision_model.")] = v
    clip.load_state_dict(state)


def _vision_config(vdir: Path) -> VisionConfig:
    if not (vdir / "config.json").exists():
        return RN101_FEATURES
    c = json.loads((vdir / "config.json").read_text())
    c = c.get("vision_config", c)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "patch_size", "image_size", "hidden_act", "layer_norm_eps")
    clip = {k: c[k] for k in keys if k in c}
    return VisionConfig(kind="clip", feat_dim=clip["hidden_size"], clip=clip,
                        image_size=clip.get("image_size", 224))


def init_weights(model: VLModel) -> None:
    """T5/BART-style initialisation (the T5 scales fold attention's 1/sqrt(d) into q)."""
    cfg = model.cfg.lm
    for name, p in model.lm.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        elif cfg.family == "t5":
            fan = cfg.d_model * cfg.d_kv if name.endswith(".q.weight") else (
                cfg.d_ff if ".wo." in name else cfg.d_model)
            torch.nn.init.normal_(p, std=1.0 if name == "tokens.weight" else fan ** -0.5)
        else:
            torch.nn.init.normal_(p, std=0.02)
    ve = model.visual_embed
    for lin in (ve.feat, ve.box):
        torch.nn.init.normal_(lin.weight, std=0.02)
        torch.nn.init.zeros_(lin.bias)
    torch.nn.init.normal_(ve.img_order.weight, std=0.02)


def save_backbone(model: VLModel, directory: Path) -> None:
    """Write a petserve backbone directory that :func:`build_backbone` reads back identically."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory / "backbone.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    model.tokenizer.save_pretrained(str(directory / "tokenizer"))


def fingerprint(model: VLModel) -> str:
    """sha256 over the config and every weight's name, dtype, shape and bytes (first 16 hex)."""
    h = hashlib.sha256(replace(model.cfg, name="").to_json().encode())
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            return "meta"
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
