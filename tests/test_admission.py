"""Admission (serving/schemas.py build_inference_request): the one place a request is validated,
against the backbone and the engine's configured limits, so the engine can trust what it gets."""
from __future__ import annotations

import numpy as np
import pytest

from petserve.serving.errors import ApiError
from petserve.serving.schemas import (
    CaptionRequest,
    MediaBytes,
    ModelInputs,
    VqaRequest,
    build_inference_request,
)
from petserve.serving.server_config import MAX_BEAMS, MAX_NEW_TOKENS, EngineConfig, MediaSettings
from tests.test_api import features, png_bytes

LIMITS = MediaSettings().limits()
CAPPED = EngineConfig(max_new_tokens_cap=16, max_beams=3)


def inputs(pixels: bool = True, engine: EngineConfig = CAPPED) -> ModelInputs:
    return ModelInputs(64, pixels, 8, engine.max_new_tokens_cap, engine.max_beams)


def admit(body: dict, media: MediaBytes | None = None, model_inputs: ModelInputs | None = None,
          cls=VqaRequest):
    return build_inference_request(cls.model_validate(body), media or MediaBytes(),
                                   model_inputs or inputs(), LIMITS)


BAD = [
    ("over the configured token cap", {"max_new_tokens": 17}, 422, "invalid_max_new_tokens"),
    ("over the configured beam cap", {"num_beams": 4}, 422, "invalid_num_beams"),
    ("a box per feature row", {"boxes": [[0, 0, 1, 1]]}, 422, "invalid_features"),
    ("feature width", {"features": [[0.5] * 7]}, 422, "invalid_features"),
    ("float32 overflow", {"features": [[1e300] * 64]}, 422, "invalid_features"),
]


@pytest.mark.parametrize("name,change,status,code", BAD, ids=[c[0] for c in BAD])
def test_admission_refuses(name, change, status, code):
    body = {"question": "what?", "features": features(0), **change}
    with pytest.raises(ApiError) as e:
        admit(body)
    assert (e.value.status, e.value.code) == (status, code), e.value.message


def test_the_engine_limits_are_the_schema_caps():
    assert VqaRequest.model_fields["max_new_tokens"].metadata[1].le == MAX_NEW_TOKENS
    assert VqaRequest.model_fields["num_beams"].metadata[1].le == MAX_BEAMS
    with pytest.raises(ValueError):
        EngineConfig(max_new_tokens_cap=MAX_NEW_TOKENS + 1)


def test_a_features_only_backbone_refuses_pixels():
    with pytest.raises(ApiError) as e:
        admit({"question": "what?"}, MediaBytes(image=png_bytes(1)), inputs(pixels=False))
    assert (e.value.status, e.value.code) == (422, "features_only")


def test_admitted_requests_carry_what_the_engine_needs():
    vqa = admit({"question": "what?", "num_beams": 3, "max_new_tokens": 16},
                MediaBytes(image=png_bytes(2)))
    assert (vqa.task, vqa.num_beams, vqa.max_new_tokens) == ("vqa", 3, 16)
    assert vqa.images[0].mode == "RGB" and vqa.features is None
    pair = admit({"question": "both round?"}, MediaBytes(pair=[png_bytes(3), png_bytes(4)]))
    assert pair.task == "nlvr" and len(pair.images) == 2
    cap = admit({"features": features(5)}, cls=CaptionRequest)
    assert cap.task == "caption" and cap.max_new_tokens is None      # the engine's default
    assert cap.features.dtype == np.float32 and cap.features.shape == (4, 64)
