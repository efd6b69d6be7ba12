"""The HTTP boundary: pydantic models of every request and response body, and admission.

Field-level rules (lengths, ranges, id syntax) live on the models, so they show in /docs and fail
with a 422 naming the field. Rules that span fields (exactly one media source, nlvr needs two
images) are checked by `build_inference_request` when it turns a body into an engine request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from petserve.adapters.tasks import QUESTION_TASKS
from petserve.serving.engine_io import ClassifyRequest as EngineClassifyRequest
from petserve.serving.engine_io import ContextInput, InferenceRequest
from petserve.serving.errors import ApiError
from petserve.serving.media import MediaLimits, decode_base64, decode_image, decode_video
from petserve.serving.server_config import MAX_BEAMS, MAX_MEMBERS, MAX_NEW_TOKENS
from petserve.serving.store import ADAPTER_ID_RE, StoredAdapter, validate_adapter_id

MAX_TEXT_CHARS = 1024
MAX_LABELS, MAX_TOP_K = 1000, 50
MAX_FEATURE_TOKENS = 1024
MAX_FEATURE_DIM = 8192


def _valid_id(value: str) -> str:
    try:
        return validate_adapter_id(value)
    except ApiError as e:   # pydantic turns ValueError into a 422 naming the field
        raise ValueError(e.message) from None


def _valid_unicode(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); the tokenizer cannot encode them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


AdapterId = Annotated[
    str,
    Field(pattern=f"^{ADAPTER_ID_RE}$", examples=["colors"]),
    AfterValidator(_valid_id),
]
Text = Annotated[str, AfterValidator(_valid_unicode)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureRow = Annotated[list[FiniteFloat], Field(min_length=1, max_length=MAX_FEATURE_DIM)]
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]
BoxRow = Annotated[list[UnitFloat], Field(min_length=4, max_length=4)]

_ADAPTER_DOC = ("id of the adapter to apply; null or omitted: the frozen backbone alone. "
                "1-64 characters from a-z, 0-9, '.', '_', '-', starting with a letter or digit")
_COMPOSE_DOC = (f"; or a list of 1-{MAX_MEMBERS} ids composed per request: their changes to the "
                "backbone add up (sft, lora, vectors, visual embedding), with at most one member "
                "bringing a module (bottleneck, VL-PET, prompt) to any site")
_B64_DOC = " as base64 (standard alphabet, padded) or a data URL 'data:<type>;base64,...'"
_FEATURES_DOC = ("precomputed visual features, one row per visual token: shape (tokens, "
                 "feature_dim) where feature_dim is the backbone's (see /healthz)")


# ---- cross-field rules, as JSON Schema ------------------------------------------------------
# The server checks them in build_inference_request / build_classify_request / build_context; the
# schema states the same rules, so /openapi.json admits exactly what the server accepts. A JSON
# field counts as given when it is there and not null; a form field when it is there and not empty
# (the server skips empty form fields).


_FILE_PARTS = ("image", "images", "video", "audio")     # multipart files: given when present


def given(name: str, form: bool = False) -> dict:
    if form and name in _FILE_PARTS:
        return {"required": [name]}
    return {"required": [name],
            "properties": {name: {"minLength": 1} if form else {"not": {"type": "null"}}}}


def exactly_one(*names: str, form: bool = False) -> dict:
    return {"oneOf": [given(n, form) for n in names]}


def implies(condition: dict, then: dict) -> dict:
    return {"anyOf": [{"not": condition}, then]}


def not_both(a: dict, b: dict) -> dict:
    return {"not": {"allOf": [a, b]}}


def task_in(*tasks: str) -> dict:
    return {"required": ["task"], "properties": {"task": {"enum": list(tasks)}}}


def generation_rules(media: tuple[str, ...], question: bool) -> list[dict]:
    """The cross-field rules of /v1/vqa (``question``) and /v1/caption JSON bodies."""
    rules = [exactly_one(*media),
             implies(given("boxes"), given("features")),
             not_both(given("adapter"), given("context"))]
    if question:     # an image pair is nlvr's and only nlvr's; a video question is vqa's
        rules += [implies(given("images"), {"not": task_in("vqa", "gqa")}),
                  implies(task_in("nlvr"), given("images")),
                  not_both(given("video"), task_in("gqa"))]
    return rules


def form_rules(media: tuple[str, ...], question: bool) -> list[dict]:
    """The same rules for a multipart form, in the keywords schemathesis (4.32) can generate
    file parts under (no ``not``, ``anyOf`` or ``if`` over the whole form: its filters fail on a
    file's bytes): exactly one media source, and an image pair only for nlvr. The rest (boxes
    only with features, adapter xor context, nlvr needs the pair) the server checks with a 422,
    as the JSON body's schema states."""
    rules: list[dict] = [exactly_one(*media, form=True)]
    if question:     # an empty task is no task: the pair makes it nlvr
        rules.append({"dependentSchemas": {"images": {"properties": {
            "task": {"enum": ["nlvr", ""]}}}}})
    return rules


