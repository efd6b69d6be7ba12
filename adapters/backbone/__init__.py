"""The VL backbone: VL-T5 / VL-BART with a frozen CLIP vision encoder.

The configs import without torch; the model side (loading, model, visual) is imported on first
use, so that a process that only needs PRESETS (the `petserve` CLI's parser, and with it the
long-lived driver of `petserve serve`) never loads torch."""
from importlib import import_module

from petserve.adapters.backbone.config import PRESETS, BackboneConfig, LMConfig, VisionConfig, preset

_LAZY = {"build_backbone": "loading", "fingerprint": "loading", "save_backbone": "loading",
         "RowInput": "model", "VLModel": "model",
         "VisualTokens": "visual", "feature_tokens": "visual"}

__all__ = ["PRESETS", "BackboneConfig", "LMConfig", "VisionConfig", "preset", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
