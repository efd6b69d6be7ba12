"""The OpenAI-compatible routes (README.md "OpenAI-compatible API"): ``POST /v1/chat/completions``
and ``GET /v1/models``, as vLLM and LoRAX serve adapters, with ``model`` = the adapter.

A chat request becomes the body of ``/v1/vqa`` or ``/v1/caption`` (the adapter's stored task
decides which) and goes through the same admission (serving/schemas.py) and backend call; only
its wire format differs. Mapping:

- ``model``: an adapter id, ``a+b`` (a composite: the members' changes add up), or ``base`` (the
  frozen backbone alone);
- the question (or caption prompt) is the text of the last user message; images and videos are
  the ``image_url`` / ``video_url`` parts of the user messages, as ``data:`` URLs only (the server
  fetches nothing); system and assistant messages carry no input for these models and are ignored;
- ``max_tokens`` / ``max_completion_tokens`` -> max_new_tokens; ``num_beams`` (an extension, like
  vLLM's extra parameters: ``extra_body``) -> beam search; ``n`` is 1 (decoding is deterministic,
  so n > 1 would repeat one answer); ``temperature``, ``top_p``, ``seed`` are accepted and have
  no effect for the same reason;
- ``stream: true``: server-sent events, one chunk per decode step (greedy; a beam search sends
  its answer in one chunk when it ends), then ``data: [DONE]``;
- errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from petserve.adapters.tasks import QUESTION_TASKS, TASKS
from petserve.serving.errors import ApiError
from petserve.serving.metrics import COMPOSITE_LABEL
from petserve.serving.schemas import (
    MAX_TEXT_CHARS,
    Body,
    CaptionRequest,
    ModelInputs,
    Text,
    VqaRequest,
    build_inference_request,
    json_body,
    media_from_json,
    validation_api_error,
)
from petserve.serving.server_config import MAX_BEAMS, MAX_MEMBERS, MAX_NEW_TOKENS
from petserve.serving.store import validate_adapter_id

CHAT_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/models"
OPENAI_PATHS = (CHAT_PATH, MODELS_PATH)
BASE_MODEL = "base"
MAX_MESSAGES = 64
MAX_PARTS = 32                # content parts of one message
MAX_IMAGES = 2                # an image pair (nlvr) at most, over all user messages
_OWNER = "petserve"


class TextPart(Body):
    type: Literal["text"]
    text: Text = Field(max_length=MAX_TEXT_CHARS)


class MediaUrl(Body):
    url: str = Field(min_length=1, description="a data URL, 'data:image/png;base64,...' (the "
                     "server fetches no http URLs)")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, no effect")


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: MediaUrl


class VideoPart(Body):
    type: Literal["video_url"]
    video_url: MediaUrl


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = Field(
        None, max_length=MAX_PARTS, description="text, or content parts (text, image_url, video_url)")
    name: str | None = Field(None, max_length=64, description="accepted, no effect")


class StreamOptions(Body):
    include_usage: bool = Field(False, description="send a last chunk with the usage counts")


class ChatCompletionRequest(Body):
    """An OpenAI chat completion request; ``model`` names the adapter."""

    model: str = Field(min_length=1, max_length=65 * MAX_MEMBERS, examples=["colors"],
                       description="an adapter id, 'a+b' for a composite, or 'base'")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    n: int = Field(1, ge=1, le=1, description="1 only: decoding is deterministic")
    num_beams: int = Field(1, ge=1, le=MAX_BEAMS, description="extension: beam search width")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="accepted, no effect")
    top_p: float | None = Field(None, ge=0, le=1, description="accepted, no effect")
    seed: int | None = Field(None, description="accepted, no effect")
    user: str | None = Field(None, max_length=256, description="accepted, no effect")


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="encoder tokens: the prompt's and the visual ones")
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = _OWNER
    kind: str = Field(description="adapter kind (lora, adapter, ...); 'backbone' for base")
    task: str = Field(description="what the adapter answers: vqa, caption, ...")
    version: int | None = Field(description="the latest stored version; null for base")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def openai_error_body(status: int, code: str, message: str) -> dict:
    """OpenAI's error shape for one of our errors (``type`` as OpenAI names the classes)."""
    kind = "authentication_error" if status == 401 else \
        "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS


