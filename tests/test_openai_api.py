"""The OpenAI-compatible routes (serving/openai_api.py).

In-process: a chat completion equals the /v1/vqa or /v1/caption request it maps to, a streamed one
concatenates to the same text (one chunk per decode step), and bad input gets OpenAI-shaped 4xx.
Against a real `petserve serve --no-ray` on the embedded default, through the real `openai` client:
a plain and a streamed completion, the model list, errors, and the README's snippet as printed.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from petserve.adapters.adapter_file import adapter_bytes
from petserve.adapters.data import make_demo_examples
from petserve.serving.api import create_app
from tests.conftest import random_adapter
from tests.test_api import AUTH, make_backend, png_bytes
from tests.test_redteam_server import ROOT, readme_block_after, start


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def user(text: str | None = None, *images: str) -> dict:
    parts = [] if text is None else [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"role": "user", "content": parts}


def sse_events(text: str) -> list:
    """The data of each server-sent event; '[DONE]' stays a string."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---- in-process -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_t5, tmp_path_factory):
    backend, config = make_backend(tiny_t5, tmp_path_factory.mktemp("store"), num_slots=4)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        for seed, (name, kind, task) in enumerate((("cap", "lora", "caption"),
                                                   ("ask", "adapter", "vqa"))):
            cfg, params = random_adapter(tiny_t5, kind, {"r": 4} if kind == "lora" else
                                         {"reduction_factor": 4}, seed)
            r = client.put(f"/v1/adapters/{name}", headers=AUTH,
                           content=adapter_bytes(kind, cfg, params, tiny_t5, task))
            assert r.status_code == 201, r.text
        yield client
    backend.stop()


@pytest.mark.parametrize("model,route,field", [("cap", "/v1/caption", "caption"),
                                               ("ask", "/v1/vqa", "answer"),
                                               ("base", "/v1/vqa", "answer")])
def test_a_chat_completion_is_the_request_it_maps_to(served, model, route, field):
    image = data_url(png_bytes(3))
    chat = {"model": model, "max_tokens": 6,
            "messages": [{"role": "system", "content": "be brief"}, user("what is it?", image)]}
    r = served.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text
    body = r.json()
    native = served.post(route, json={"adapter": None if model == "base" else model, "image": image,
                                      "max_new_tokens": 6, **({"prompt": "what is it?"}
                                      if field == "caption" else {"question": "what is it?"})})
    assert native.status_code == 200, native.text
    assert body["object"] == "chat.completion" and body["model"] == model
    assert body["choices"][0]["message"] == {"role": "assistant", "content": native.json()[field]}
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["choices"][0]["finish_reason"] == ("length" if usage["completion_tokens"] == 6
                                                   else "stop")