def _with_rules(*rules: dict):
    """A pydantic ``json_schema_extra`` adding ``rules`` to the model's schema as ``allOf``."""
    def extra(schema: dict) -> None:
        schema["allOf"] = [*schema.get("allOf", []), *rules]
    return extra


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DEMO_FIELDS = ("image", "question", "answer")


class ContextEntry(Body):
    """One item of a context: a demonstration (image, question and answer), or plain text."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_with_rules({"oneOf": [
        {"allOf": [given("text"), *({"not": given(f)} for f in _DEMO_FIELDS)]},
        {"allOf": [{"not": given("text")}, *(given(f) for f in _DEMO_FIELDS)]}]}))

    image: str | None = Field(None, description="the demonstration's image" + _B64_DOC)
    question: Text | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS,
                                  description="the demonstration's question")
    answer: Text | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS,
                                description="the demonstration's answer")
    text: Text | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS,
                              description="a text-only item (instead of image, question, answer)")


class GenerationFields(Body):
    adapter: str | list[str] | None = Field(
        None, description=_ADAPTER_DOC + _COMPOSE_DOC,
        json_schema_extra={"anyOf": [
            {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$"},
            {"type": "array", "minItems": 1, "maxItems": MAX_MEMBERS, "uniqueItems": True,
             "items": {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$"}},
            {"type": "null"}]})

    context: list[ContextEntry] | None = Field(
        None, min_length=1, description="instead of `adapter`: demonstrations (or text items) the "
        "server's generator turns into an adapter for this request (Generative Adapter); cached "
        "by the context's hash, never stored")

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_ids(cls, v):
        """One id, or a list of distinct ids (a composite); every error names the field."""
        if v is None:
            return v
        if isinstance(v, str):
            return _valid_id(v)
        if not isinstance(v, list) or not all(isinstance(i, str) for i in v):
            raise ValueError("must be an adapter id or a list of adapter ids")
        if not 1 <= len(v) <= MAX_MEMBERS:
            raise ValueError(f"a composite names 1 to {MAX_MEMBERS} adapters, not {len(v)}")
        if len(set(v)) != len(v):
            raise ValueError("a composite names each adapter once")
        return [_valid_id(i) for i in v]
    image: str | None = Field(None, description="one JPEG/PNG/WebP/BMP/GIF image" + _B64_DOC)
    video: str | None = Field(None, description="one video file (mp4, webm, ...)" + _B64_DOC)
    features: list[FeatureRow] | None = Field(
        None, min_length=1, max_length=MAX_FEATURE_TOKENS, description=_FEATURES_DOC)
    boxes: list[BoxRow] | None = Field(
        None, max_length=MAX_FEATURE_TOKENS,
        description="optional boxes for `features`: one [x1, y1, x2, y2] in [0, 1] per row")
    max_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS,
        description=f"most tokens to generate (1-{MAX_NEW_TOKENS}); default 20, captions 40")
    num_beams: int = Field(1, ge=1, le=MAX_BEAMS,
                           description=f"1: greedy decoding; 2-{MAX_BEAMS}: beam search")


class VqaRequest(GenerationFields):
    """Answer a question about an image, an image pair (nlvr), a video or precomputed features."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_with_rules(*generation_rules(
        ("image", "images", "video", "features"), question=True)))

    question: Text = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                           description="the question (for nlvr: the statement to verify)")
    images: list[str] | None = Field(
        None, min_length=2, max_length=2,
        description="exactly two images for task nlvr, each" + _B64_DOC)
    task: Literal[QUESTION_TASKS] | None = Field(
        None, description="vqa (default), gqa, or nlvr (needs `images`); a video question "
                          "is always video_qa")


