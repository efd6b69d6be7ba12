"""The FastAPI app (README.md "API", docs/ARCHITECTURE.md): `create_app(backend, config)`.

The app does auth, validation and media decoding, then calls a `Backend`. The same app runs
in-process on a `LocalBackend` (tests, single-process servers) and in the Ray Serve ingress on a
backend that calls the backbone deployment (serving.deployments). Every error, whatever raised
it, leaves as JSON `{"error": {"code", "message"}}`; only a server bug becomes a 500.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from petserve.serving.auth import TokenCheck, resolve_token
from petserve.serving.errors import ApiError
from petserve.serving.media import MediaLimits, decode_base64
from petserve.serving.metrics import (
    COMPOSITE_LABEL,
    CONTENT_TYPE,
    CONTEXT_LABEL,
    HttpMetrics,
    RecordMetrics,
    render,
)
from petserve.serving.openai_api import (
    ChatCompletionRequest,
    add_openai_routes,
    is_openai_path,
    openai_error_body,
)
from petserve.serving.playground import add_playground_routes
from petserve.serving.schemas import (
    AUDIO_FORM_SCHEMA,
    CAPTION_FORM_SCHEMA,
    CLASSIFY_FORM_SCHEMA,
    VQA_FORM_SCHEMA,
    AdapterInfo,
    AdapterList,
    AudioClassifyRequest,
    AudioClassifyResponse,
    CaptionRequest,
    CaptionResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    GenerateRequest,
    HealthResponse,
    MediaBytes,
    ModelInputs,
    VqaRequest,
    VqaResponse,
    build_classify_request,
    build_context,
    build_inference_request,
    describe_validation_error,
    finite_or_floor,
    json_body,
    media_from_json,
    validation_api_error,
)
from petserve.serving.server_config import ServerConfig
from petserve.serving.store import ADAPTER_ID_RE, StoredAdapter, validate_adapter_id

log = logging.getLogger(__name__)
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_MEDIA_PARTS = ("image", "images", "video")
_JSON_PARTS = ("features", "boxes", "context", "labels")


@dataclass(frozen=True)
class BackendInfo:
    backbone: str
    fingerprint: str
    feature_dim: int
    accepts_pixels: bool


class Backend(Protocol):
    """What the HTTP layer needs from the model side. Errors are ApiError."""

    async def info(self) -> BackendInfo: ...
    async def health(self) -> None: ...             # ApiError 503 "unhealthy" when it is not
    async def generate(self, request): ...          # InferenceRequest -> InferenceResult
    async def classify(self, request): ...          # ClassifyRequest -> ClassifyResult
    async def classify_audio(self, request): ...    # AudioRequest -> ClassifyResult
    async def upload(self, adapter_id: str, data: bytes) -> StoredAdapter: ...
    async def generate_adapter(self, adapter_id: str, context) -> StoredAdapter: ...
    async def list(self) -> list[StoredAdapter]: ...
    async def get(self, adapter_id: str) -> StoredAdapter: ...
    async def delete(self, adapter_id: str) -> StoredAdapter: ...
    async def stats(self) -> dict[str, dict]: ...     # replica name -> Engine.stats()


# ---- request bodies ---------------------------------------------------------------------------


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(ctype: str) -> bool:
    return ctype in ("", "application/json") or ctype.endswith("+json")


def _form_model(text: dict, model_cls):
    try:
        return model_cls.model_validate(text)
    except ValidationError as e:
        raise validation_api_error(e) from None


def _parse_json_body(raw: bytes, model_cls, limits) -> tuple:
    body = json_body(raw, model_cls)
    return body, media_from_json(body, limits)


async def _read_form(request: Request, max_part_bytes: int) -> tuple[dict, dict[str, list[bytes]]]:
    """Multipart/urlencoded form -> (text fields, file parts). Files may also come as text."""
    text: dict[str, object] = {}
    files: dict[str, list[bytes]] = {name: [] for name in (*_MEDIA_PARTS, "file", "audio")}
    async with request.form(max_files=8, max_fields=32, max_part_size=max_part_bytes) as form:
        for key, value in form.multi_items():
            if key in files:
                files[key].append(await value.read() if isinstance(value, UploadFile)
                                  else value.encode())
            elif isinstance(value, UploadFile):
                raise ApiError.unprocessable("invalid_request", f"{key}: must be a text field")
            elif key in text:
                raise ApiError.unprocessable("invalid_request", f"{key}: given more than once")
            elif value != "" or key in ("question", "prompt"):
                text[key] = value
    return text, files


def _form_to_json_parts(text: dict) -> None:
    """Parse the form fields that carry JSON (features, boxes, context) in place."""
    for key in _JSON_PARTS:
        if key in text:
            try:
                text[key] = json.loads(text[key])
            except (ValueError, RecursionError):     # 10,000 nested brackets: RecursionError
                raise ApiError.unprocessable("invalid_request", f"{key}: not valid JSON") from None
            if text[key] is None:      # a form leaves a field out; it does not send it as null
                raise ApiError.unprocessable("invalid_request", f"{key}: a JSON array, not null "
                                             "(leave the field out instead)")


def _form_to_body(text: dict, files: dict[str, list[bytes]], model_cls) -> tuple:
    _form_to_json_parts(text)
    for key in ("file", "audio"):
        if files[key]:
            raise ApiError.unprocessable("invalid_request", f"{key}: not a field of this route "
                                         "(the media parts are image, images and video)")
    for key in ("image", "video"):
        if len(files[key]) > 1:
            raise ApiError.unprocessable("invalid_request", f"{key}: given more than once")
    if files["images"] and len(files["images"]) != 2:
        raise ApiError.unprocessable("invalid_request", "images: need exactly two image files")
    if files["images"] and model_cls is not VqaRequest:
        raise ApiError.unprocessable("invalid_request", "images: only /v1/vqa takes an image pair")
    body = _form_model(text, model_cls)
    media = MediaBytes(image=(files["image"] or [None])[0], pair=files["images"],
                       video=(files["video"] or [None])[0])
    return body, media


async def read_generation_body(request: Request, model_cls, config: ServerConfig,
                               limits: MediaLimits) -> tuple:
    """(validated body, raw media) from a JSON or a multipart request."""
    ctype = _content_type(request)
    if ctype in _FORM_TYPES:
        text, files = await _read_form(request, config.max_body_bytes)
        return _form_to_body(text, files, model_cls)
    if _is_json(ctype):
        raw = await request.body()
        return await run_in_threadpool(_parse_json_body, raw, model_cls, limits)
    raise ApiError.unsupported_media(
        "unsupported_content_type", f"send application/json or multipart/form-data, not {ctype!r}")


async def read_adapter_upload(request: Request, config: ServerConfig) -> bytes:
    """The adapter file: the raw body, or the `file` part of a multipart form.

    Told apart by content, not label (`curl --data-binary @f` labels any file a urlencoded form):
    only a multipart/form-data body that opens with '--' (its boundary) is parsed as a form. An
    adapter file never opens so (safetensors: a little-endian header length; zip: 'PK\\x03\\x04'),
    so it is taken raw whatever its content type. BodyLimit caps the body while it is read."""
    data = await request.body()
    if _content_type(request) == "multipart/form-data" and data.startswith(b"--"):
        text, files = await _read_form(request, config.max_adapter_bytes)   # parses `data`
        if len(files["file"]) != 1 or text or any(files[k] for k in (*_MEDIA_PARTS, "audio")):
            raise ApiError.unprocessable(
                "invalid_request", "a multipart upload carries exactly one part, named 'file'")
        data = files["file"][0]
    if not data:
        raise ApiError.bad_request("empty_upload", "the body is empty; send the adapter file")
    return data


# ---- app --------------------------------------------------------------------------------------

_ERROR_STATUSES = {
    400: "malformed request (bad JSON, bad base64, corrupt image, invalid adapter id)",
    401: "missing or wrong 'Authorization: Bearer <token>'",
    404: "unknown adapter, or a path no route matches (an id with a newline, say)",
    413: "body, image, video or adapter file over its size limit",
    405: "the method is not allowed on this path (the Allow header lists those that are)",
    415: "unsupported content type, image or video format",
    422: "a field is invalid or the fields do not fit together (the message names the field)",
    500: "server bug (never caused by input alone)",
    503: "overloaded (retry after the Retry-After header's seconds), unhealthy, or the adapter "
         "store is unreachable",
}
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text}
                   for status, text in _ERROR_STATUSES.items()}


def errors(*statuses: int) -> dict:
    """The documented error responses of a route: ``statuses``, and 500 (a server bug)."""
    return {status: ERROR_RESPONSES[status] for status in (*statuses, 500)}


_INFERENCE_ERRORS = errors(400, 401, 404, 413, 415, 422, 503)      # 401: with auth_reads
_LINKS = {"GetAdapter": {"operationId": "get_adapter",
                         "parameters": {"adapter_id": "$response.body#/id"}},
          "DeleteAdapter": {"operationId": "delete_adapter",
                            "parameters": {"adapter_id": "$response.body#/id"}},
          "UploadAdapter": {"operationId": "upload_adapter",
                            "parameters": {"adapter_id": "$response.body#/id"}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _body_doc(json_schema: dict, form_schema: dict, json_type="application/json") -> dict:
    return {"requestBody": {"required": True, "content": {
        json_type: {"schema": json_schema}, "multipart/form-data": {"schema": form_schema}}}}


_WRITE_DOC = {"security": [{"bearer": []}]}
_GENERATE_DOC = {**_WRITE_DOC, **_body_doc(
    _ref("GenerateRequest"),
    {"type": "object", "properties": {"context": {"type": "string", "description": "the JSON "
                                                  "array of context items"}},
     "required": ["context"], "additionalProperties": False})}
_ADAPTER_FILE = {"type": "string", "format": "binary", "minLength": 1,
                 "description": "a .safetensors adapter file, or a zip of a PEFT LoRA directory "
                 "(recognized by content, whatever the content type says)"}
_UPLOAD_DOC = {**_WRITE_DOC, **_body_doc(
    _ADAPTER_FILE,
    {"type": "object", "properties": {"file": _ADAPTER_FILE}, "required": ["file"],
     "additionalProperties": False},
    json_type="application/octet-stream")}


async def read_context_body(request: Request, config: ServerConfig) -> GenerateRequest:
    """The generate route's body: JSON, or a form whose text field ``context`` holds the JSON
    array (``curl -F context=@context-items.json`` or ``-F context='[...]'``)."""
    ctype = _content_type(request)
    if ctype in _FORM_TYPES:
        text, files = await _read_form(request, config.max_body_bytes)
        if any(files.values()):
            raise ApiError.unprocessable("invalid_request", "context: send the items as the JSON "
                                         "text field `context` (images base64 inside it)")
        _form_to_json_parts(text)
        return _form_model(text, GenerateRequest)
    if _is_json(ctype):
        raw = await request.body()
        return await run_in_threadpool(json_body, raw, GenerateRequest)
    raise ApiError.unsupported_media(
        "unsupported_content_type", f"send application/json or multipart/form-data, not {ctype!r}")


def create_app(backend: Backend, config: ServerConfig, token_check: TokenCheck | None = None,
               http_metrics: HttpMetrics | None = None) -> FastAPI:
    """The petserve HTTP app. `token_check` defaults to config.token / its env var (a token is
    generated and logged when neither is set)."""
    if token_check is None:
        resolved = resolve_token(config.token, config.token_env)
        if resolved.generated:
            log.warning("no token configured; generated write token: %s", resolved.token)
        token_check = TokenCheck.for_token(resolved.token)
    metrics = http_metrics or HttpMetrics()
    app = FastAPI(title="petserve", version="0.1.0", description=(
        "Many parameter-efficient adapters on one frozen VL-T5 / VL-BART backbone. "
        "Writes need 'Authorization: Bearer <token>'."),
        openapi_url=None, docs_url=None, redoc_url=None)     # _add_schema_routes serves them
    model_inputs = _model_inputs(backend, config)
    _add_inference_routes(app, backend, config, token_check, model_inputs)
    _add_adapter_routes(app, backend, config, token_check)
    _add_service_routes(app, backend, metrics, config.metrics_max_adapters)
    add_playground_routes(app)
    add_openai_routes(app, backend, config, token_check, _INFERENCE_ERRORS, model_inputs)
    _add_error_handlers(app)
    app.add_middleware(EndWithClient)
    app.add_middleware(BodyLimit, default_limit=config.max_body_bytes,
                       upload_limit=config.max_adapter_bytes)
    app.add_middleware(RecordMetrics, metrics=metrics)     # outermost: sees every status
    app.openapi = lambda: _openapi(app, config)
    _add_schema_routes(app, backend, config)
    return app


def _add_schema_routes(app: FastAPI, backend: Backend, config: ServerConfig) -> None:
    """/openapi.json with this server's limits (its caps, the backbone's feature width: the
    backend is asked once), and /docs, /redoc on it."""
    async def openapi_json(request: Request) -> JSONResponse:
        if app.openapi_schema is None or "x-feature-dim" not in app.openapi_schema["info"]:
            info = await backend.info()
            app.openapi_schema = None
            app.openapi_schema = _openapi(app, config, info.feature_dim)
        return JSONResponse(app.openapi_schema)

    async def docs(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    app.add_route("/openapi.json", openapi_json, include_in_schema=False)
    app.add_route("/docs", docs, include_in_schema=False)
    app.add_route("/redoc", redoc, include_in_schema=False)


def _model_inputs(backend: Backend, config: ServerConfig):
    """An async ``() -> ModelInputs`` for admission: the backbone is asked once (it never
    changes), the engine's limits come from the config."""
    known: list[ModelInputs] = []

    async def model_inputs() -> ModelInputs:
        if not known:
            info = await backend.info()
            known.append(ModelInputs(
                info.feature_dim, info.accepts_pixels, config.media.video_frames,
                config.engine.max_new_tokens_cap, config.engine.max_beams,
                config.engine.max_context_items))
        return known[0]
    return model_inputs


