"""The VL backbone: VL-T5 / VL-BART with a frozen CLIP vision encoder."""
from petserve.adapters.backbone.config import PRESETS, BackboneConfig, LMConfig, VisionConfig, preset
from petserve.adapters.backbone.loading import build_backbone, fingerprint, save_backbone
from petserve.adapters.backbone.model import RowInput, VLModel, prompt_text
from petserve.adapters.backbone.visual import VisualTokens, feature_tokens

__all__ = ["PRESETS", "BackboneConfig", "LMConfig", "VisionConfig", "preset", "build_backbone",
           "fingerprint", "save_backbone", "RowInput", "VLModel", "prompt_text", "VisualTokens",
           "feature_tokens"]
