"""Parameter counting as the papers report it (``petserve params``).

percent = trainable / (language model + visual embedding + adapter modules), CLIP excluded. The
language model is counted with its vocabulary as VL-T5 / VL-BART used it: BART-base's 50265 tokens
plus 100 ``<extra_id_k>`` and 100 ``<vis_extra_id_k>``; T5-base resized to 32200 tokens
(``BackboneConfig.extra_vis_tokens``).
"""
from __future__ import annotations

import math

import torch

from petserve.adapters.backbone.config import preset
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.kinds import get_kind


def shape_model(backbone: str) -> VLModel:
    """A backbone with every weight on the meta device: shapes only, no memory, no download."""
    cfg = preset(backbone)
    with torch.device("meta"):
        return VLModel(cfg, tokenizer=None)


def count(backbone: str, kind: str, options: dict | None = None) -> dict:
    """``{"trainable": N, "total": M, "percent": P}`` for one kind and config on a preset backbone."""
    model = shape_model(backbone)
    kind_cls = get_kind(kind)
    cfg = kind_cls.resolve(kind_cls.Config(**(options or {})), model)
    shapes = kind_cls.param_shapes(cfg, model)
    trainable = sum(math.prod(s) for s in shapes.values())
    modules = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(("vec.", "visual.")))
    lm = sum(p.numel() for p in model.lm.parameters())
    lm += model.cfg.extra_vis_tokens * model.cfg.lm.d_model
    visual = sum(p.numel() for p in model.visual_embed.parameters())
    total = lm + visual + modules
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / total, 2)}


def count_audio(backbone: str, kind: str, options: dict | None = None, classes: int = 50) -> dict:
    """The same for the audio family (PETL for AST's count): the kind's modules, the norms it
    trains and a ``classes``-way head are trainable (BatchNorm running statistics are not);
    total = the AST + the adapter modules + the head."""
    from petserve.adapters.backbone.audio import AudioModel, audio_preset
    with torch.device("meta"):
        model = AudioModel(audio_preset(backbone))
    kind_cls = get_kind(kind)
    labels = tuple(f"class{i}" for i in range(classes))
    cfg = kind_cls.Config(**{**(options or {}), "train_visual_embedding": False, "labels": labels})
    shapes = kind_cls.param_shapes(cfg, model)
    buffers = kind_cls.buffers(cfg, model)
    trainable = sum(math.prod(s) for k, s in shapes.items() if k not in buffers)
    modules = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("vec.")
                  and k not in buffers)
    total = sum(p.numel() for p in model.parameters()) + modules
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / total, 2)}