def _add_inference_routes(app: FastAPI, backend: Backend, config: ServerConfig,
                          token_check: TokenCheck, model_inputs) -> None:
    limits = config.media.limits()

    async def generate(request: Request, model_cls):
        if config.auth_reads:
            token_check.require(request.headers.get("authorization"))
        body, media = await read_generation_body(request, model_cls, config, limits)
        request.state.adapter = COMPOSITE_LABEL if isinstance(body.adapter, list) else \
            CONTEXT_LABEL if body.context is not None else body.adapter
        engine_request = await run_in_threadpool(
            build_inference_request, body, media, await model_inputs(), limits)
        return await backend.generate(engine_request)

    @app.post("/v1/vqa", response_model=VqaResponse, responses=_INFERENCE_ERRORS,
              openapi_extra=_body_doc(_ref("VqaRequest"), _ref("VqaForm")),
              summary="Answer a question about an image, image pair, video or features")
    async def vqa(request: Request) -> VqaResponse:
        r = await generate(request, VqaRequest)
        return VqaResponse(answer=r.text, logprob=finite_or_floor(r.logprob), **_used(r),
                           timings_ms=r.timings_ms)

    @app.post("/v1/caption", response_model=CaptionResponse, responses=_INFERENCE_ERRORS,
              openapi_extra=_body_doc(_ref("CaptionRequest"), _ref("CaptionForm")),
              summary="Caption an image, a video or features")
    async def caption(request: Request) -> CaptionResponse:
        r = await generate(request, CaptionRequest)
        return CaptionResponse(caption=r.text, logprob=finite_or_floor(r.logprob), **_used(r),
                               timings_ms=r.timings_ms)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_INFERENCE_ERRORS,
              openapi_extra=_body_doc(_ref("ClassifyRequest"), _ref("ClassifyForm")),
              summary="Classify an image on a cache adapter (CapS) or zero-shot over labels")
    async def classify(request: Request) -> ClassifyResponse:
        if config.auth_reads:
            token_check.require(request.headers.get("authorization"))
        body, media = await read_generation_body(request, ClassifyRequest, config, limits)
        request.state.adapter = body.adapter
        info = await backend.info()
        engine_request = await run_in_threadpool(build_classify_request, body, media,
                                                 info.accepts_pixels, limits)
        r = await backend.classify(engine_request)
        return ClassifyResponse(label=r.label, scores=r.scores, adapter=r.adapter,
                                adapter_version=r.adapter_version, timings_ms=r.timings_ms)

    @app.post("/v1/audio/classify", response_model=AudioClassifyResponse, responses=_INFERENCE_ERRORS,
              openapi_extra=_body_doc(_ref("AudioClassifyRequest"), _ref("AudioClassifyForm")),
              summary="Classify an audio clip with an audio adapter (PETL for AST)")
    async def audio_classify(request: Request) -> AudioClassifyResponse:
        from petserve.serving.audio_engine import AudioRequest
        if config.auth_reads:
            token_check.require(request.headers.get("authorization"))
        body, data = await read_audio_body(request, config)
        request.state.adapter = body.adapter
        r = await backend.classify_audio(AudioRequest(body.adapter, data, body.top_k))
        return AudioClassifyResponse(label=r.label, scores=r.scores, adapter=r.adapter,
                                     adapter_version=r.adapter_version, timings_ms=r.timings_ms)


