"""The VL backbone: VL-T5 / VL-BART with a frozen CLIP vision encoder."""
from adapters.backbone.config import PRESETS, BackboneConfig, LMConfig, VisionConfig, preset
from adapters.backbone.loading import build_backbone, fingerprint, save_backbone
from adapters.backbone.model import RowInput, VLModel, prompt_text
from adapters.backbone.visual import VisualTokens, feature_tokens

__all__ = ["PRESETS", "BackboneConfig", "LMConfig", "VisionConfig", "preset", "build_backbone",
           "fingerprint", "save_backbone", "RowInput", "VLModel", "prompt_text", "VisualTokens",
           "feature_tokens"]