class CaptionRequest(GenerationFields):
    """Describe an image, a video or precomputed features."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_with_rules(*generation_rules(
        ("image", "video", "features"), question=False)))

    prompt: Text = Field("", max_length=MAX_TEXT_CHARS,
                         description="optional text after the 'caption:' prefix")


class GenerateRequest(Body):
    """Turn a context into an adapter with the server's generator (Generative Adapter)."""

    context: list[ContextEntry] = Field(
        min_length=1, description="demonstrations of the task (or text items); the server's "
        "max_context_items bounds their number (more: 413)")


Label = Annotated[Text, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class ClassifyRequest(Body):
    """Classify an image: on a cache adapter (CapS), or CLIP zero-shot over ``labels``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_with_rules(
        exactly_one("adapter", "labels"), given("image")))

    adapter: AdapterId | None = Field(None, description="a cache adapter's id (kind cache, made by "
                                      "`petserve build-cache`); or omit it and give `labels`")
    labels: list[Label] | None = Field(
        None, min_length=1, max_length=MAX_LABELS, description="instead of `adapter`: the class "
        "prompts for CLIP zero-shot, e.g. [\"a red circle\", \"a blue square\"]")
    image: str | None = Field(None, description="the image to classify" + _B64_DOC)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many (label, score) pairs to return")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("labels must be distinct")
        return v


class ClassifyResponse(BaseModel):
    label: str = Field(description="the likeliest class")
    scores: list[tuple[str, float]] = Field(description="the top_k [label, probability] pairs, "
                                            "best first")
    adapter: str | None = Field(description="the cache adapter used; null: zero-shot")
    adapter_version: int | None = Field(description="its version; null: zero-shot")
    timings_ms: dict[str, float] = Field(description="where the time went, in milliseconds")


class AudioClassifyRequest(Body):
    """Classify an audio clip with an audio adapter (its head names the classes)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_with_rules(given("audio")))

    adapter: AdapterId = Field(description="an audio adapter's id (petserve train --family audio)")
    audio: str | None = Field(None, description="the clip: wav, flac or ogg" + _B64_DOC)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K, description="how many (label, score) pairs to return")


class AudioClassifyResponse(ClassifyResponse):
    adapter: str = Field(description="the audio adapter used")
    adapter_version: int = Field(description="its version")


class _Generated(BaseModel):
    """What every generation answer carries besides its text."""

    logprob: float = Field(description="log-probability of the generated text under the model")
    adapter: str | list[str] | None = Field(
        description="adapter used (a list: the composite, in request order); null: the backbone alone")
    adapter_version: int | None = Field(
        description="version of the adapter that answered; null for a composite or the backbone")
    adapter_versions: list[int] = Field(
        description="the version of every adapter used, in order (one for a single adapter)")
    timings_ms: dict[str, float] = Field(description="where the time went, in milliseconds")
    context_sha256: str | None = Field(None, description="a request with an inline `context`: the "
                                       "context's sha256 (its generated adapter answered)")


class VqaResponse(_Generated):
    answer: str = Field(description="the generated answer")


class CaptionResponse(_Generated):
    caption: str = Field(description="the generated caption")


class AdapterInfo(BaseModel):
    id: str = Field(description="adapter id")
    version: int = Field(description="version number; every upload of an id adds one")
    kind: str = Field(description="adapter kind: lora, adapter, vlpet, ...")
    task: str = Field(description="task the adapter was trained for")
    trainable_parameters: int = Field(description="parameters the adapter trains")
    sha256: str = Field(description="sha256 of the stored file")
    size: int = Field(description="stored file size in bytes")
    created: float = Field(description="upload time, seconds since the epoch")

    @classmethod
    def from_stored(cls, stored: StoredAdapter) -> AdapterInfo:
        meta = stored.meta
        return cls(id=stored.id, version=stored.version, kind=str(meta.get("kind", "")),
                   task=str(meta.get("task", "")),
                   trainable_parameters=int(meta.get("trainable_parameters", 0)),
                   sha256=stored.sha256, size=stored.size, created=stored.created)


class AdapterList(BaseModel):
    adapters: list[AdapterInfo] = Field(description="latest version of every adapter, by id")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field(description="always 'ok' when the server answers")
    backbone: str = Field(description="backbone name")
    fingerprint: str = Field(description="backbone fingerprint adapters must match")
    feature_dim: int = Field(description="width of rows in `features`")
    accepts_pixels: bool = Field(description="false: features only (no vision encoder)")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. adapter_not_found")
    message: str = Field(description="what was wrong, in one sentence")