# ---- chat request -> /v1/vqa or /v1/caption body ---------------------------------------------


def _members(model: str) -> list[str] | None:
    """The adapter ids ``model`` names; None for the backbone alone."""
    if model == BASE_MODEL:
        return None
    ids = model.split("+")
    if len(ids) > MAX_MEMBERS or len(set(ids)) != len(ids):
        raise ApiError.unprocessable("invalid_model", f"model: a composite names 1 to "
                                     f"{MAX_MEMBERS} distinct adapters joined by '+'")
    try:
        return [validate_adapter_id(i) for i in ids]
    except ApiError as e:
        raise ApiError.not_found("model_not_found", f"the model {model!r} does not exist: "
                                 f"{e.message}") from None


def _media_url(part: ImagePart | VideoPart) -> str:
    url = (part.image_url if isinstance(part, ImagePart) else part.video_url).url
    if not url.startswith("data:"):
        raise ApiError.unprocessable("remote_url_refused", "the server fetches no URLs: send the "
                                     "image or video inline as 'data:<type>;base64,...'")
    return url


def _inputs(messages: list[ChatMessage]) -> tuple[str, list[str], list[str]]:
    """(the last user message's text, the images and the videos of all user messages)."""
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ApiError.unprocessable("invalid_request", "messages: give a user message")
    images, videos = [], []
    for m in users:
        if isinstance(m.content, list):
            images += [_media_url(p) for p in m.content if isinstance(p, ImagePart)]
            videos += [_media_url(p) for p in m.content if isinstance(p, VideoPart)]
    if len(images) > MAX_IMAGES or len(videos) > 1 or (images and videos):
        raise ApiError.unprocessable("too_many_media", f"messages: give one image, an image pair "
                                     f"or one video; got {len(images)} images and {len(videos)} "
                                     "videos")
    last = users[-1].content
    text = last if isinstance(last, str) else \
        " ".join(p.text for p in last or [] if isinstance(p, TextPart))
    return text.strip(), images, videos


def generation_body(chat: ChatCompletionRequest, task: str | None) -> VqaRequest | CaptionRequest:
    """The /v1/vqa or /v1/caption body of ``chat`` for an adapter trained on ``task`` (None: the
    backbone, which answers a question when there is one and captions otherwise)."""
    if chat.max_tokens is not None and chat.max_completion_tokens is not None:
        raise ApiError.unprocessable("invalid_request", "give max_tokens or "
                                     "max_completion_tokens, not both")
    text, images, videos = _inputs(chat.messages)
    members = _members(chat.model)
    fields = {"adapter": members, "max_new_tokens": chat.max_tokens or chat.max_completion_tokens,
              "num_beams": chat.num_beams}
    if len(images) == 1:
        fields["image"] = images[0]
    elif images:
        fields["images"] = images
    if videos:
        fields["video"] = videos[0]
    caption = TASKS[task].caption if task in TASKS else not text
    try:
        if caption:
            if "images" in fields:
                raise ApiError.unprocessable("too_many_media", "messages: a caption is of one "
                                             "image or one video")
            return CaptionRequest(prompt=text, **fields)
        if not text:
            raise ApiError.unprocessable("missing_question", "messages: the last user message "
                                         "needs text, the question")
        return VqaRequest(question=text, task=task if task in QUESTION_TASKS and not videos
                          else None, **fields)
    except ValidationError as e:  # a field over its limit
        raise validation_api_error(e) from None


def chat_completion(chat_id: str, model: str, result) -> ChatCompletion:
    return ChatCompletion(
        id=chat_id, created=int(time.time()), model=model,
        choices=[ChatChoice(index=0, message=ChatCompletionMessage(content=result.text),
                            finish_reason=result.finish_reason)],
        usage=_usage(result))


def _usage(result) -> Usage:
    completion = len(result.tokens)
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=completion,
                 total_tokens=result.prompt_tokens + completion)