async def read_audio_body(request: Request, config: ServerConfig) -> tuple[AudioClassifyRequest, bytes]:
    """(validated body, encoded audio) of a JSON (base64 `audio`) or multipart (`audio` file)
    request; 422 without audio."""
    ctype = _content_type(request)
    if ctype in _FORM_TYPES:
        text, files = await _read_form(request, config.max_body_bytes)
        if files["file"] or any(files[k] for k in _MEDIA_PARTS):
            raise ApiError.unprocessable("invalid_request", "the one media part of this route is "
                                         "'audio'")
        if len(files["audio"]) > 1:
            raise ApiError.unprocessable("invalid_request", "audio: given more than once")
        body = _form_model(text, AudioClassifyRequest)
        data = files["audio"][0] if files["audio"] else None
    elif _is_json(ctype):
        body = json_body(await request.body(), AudioClassifyRequest)
        data = None if body.audio is None else await run_in_threadpool(
            decode_base64, body.audio, field="audio", max_bytes=config.max_body_bytes)
    else:
        raise ApiError.unsupported_media("unsupported_content_type", "send application/json or "
                                         f"multipart/form-data, not {ctype!r}")
    if data is None:
        raise ApiError.unprocessable("missing_media", "give `audio`, the clip to classify")
    return body, data