class ErrorResponse(BaseModel):
    error: ErrorDetail


def finite_or_floor(x: float) -> float:
    """JSON has no -inf: a hopeless answer gets the most negative finite double instead."""
    return x if math.isfinite(x) else -1.7976931348623157e308


def describe_validation_error(errors: list[dict]) -> str:
    """pydantic/FastAPI error list -> 'question: String should have at most 1024 characters'."""
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) if loc else "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def json_body(raw: bytes, model_cls):
    """A JSON body validated into ``model_cls``; ApiError 400 (not JSON) / 422 otherwise."""
    try:
        # strict: JSON `true` or "2" is not a number (form fields are strings, so forms stay lax)
        return model_cls.model_validate_json(raw or b"null", strict=True)
    except ValidationError as e:
        raise validation_api_error(e) from None


def validation_api_error(e: ValidationError) -> ApiError:
    """A pydantic ValidationError as the ApiError the client sees (400 for unparseable JSON)."""
    errors = e.errors(include_url=False, include_input=False)
    if any(err.get("type") == "json_invalid" for err in errors):
        return ApiError.bad_request("invalid_json", "the body is not valid JSON: "
                                    + describe_validation_error(errors))
    return ApiError.unprocessable("invalid_request", describe_validation_error(errors))


_EMPTY = {"type": "string", "maxLength": 0}


def _empty_is_absent(form: dict) -> dict:
    """A form's optional text fields may also be empty: the server skips empty fields (an HTML
    form sends its blank inputs), so "" must be valid wherever leaving the field out is."""
    for name, prop in form["properties"].items():
        if name not in form["required"] and prop.get("format") != "binary" and \
                prop.get("type") != "array" and prop.get("maxLength") is None:
            doc = {"description": prop.pop("description")} if "description" in prop else {}
            form["properties"][name] = {"anyOf": [prop, _EMPTY], **doc}
    return form


def _form_schema(title: str, text_fields: dict, required: list[str]) -> dict:
    binary = {"type": "string", "format": "binary"}
    props = dict(text_fields)
    props.update({
        "adapter": {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$", "description": _ADAPTER_DOC},
        "image": {**binary, "description": "image file"},
        "video": {**binary, "description": "video file"},
        "features": {"type": "string", "description": "JSON array: " + _FEATURES_DOC},
        "boxes": {"type": "string", "description": "JSON array of [x1, y1, x2, y2] rows"},
        "context": {"type": "string", "description": "instead of adapter: a JSON array of "
                    "{image (base64), question, answer} or {text} items (Generative Adapter)"},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": MAX_BEAMS},
    })
    return {"title": title, "type": "object", "properties": props, "required": required,
            "additionalProperties": False}


VQA_FORM_SCHEMA = _empty_is_absent({**_form_schema("VqaForm", {
    "question": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS},
    "task": {"type": "string", "enum": list(QUESTION_TASKS)},
    "images": {"type": "array", "items": {"type": "string", "format": "binary"},
               "minItems": 2, "maxItems": 2, "description": "two image files (nlvr)"},
}, ["question"]), "allOf": form_rules(("image", "images", "video", "features"), question=True)})
CAPTION_FORM_SCHEMA = _empty_is_absent({**_form_schema("CaptionForm", {
    "prompt": {"type": "string", "maxLength": MAX_TEXT_CHARS},
}, []), "allOf": form_rules(("image", "video", "features"), question=False)})
CLASSIFY_FORM_SCHEMA = _empty_is_absent({"title": "ClassifyForm", "type": "object", "properties": {
    "adapter": {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$",
                "description": "a cache adapter's id"},
    "labels": {"type": "string", "description": "instead of adapter: a JSON array of class prompts"},
    "image": {"type": "string", "format": "binary", "description": "image file"},
    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
}, "required": ["image"], "additionalProperties": False,
    "allOf": [exactly_one("adapter", "labels", form=True), given("image", form=True)]})


AUDIO_FORM_SCHEMA = _empty_is_absent({"title": "AudioClassifyForm", "type": "object", "properties": {
    "adapter": {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$",
                "description": "an audio adapter's id"},
    "audio": {"type": "string", "format": "binary", "description": "audio file (wav, flac, ogg)"},
    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K},
}, "required": ["adapter", "audio"], "additionalProperties": False})


# ---- body -> engine request -----------------------------------------------------------------