def _event(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def sse_chunks(chat_id: str, model: str, first, events, include_usage: bool):
    """Server-sent events of a streamed completion: a role chunk, one chunk per decode step's
    text, a last chunk with the finish reason (and the usage when asked), then [DONE]. An error
    after the stream started is one error event."""
    head = {"id": chat_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return _event({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    sent, item = "", first
    try:
        while isinstance(item, str):
            sent += item
            yield chunk({"content": item})
            item = await anext(events)
    except ApiError as e:
        yield _event(openai_error_body(e.status, e.code, e.message))
        return
    rest = item.text[len(sent):] if item.text.startswith(sent) else ""
    if rest:
        yield chunk({"content": rest})
    yield chunk({}, item.finish_reason)
    if include_usage:
        yield _event({**head, "choices": [], "usage": _usage(item).model_dump()})
    yield b"data: [DONE]\n\n"


# ---- routes -----------------------------------------------------------------------------------


def add_openai_routes(app: FastAPI, backend, config, token_check, error_responses: dict,
                      model_inputs) -> None:
    """Mount the OpenAI-compatible routes on ``app`` (serving.api.create_app calls this, with
    its async ``model_inputs()`` for admission)."""
    limits = config.media.limits()
    responses = {status: {**doc, "model": OpenAIError} for status, doc in error_responses.items()}

    def admit(chat: ChatCompletionRequest, task: str | None, inputs: ModelInputs):
        """The engine request of ``chat`` (decodes the media: run it off the event loop)."""
        body = generation_body(chat, task)
        return build_inference_request(body, media_from_json(body, limits), inputs, limits)

    def check_reads(request: Request) -> None:
        if config.auth_reads:
            token_check.require(request.headers.get("authorization"))

    async def task_of(members: list[str] | None) -> str | None:
        if members is None:
            return None
        try:
            stored = await backend.get(members[0])
        except ApiError as e:
            if e.status == 404:
                raise ApiError.not_found("model_not_found", f"the model {members[0]!r} does not "
                                         "exist (GET /v1/models lists them)") from None
            raise
        kind, task = stored.meta.get("kind"), str(stored.meta.get("task", ""))
        if kind == "cache" or task == "audio_classify":
            route = "/v1/classify" if kind == "cache" else "/v1/audio/classify"
            raise ApiError.unprocessable("not_a_generation_model", f"the model {members[0]!r} "
                                         f"classifies; send it to {route}")
        return task

    @app.post(CHAT_PATH, response_model=ChatCompletion, responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "a chat.completion, or with stream: true server-sent "
                             "chat.completion.chunk events ending in 'data: [DONE]'"},
        **responses}, openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}},
        summary="OpenAI-compatible chat completion: model = adapter (VQA or caption by its task)")
    async def chat_completions(request: Request):
        check_reads(request)
        chat = await run_in_threadpool(json_body, await request.body(),
                                       ChatCompletionRequest)
        members = _members(chat.model)
        request.state.adapter = None if members is None else \
            members[0] if len(members) == 1 else COMPOSITE_LABEL
        task = await task_of(members)
        engine_request = await run_in_threadpool(admit, chat, task, await model_inputs())
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not chat.stream:
            return chat_completion(chat_id, chat.model, await backend.generate(engine_request))
        events = await backend.generate_stream(engine_request)
        first = await anext(events)           # refused before any byte is sent: a plain error
        include_usage = chat.stream_options is not None and chat.stream_options.include_usage
        return StreamingResponse(sse_chunks(chat_id, chat.model, first, events, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.get(MODELS_PATH, response_model=ModelList,
             responses={s: doc for s, doc in responses.items() if s in (401, 500, 503)},
             summary="OpenAI-compatible model list: 'base' and every stored adapter")
    async def list_models(request: Request) -> ModelList:
        check_reads(request)
        cards = [ModelCard(id=BASE_MODEL, created=0, kind="backbone", task="vqa, caption",
                           version=None)]
        for s in await backend.list():
            cards.append(ModelCard(id=s.id, created=int(s.created), kind=str(s.meta.get("kind", "")),
                                   task=str(s.meta.get("task", "")), version=s.version))
        return ModelList(data=cards)