def _used(r) -> dict:
    """The answer's adapter fields: a composite lists its members and their versions."""
    if isinstance(r.adapter, tuple):
        return {"adapter": list(r.adapter), "adapter_version": None,
                "adapter_versions": list(r.adapter_version), "context_sha256": None}
    versions = [] if r.adapter_version is None else [r.adapter_version]
    return {"adapter": r.adapter, "adapter_version": r.adapter_version, "adapter_versions": versions,
            "context_sha256": r.context_sha256}


def _add_adapter_routes(app: FastAPI, backend: Backend, config: ServerConfig,
                        token_check: TokenCheck) -> None:
    def checked_id(request: Request, adapter_id: str, write: bool) -> str:
        head, _, tail = adapter_id.rpartition("/")
        if tail == "generate" and re.fullmatch(ADAPTER_ID_RE, head):   # `{id}/generate`, not an id
            raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on "
                           "/v1/adapters/{id}/generate; POST a context there", {"Allow": "POST"})
        if write or config.auth_reads:
            token_check.require(request.headers.get("authorization"))
        request.state.adapter = validate_adapter_id(adapter_id)
        return adapter_id

    limits = config.media.limits()

    @app.post("/v1/adapters/{adapter_id:path}/generate", status_code=201,
              response_model=AdapterInfo, openapi_extra=_GENERATE_DOC,
              responses={201: {"links": _LINKS}, **errors(400, 401, 404, 413, 415, 422, 503)},
              summary="Generate a new version of an adapter from a context (Generative Adapter)")
    async def generate_adapter(adapter_id: str, request: Request) -> AdapterInfo:
        adapter_id = checked_id(request, adapter_id, write=True)
        body = await read_context_body(request, config)
        info = await backend.info()
        context = await run_in_threadpool(build_context, body.context, info.accepts_pixels, limits,
                                          config.engine.max_context_items)
        return AdapterInfo.from_stored(await backend.generate_adapter(adapter_id, context))

    # `:path` lets ids like '../../etc' reach validate_adapter_id (a clear 400), not a 404.
    @app.put("/v1/adapters/{adapter_id:path}", status_code=201, response_model=AdapterInfo,
             responses={201: {"links": _LINKS}, **errors(400, 401, 404, 413, 422, 503)},
             openapi_extra=_UPLOAD_DOC, operation_id="upload_adapter",
             summary="Upload a new version of an adapter (.safetensors, or a zipped PEFT LoRA)")
    async def upload_adapter(adapter_id: str, request: Request) -> AdapterInfo:
        adapter_id = checked_id(request, adapter_id, write=True)
        data = await read_adapter_upload(request, config)
        return AdapterInfo.from_stored(await backend.upload(adapter_id, data))

    @app.get("/v1/adapters", response_model=AdapterList, responses=errors(401, 503),
             summary="List adapters (latest version of each)")
    async def list_adapters(request: Request) -> AdapterList:
        if config.auth_reads:
            token_check.require(request.headers.get("authorization"))
        return AdapterList(adapters=[AdapterInfo.from_stored(s) for s in await backend.list()])

    @app.get("/v1/adapters/{adapter_id:path}", response_model=AdapterInfo,
             responses=errors(400, 401, 404, 405, 503), operation_id="get_adapter",
             summary="Describe the latest version of an adapter")
    async def get_adapter(adapter_id: str, request: Request) -> AdapterInfo:
        adapter_id = checked_id(request, adapter_id, write=False)
        return AdapterInfo.from_stored(await backend.get(adapter_id))

    @app.delete("/v1/adapters/{adapter_id:path}", response_model=AdapterInfo,
                responses=errors(400, 401, 404, 405, 503), openapi_extra=_WRITE_DOC,
                operation_id="delete_adapter",
                summary="Delete every version of an adapter")
    async def delete_adapter(adapter_id: str, request: Request) -> AdapterInfo:
        adapter_id = checked_id(request, adapter_id, write=True)
        return AdapterInfo.from_stored(await backend.delete(adapter_id))