@pytest.mark.parametrize("beams", [1, 2])
def test_a_streamed_completion_sends_each_step_and_adds_up_to_the_plain_one(served, beams):
    chat = {"model": "cap", "max_tokens": 8, "num_beams": beams,
            "messages": [user(None, data_url(png_bytes(1)))]}
    plain = served.post("/v1/chat/completions", json=chat).json()
    assert plain["choices"][0]["message"]["content"]
    if beams == 1:
        assert len(plain["choices"][0]["message"]["content"].split()) >= 3    # words to stream
    r = served.post("/v1/chat/completions", json={**chat, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert usage["choices"] == [] and usage["usage"] == plain["usage"]
    texts = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(texts) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    content_chunks = [t for t in texts if t]
    if beams == 1:     # greedy: a chunk per decode step (a step may add no text of its own)
        assert len(content_chunks) >= 3
    else:              # a beam search has its answer only at the end
        assert len(content_chunks) == 1


def test_the_model_list_names_base_and_every_adapter(served):
    r = served.get("/v1/models")
    assert r.status_code == 200
    cards = {m["id"]: m for m in r.json()["data"]}
    assert cards["base"]["kind"] == "backbone" and cards["base"]["version"] is None
    assert cards["cap"]["kind"] == "lora" and cards["cap"]["task"] == "caption"
    assert cards["ask"]["version"] == 1 and cards["ask"]["object"] == "model"


def _bad(served, status: int, code: str, **changes) -> dict:
    chat = {"model": "ask", "messages": [user("what is it?", data_url(png_bytes(1)))], **changes}
    r = served.post("/v1/chat/completions", json=chat)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10
    return error


def test_bad_chat_requests_get_openai_shaped_4xx(served):
    image = data_url(png_bytes(1))
    _bad(served, 404, "model_not_found", model="nope")
    _bad(served, 404, "model_not_found", model="Not An Id")
    _bad(served, 422, "missing_media", messages=[user("what is it?")])            # VQA, no image
    _bad(served, 422, "missing_question", messages=[user(None, image)])
    error = _bad(served, 422, "remote_url_refused",
                 messages=[user("what is it?", "https://example.com/cat.png")])
    assert "data:" in error["message"]
    _bad(served, 422, "too_many_media", messages=[user("what is it?", *[image] * 20)])
    _bad(served, 422, "invalid_request", messages=[user("what is it?", *[image] * 40)])
    _bad(served, 422, "invalid_request", n=2)
    _bad(served, 422, "invalid_request", messages=[])
    _bad(served, 422, "invalid_request", messages=[{"role": "assistant", "content": "hi"}])
    _bad(served, 422, "invalid_request", stop=["."])               # an option we do not have
    _bad(served, 415, "unsupported_image_format", messages=[user("what is it?", "data:image/png;base64,"
                                                      + base64.b64encode(b"not a png").decode())])
    r = served.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # the other routes keep their own error shape
    assert set(served.get("/v1/adapters/nope").json()["error"]) == {"code", "message"}


def test_a_composite_model_answers_as_the_composite_request(served):
    image = data_url(png_bytes(2))
    r = served.post("/v1/chat/completions", json={"model": "ask+cap", "max_tokens": 5,
                                                  "messages": [user("what is it?", image)]})
    native = served.post("/v1/vqa", json={"adapter": ["ask", "cap"], "image": image,
                                          "question": "what is it?", "max_new_tokens": 5})
    assert r.status_code == 200 and native.status_code == 200, (r.text, native.text)
    assert r.json()["choices"][0]["message"]["content"] == native.json()["answer"]


# ---- a real server and the real openai client -------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("openai-server"), "server")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def demo_image(task: str) -> tuple[str, str]:
    """(data URL of a demo image, its right answer)."""
    import io
    example = make_demo_examples(task, 1, 7)[0]
    buf = io.BytesIO()
    example.images[0].save(buf, "PNG")
    return data_url(buf.getvalue()), example.target


def test_the_openai_client_gets_a_right_answer(client):
    image, answer = demo_image("colors")
    reply = client.chat.completions.create(
        model="colors", messages=[user("what color is the shape?", image)])
    assert reply.choices[0].message.content == answer
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens >= 1


def test_the_openai_client_streams_a_caption(client):
    image, caption = demo_image("caption")
    messages = [user(None, image)]
    plain = client.chat.completions.create(model="caption", messages=messages)
    chunks = list(client.chat.completions.create(model="caption", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(texts) == plain.choices[0].message.content == caption
    assert sum(bool(t) for t in texts) >= 3                  # words arrive as they are decoded
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_the_openai_client_lists_the_demo_adapters(client):
    models = {m.id: m for m in client.models.list()}
    assert {"base", "colors", "count", "caption"} <= set(models)
    assert models["colors"].model_extra["version"] >= 1


def test_the_openai_client_sees_openai_errors(client):
    image, _ = demo_image("colors")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=[user("hi", image)])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="colors", messages=[user("what color?")])
    assert e.value.code == "missing_media"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="colors", stream=True,
                                       messages=[user("what color?", "http://example.com/a.png")])
    assert e.value.code == "remote_url_refused"


def test_the_readme_openai_snippet_as_printed(server, tmp_path):
    block = readme_block_after("OpenAI-compatible API")
    script = block.replace("localhost:8000", server.url[7:]).replace(
        ".venv/bin/python", str(ROOT / ".venv/bin/python"))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ}, timeout=120)
    assert done.returncode == 0, done.stderr
    answer, caption, models = done.stdout.splitlines()
    image = base64.b64encode((tmp_path / "one.png").read_bytes()).decode()
    assert answer == demo_image("colors")[1]
    native = httpx.post(f"{server.url}/v1/caption", json={"adapter": "caption", "image": image},
                        timeout=60)
    assert caption == native.json()["caption"] and caption
    assert {"base", "colors", "caption"} <= set(models.split())