@dataclass
class MediaBytes:
    """Raw media of one request, however it arrived (base64 in JSON, or multipart files)."""

    image: bytes | None = None
    pair: list[bytes] = field(default_factory=list)     # `images`: the nlvr pair
    video: bytes | None = None


@dataclass(frozen=True)
class ModelInputs:
    """What admission checks a request against: the backbone (BackendInfo) and the limits of the
    engine it will run on (EngineConfig), so the engine can trust what admission built."""

    feature_dim: int
    accepts_pixels: bool
    video_frames: int
    max_new_tokens: int          # EngineConfig.max_new_tokens_cap
    max_beams: int               # EngineConfig.max_beams
    max_context_items: int = 64  # EngineConfig.max_context_items


def media_from_json(body: GenerationFields, limits: MediaLimits) -> MediaBytes:
    """Decode the base64 media fields (size limits are checked before decoding)."""
    def b64(value: str | None, name: str, max_bytes: int) -> bytes | None:
        return None if value is None else decode_base64(value, field=name, max_bytes=max_bytes)
    pair = getattr(body, "images", None) or []
    return MediaBytes(
        image=b64(body.image, "image", limits.max_image_bytes),
        pair=[b64(v, f"images[{i}]", limits.max_image_bytes) for i, v in enumerate(pair)],
        video=b64(getattr(body, "video", None), "video", limits.max_video_bytes))


def build_inference_request(body: VqaRequest | CaptionRequest, media: MediaBytes,
                            inputs: ModelInputs, limits: MediaLimits):
    """Admission: check the cross-field rules and the engine's limits, decode the media, and
    return the serving.engine_io request the engine trusts.

    Raises ApiError: 422 for a missing/ambiguous media source, a task that does not fit the
    media, features of the wrong shape, or generation settings over this server's caps; 4xx from
    serving.media for undecodable media. CPU-heavy (image/video decoding): call it off the event
    loop.
    """
    _check_generation(body, inputs)
    source = _single_source(body, media)
    if source in ("image", "images", "video") and not inputs.accepts_pixels:
        raise ApiError.unprocessable("features_only", "this backbone has no vision encoder; "
                                     "send precomputed `features` instead of pixels")
    task = _resolve_task(body, source)
    images, frames, features, boxes = [], None, None, None
    if source == "image":
        images = [decode_image(media.image, limits, field="image")]
    elif source == "images":
        images = [decode_image(b, limits, field=f"images[{i}]") for i, b in enumerate(media.pair)]
    elif source == "video":
        frames = decode_video(media.video, limits, inputs.video_frames, field="video")
    else:
        features, boxes = _feature_arrays(body, inputs.feature_dim)
    text = body.question if isinstance(body, VqaRequest) else body.prompt
    adapter = tuple(body.adapter) if isinstance(body.adapter, list) else body.adapter
    if isinstance(adapter, tuple) and len(adapter) == 1:
        adapter = adapter[0]
    context = None
    if body.context is not None:
        if adapter is not None:
            raise ApiError.unprocessable("invalid_request", "give `adapter` or `context`, not both")
        context = build_context(body.context, inputs.accepts_pixels, limits,
                                inputs.max_context_items)
    return InferenceRequest(adapter=adapter, task=task, text=text, images=images,
                            frames=frames, features=features, boxes=boxes,
                            max_new_tokens=body.max_new_tokens, num_beams=body.num_beams,
                            context=context)


def build_classify_request(body: ClassifyRequest, media: MediaBytes,
                           accepts_pixels: bool, limits: MediaLimits) -> EngineClassifyRequest:
    """Admission of a classify request: exactly one of adapter and labels, one image (422
    otherwise), decoded (4xx from serving.media). CPU-heavy: call it off the event loop."""
    if (body.adapter is None) == (body.labels is None):
        raise ApiError.unprocessable("invalid_request", "give `adapter` (a cache adapter) or "
                                     "`labels` (zero-shot), exactly one of them")
    if media.image is None:
        raise ApiError.unprocessable("missing_media", "give `image`, the image to classify")
    if not accepts_pixels:
        raise ApiError.unprocessable("features_only", "this backbone has no vision encoder to "
                                     "classify an image with")
    image = decode_image(media.image, limits, field="image")
    labels = None if body.labels is None else tuple(body.labels)
    return EngineClassifyRequest(body.adapter, labels, image, body.top_k)