def _add_service_routes(app: FastAPI, backend: Backend, metrics: HttpMetrics,
                        max_adapters: int) -> None:
    @app.get("/healthz", response_model=HealthResponse, responses=errors(503),
             summary="Liveness and what the backbone accepts")
    async def healthz() -> HealthResponse:
        await backend.health()
        info = await backend.info()
        return HealthResponse(status="ok", backbone=info.backbone, fingerprint=info.fingerprint,
                              feature_dim=info.feature_dim, accepts_pixels=info.accepts_pixels)

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format (README.md, Metrics)"},
        **errors(503)}, summary="Prometheus metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        body = render(metrics, await backend.stats(), max_adapters)
        return PlainTextResponse(body, media_type=CONTENT_TYPE)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes on this request's path (an `{adapter_id:path}`
    route only when what it would take as the id is one: `x/generate` is the generate route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, child = route.matches(request.scope)
        adapter_id = child.get("path_params", {}).get("adapter_id")
        if match != Match.NONE and (adapter_id is None or re.fullmatch(ADAPTER_ID_RE, adapter_id)):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _error(status: int, code: str, message: str, headers=None, path: str = "") -> JSONResponse:
    """The error response; on the OpenAI-compatible routes in OpenAI's error shape."""
    body = openai_error_body(status, code, message) if is_openai_path(path) else \
        {"error": {"code": code, "message": message}}
    return JSONResponse(body, status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.code, e.message, e.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", describe_validation_error(list(e.errors())),
                      path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_request", 404: "not_found",
                405: "method_not_allowed"}.get(e.status_code, "http_error")
        headers = e.headers
        if e.status_code == 405:    # Starlette names the first route's methods; list them all
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(e.status_code, code, str(e.detail), headers, request.url.path)

    @app.exception_handler(Exception)
    async def server_bug(request: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return _error(500, "internal_error", "internal server error (logged on the server)",
                      path=request.url.path)


class BodyLimit:
    """ASGI middleware: refuse bodies over the limit with 413 before reading them (declared
    Content-Length), and stop reading once a chunked body passes it."""

    def __init__(self, app, default_limit: int, upload_limit: int) -> None:
        self.app, self.default_limit, self.upload_limit = app, default_limit, upload_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_upload = scope["path"].startswith("/v1/adapters/") and scope["method"] == "PUT"
        limit = self.upload_limit if is_upload else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _error(400, "invalid_request", "Content-Length is not a number",
                                    path=scope["path"])(scope, receive, send)
            if int(declared) > limit:
                return await _error(413, "payload_too_large", _too_large(limit),
                                    path=scope["path"])(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:     # raised inside the route: the handlers turn it into JSON
                raise ApiError.payload_too_large(_too_large(limit))
            return message

        await self.app(scope, counting_receive, send)


class EndWithClient:
    """ASGI middleware: a client that disconnects once its request is sent cancels the route still
    working on it, so a generation ends (serving/engine.py ``Engine.generate``; Ray Serve cancels
    a replica's request on a disconnect too). Counted as 499; nobody reads the answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent, gone = asyncio.Event(), asyncio.Event()
        started = finished = False

        async def route_receive():
            if sent.is_set():           # only the disconnect is left, which watch() waits for
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body", False):
                sent.set()
            return message

        async def noting_send(message) -> None:
            nonlocal started, finished
            started = started or message["type"] == "http.response.start"
            finished = finished or (message["type"] == "http.response.body"
                                    and not message.get("more_body", False))
            await send(message)

        async def watch() -> None:
            await sent.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        route = asyncio.ensure_future(self.app(scope, route_receive, noting_send))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((route, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:     # this request itself is cancelled (Ray Serve, shutdown)
            route.cancel()
            raise
        finally:
            watcher.cancel()
        if route.done() or finished or watcher.exception() is not None:
            return await route
        route.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await route
        if not started:
            await _error(499, "client_closed_request", "the client closed the connection before "
                         "the answer; its work was stopped", path=scope["path"])(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


def _openapi(app: FastAPI, config: ServerConfig, feature_dim: int | None = None) -> dict:
    """FastAPI's schema plus the bodies the routes parse themselves, with this server's limits
    (``feature_dim``: the backbone's, when known)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (VqaRequest, CaptionRequest, GenerateRequest, ClassifyRequest,
                      AudioClassifyRequest, ChatCompletionRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        components["VqaForm"] = VQA_FORM_SCHEMA
        components["CaptionForm"] = CAPTION_FORM_SCHEMA
        components["ClassifyForm"] = CLASSIFY_FORM_SCHEMA
        components["AudioClassifyForm"] = AUDIO_FORM_SCHEMA
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        _document_adapter_id(schema)
        _our_validation_errors(schema)
        _apply_limits(schema, config, feature_dim)
        app.openapi_schema = schema
    return app.openapi_schema


def _our_validation_errors(schema: dict) -> None:
    """Every error is JSON of our shape (OpenAI's on its routes): FastAPI documents a 422 of its
    own shape on routes with parameters, and errors under the route's media type (/metrics)."""
    for path, operations in schema["paths"].items():
        model = "OpenAIError" if is_openai_path(path) else "ErrorResponse"
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    response["content"] = {"application/json": {"schema": _ref(model)}}
                    if status == "422":
                        response["description"] = _ERROR_STATUSES[422]
    for name in ("HTTPValidationError", "ValidationError"):
        if name not in json.dumps(schema["paths"]):
            schema["components"]["schemas"].pop(name, None)


def _apply_limits(schema: dict, config: ServerConfig, feature_dim: int | None) -> None:
    """Write the limits this server enforces into its schema, from where they are configured:
    the engine's caps (EngineConfig), the upload size cap and the feature width."""
    caps = {"max_new_tokens": ("maximum", config.engine.max_new_tokens_cap),
            "max_tokens": ("maximum", config.engine.max_new_tokens_cap),
            "max_completion_tokens": ("maximum", config.engine.max_new_tokens_cap),
            "num_beams": ("maximum", config.engine.max_beams),
            "context": ("maxItems", config.engine.max_context_items)}

    def cap(prop: dict, key: str, value: int) -> None:
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") in ("integer", "array"):
                branch[key] = min(branch.get(key, value), value)

    for component in schema["components"]["schemas"].values():
        for name, prop in component.get("properties", {}).items():
            if name in caps:
                cap(prop, *caps[name])
            if name == "features" and feature_dim is not None:
                for branch in prop.get("anyOf", [prop]):
                    if branch.get("type") == "array":
                        branch["items"] = {**branch["items"], "minItems": feature_dim,
                                           "maxItems": feature_dim}
    upload = schema["paths"]["/v1/adapters/{adapter_id}"]["put"]["requestBody"]["content"]
    upload["application/octet-stream"]["schema"]["maxLength"] = config.max_adapter_bytes
    upload["multipart/form-data"]["schema"]["properties"]["file"]["maxLength"] = \
        config.max_adapter_bytes
    if feature_dim is not None:
        schema["info"]["x-feature-dim"] = feature_dim


def _document_adapter_id(schema: dict) -> None:
    """The id is a plain `str` in the route (so validate_adapter_id can explain a bad one with a
    400); document its syntax for clients anyway."""
    for operations in schema["paths"].values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                if param["name"] == "adapter_id":
                    param["schema"] = {"type": "string", "pattern": f"^{ADAPTER_ID_RE}$"}
                    param["description"] = "adapter id: 1-64 of a-z 0-9 . _ -, starting " \
                                           "with a letter or digit"