def build_context(entries: list[ContextEntry], accepts_pixels: bool, limits: MediaLimits,
                  max_items: int) -> list[ContextInput]:
    """Admission of a context: 413 over ``max_items``; each item a whole demonstration (image,
    question, answer) or text alone (422 naming the item otherwise); images decoded (4xx from
    serving.media). CPU-heavy: call it off the event loop."""
    if len(entries) > max_items:
        raise ApiError.payload_too_large(f"the context has {len(entries)} items, over this "
                                         f"server's limit of {max_items} (max_context_items)",
                                         code="context_too_long")
    out = []
    for i, e in enumerate(entries):
        demo = {"image": e.image, "question": e.question, "answer": e.answer}
        if e.text is not None:
            if any(v is not None for v in demo.values()):
                raise ApiError.unprocessable("invalid_context", f"context[{i}]: give text alone, "
                                             "or image, question and answer")
            out.append(ContextInput(text=e.text))
            continue
        missing = [k for k, v in demo.items() if v is None]
        if missing:
            raise ApiError.unprocessable("invalid_context", f"context[{i}]: a demonstration needs "
                                         f"image, question and answer (missing {', '.join(missing)})")
        if not accepts_pixels:
            raise ApiError.unprocessable("features_only", "this backbone has no vision encoder, so "
                                         "it cannot read a demonstration's image")
        name = f"context[{i}].image"
        data = decode_base64(e.image, field=name, max_bytes=limits.max_image_bytes)
        out.append(ContextInput(question=e.question, answer=e.answer,
                                image=decode_image(data, limits, field=name)))
    return out


def _check_generation(body: GenerationFields, inputs: ModelInputs) -> None:
    if body.max_new_tokens is not None and body.max_new_tokens > inputs.max_new_tokens:
        raise ApiError.unprocessable(
            "invalid_max_new_tokens", f"max_new_tokens: this server generates at most "
            f"{inputs.max_new_tokens} tokens, got {body.max_new_tokens}")
    if body.num_beams > inputs.max_beams:
        raise ApiError.unprocessable(
            "invalid_num_beams", f"num_beams: this server allows at most {inputs.max_beams} "
            f"beams, got {body.num_beams}")


def _single_source(body: GenerationFields, media: MediaBytes) -> str:
    present = [name for name, value in (("image", media.image), ("images", media.pair),
                                        ("video", media.video), ("features", body.features))
               if value]
    allowed = "image, images, video or features" if isinstance(body, VqaRequest) else \
        "image, video or features"
    if not present:
        raise ApiError.unprocessable("missing_media", f"give one of {allowed}")
    if len(present) > 1:
        raise ApiError.unprocessable(
            "ambiguous_media", f"give only one of {allowed} (got {', '.join(present)})")
    if body.boxes is not None and present[0] != "features":
        raise ApiError.unprocessable("invalid_request", "boxes: only allowed with features")
    return present[0]


def _resolve_task(body: VqaRequest | CaptionRequest, source: str) -> str:
    if isinstance(body, CaptionRequest):
        return "video_caption" if source == "video" else "caption"
    task = body.task or ("nlvr" if source == "images" else "vqa")
    if source == "video":
        if task != "vqa":
            raise ApiError.unprocessable(
                "invalid_task", f"task {task!r} does not take a video (video questions are vqa)")
        return "video_qa"
    if task == "nlvr" and source != "images":
        raise ApiError.unprocessable(
            "invalid_task", "task nlvr needs exactly two images in `images`")
    if source == "images" and task != "nlvr":
        raise ApiError.unprocessable(
            "invalid_task", f"`images` (an image pair) is for task nlvr, not {task!r}")
    return task


def _feature_arrays(body: GenerationFields, feature_dim: int):
    widths = {len(row) for row in body.features}
    if widths != {feature_dim}:
        raise ApiError.unprocessable(
            "invalid_features", f"features: every row must have {feature_dim} values "
            f"(the backbone's feature_dim); got widths {sorted(widths)[:5]}")
    features = np.asarray(body.features, dtype=np.float32)
    if not np.isfinite(features).all():     # finite doubles can still overflow float32
        raise ApiError.unprocessable("invalid_features", "features: values overflow float32")
    if body.boxes is None:
        return features, None
    if len(body.boxes) != len(body.features):
        raise ApiError.unprocessable(
            "invalid_features", f"boxes: need one box per feature row ({len(body.features)}), "
            f"got {len(body.boxes)}")
    return features, np.asarray(body.boxes, dtype=np.float32)
