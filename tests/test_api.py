"""The HTTP API in-process: serving.api's app on a LocalBackend (real Engine, tiny T5)."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import petserve.serving.scheduler as scheduler_module
from petserve.adapters.adapter_file import adapter_bytes
from petserve.serving.api import create_app
from petserve.serving.deployments import LocalBackend
from petserve.serving.engine import InferenceRequest
from petserve.serving.server_config import EngineConfig, ServerConfig
from petserve.serving.store import LocalDirStore
from tests.conftest import random_adapter
from tests.test_engine import wait_until

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 2 * 2**20


def png_bytes(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def features(seed: int, dim: int = 64, n: int = 4) -> list[list[float]]:
    return np.random.default_rng(seed).normal(size=(n, dim)).round(4).tolist()


def make_adapter(model, kind: str, seed: int, task: str = "vqa") -> bytes:
    options = {"lora": {"r": 4}, "adapter": {"reduction_factor": 8}, "vlpet": {"gate": "small"}}
    cfg, params = random_adapter(model, kind, options[kind], seed)
    return adapter_bytes(kind, cfg, params, model, task)


def make_backend(model, store_dir, **engine) -> tuple[LocalBackend, ServerConfig]:
    config = ServerConfig(store_dir=store_dir, token=TOKEN, max_body_bytes=MAX_BODY,
                          max_adapter_bytes=4 * 2**20, engine=EngineConfig(**engine))
    store = LocalDirStore(store_dir, max_bytes=config.max_adapter_bytes)
    return LocalBackend(model, store, config.engine,
                        config.max_adapter_bytes), config


@pytest.fixture(scope="module")
def served(tiny_t5, tmp_path_factory):
    backend, config = make_backend(tiny_t5, tmp_path_factory.mktemp("store"), num_slots=4)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, backend
    backend.stop()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def oracle(backend: LocalBackend, adapter, feats, question="what is it?", max_new=6):
    """The same request alone through the model (Engine.run_alone: private one-slot bank)."""
    req = InferenceRequest(adapter=adapter, task="vqa", text=question,
                           features=np.asarray(feats, dtype=np.float32), max_new_tokens=max_new)
    return backend.engine.run_alone(req)


def ask(client, adapter, feats, question="what is it?", max_new=6):
    return client.post("/v1/vqa", json={"adapter": adapter, "features": feats,
                                        "question": question, "max_new_tokens": max_new})


def assert_same_answer(answer: dict, expected) -> None:
    assert answer["answer"] == expected.text
    assert answer["logprob"] == pytest.approx(expected.logprob, abs=1e-3)


def test_healthz_is_503_while_the_engine_is_unhealthy(tiny_t5, tmp_path):
    backend, config = make_backend(tiny_t5, tmp_path)
    with TestClient(create_app(backend, config)) as client:
        r = client.get("/healthz")               # engine not started: nothing would be served
        assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy"
        assert "scheduler thread is not running" in r.json()["error"]["message"]
        backend.start()
        assert client.get("/healthz").status_code == 200
        backend.stop()
        assert client.get("/healthz").status_code == 503


def test_health_docs_openapi_and_metrics(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["feature_dim"] == 64 and health["accepts_pixels"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/vqa", "/v1/caption", "/v1/adapters", "/v1/adapters/{adapter_id}", "/healthz",
            "/metrics"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/vqa"]["post"]["requestBody"]["content"]
    assert "swagger" in client.get("/docs").text.lower()
    ask(client, None, features(0))
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'petserve_http_requests_total{adapter="_backbone",method="POST",route="/v1/vqa",' \
           'status="200"} ' in text           # prometheus_client writes labels sorted by name
    for family in ("petserve_engine_batch_rows_bucket", "petserve_engine_adapters_per_step_count",
                   "petserve_slot_pool_hits_total", "petserve_slot_pool_evictions_total",
                   "petserve_adapter_load_seconds_count", "petserve_engine_queue_length"):
        assert family in text, family
    from prometheus_client import parser
    families = {f.name: f.type for f in parser.text_string_to_metric_families(text)}
    assert families["petserve_http_request_duration_seconds"] == "histogram"
    assert families["petserve_slot_pool_misses"] == "counter"


def test_upload_answer_new_version_list_delete(served, tiny_t5):
    client, backend = served
    first = make_adapter(tiny_t5, "lora", seed=1)
    r = client.put("/v1/adapters/colors", content=first, headers=AUTH)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "colors" and info["version"] == 1 and info["kind"] == "lora"
    assert info["sha256"] == hashlib.sha256(first).hexdigest() and info["trainable_parameters"] > 0
    feats = features(1)
    answer = ask(client, "colors", feats).json()       # no restart between upload and use
    assert answer["adapter"] == "colors" and answer["adapter_version"] == 1
    assert_same_answer(answer, oracle(backend, "colors", feats))
    bare = ask(client, None, feats).json()
    assert bare["logprob"] != pytest.approx(answer["logprob"], abs=1e-3)  # the adapter matters

    second = client.put("/v1/adapters/colors", content=make_adapter(tiny_t5, "vlpet", seed=2),
                        headers=AUTH).json()
    assert second["version"] == 2 and second["kind"] == "vlpet"
    answer2 = ask(client, "colors", feats).json()
    assert answer2["adapter_version"] == 2
    assert_same_answer(answer2, oracle(backend, "colors", feats))

    listed = client.get("/v1/adapters").json()["adapters"]
    assert [(a["id"], a["version"]) for a in listed if a["id"] == "colors"] == [("colors", 2)]
    assert client.get("/v1/adapters/colors").json()["sha256"] == second["sha256"]
    deleted = client.delete("/v1/adapters/colors", headers=AUTH)
    assert deleted.status_code == 200 and deleted.json()["version"] == 2
    assert client.get("/v1/adapters/colors").status_code == 404
    gone = ask(client, "colors", feats)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"


def test_delete_while_requests_in_flight(served, tiny_t5, monkeypatch):
    client, backend = served
    client.put("/v1/adapters/inflight", content=make_adapter(tiny_t5, "adapter", 3), headers=AUTH)
    real_decode = tiny_t5.decode

    def slow_decode(*args, **kwargs):     # keeps rows in flight long enough to delete under them
        time.sleep(0.03)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tiny_t5, "decode", slow_decode)

    async def scenario():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            body = {"adapter": "inflight", "question": "how many?", "max_new_tokens": 40}
            tasks = [asyncio.create_task(ac.post("/v1/vqa", json={**body, "features": features(i)}))
                     for i in range(4)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stats = backend.engine.stats()
                if stats["queue_length"] == 0 and stats["running_requests"] == 4:
                    break
                await asyncio.sleep(0.01)
            running_at_delete = backend.engine.stats()["running_requests"]
            deleted = await ac.delete("/v1/adapters/inflight", headers=AUTH)
            answers = await asyncio.gather(*tasks)
            later = await ac.post("/v1/vqa", json={**body, "features": features(9)})
            return running_at_delete, deleted, answers, later

    running, deleted, answers, later = asyncio.run(scenario())
    assert running == 4 and deleted.status_code == 200
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["adapter_version"] for a in answers} == {1}
    assert later.status_code == 404


def test_multipart_upload_and_vqa(served, tiny_t5):
    client, backend = served
    data = make_adapter(tiny_t5, "adapter", seed=4)
    r = client.put("/v1/adapters/shapes", files={"file": ("shapes.safetensors", data)},
                   headers=AUTH)
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(data).hexdigest()
    image = png_bytes(4)
    form = client.post("/v1/vqa", files={"image": ("x.png", image, "image/png")},
                       data={"question": "which shape?", "adapter": "shapes",
                             "max_new_tokens": "5"})
    assert form.status_code == 200, form.text
    as_json = client.post("/v1/vqa", json={"image": b64(image), "question": "which shape?",
                                           "adapter": "shapes", "max_new_tokens": 5})
    assert form.json()["answer"] == as_json.json()["answer"]
    assert form.json()["logprob"] == pytest.approx(as_json.json()["logprob"], abs=1e-4)


def test_image_pair_video_and_caption(client, tmp_path):
    from petserve.adapters.data.synthetic import write_video
    pair = client.post("/v1/vqa", json={"images": [b64(png_bytes(5)), b64(png_bytes(6))],
                                        "question": "the left image has more", "max_new_tokens": 3})
    assert pair.status_code == 200, pair.text
    frames = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    video = write_video(tmp_path / "v.mp4", frames).read_bytes()
    r = client.post("/v1/caption", files={"video": ("v.mp4", video, "video/mp4")},
                    data={"max_new_tokens": "3"})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"caption", "logprob", "adapter", "adapter_version", "adapter_versions",
                             "timings_ms", "context_sha256"}


def _bad_cases():
    img = b64(png_bytes(7))
    q = {"question": "what?"}
    return [
        ("corrupt image", "post", "/v1/vqa", {"json": {**q, "image": b64(png_bytes(7)[:80])}},
         400, "invalid_image"),
        ("not an image", "post", "/v1/vqa", {"json": {**q, "image": b64(b"not an image")}}, 415,
         "unsupported_image_format"),
        ("bad base64", "post", "/v1/vqa", {"json": {**q, "image": "abc$"}}, 400, "invalid_base64"),
        ("unsupported video", "post", "/v1/vqa", {"json": {**q, "video": b64(b"\x00\x01" * 64)}},
         415, "unsupported_video"),
        ("unknown adapter", "post", "/v1/vqa", {"json": {**q, "image": img, "adapter": "nope"}},
         404, "adapter_not_found"),
        ("oversize payload", "post", "/v1/vqa", {"content": b"x" * (MAX_BODY + 1),
                                                  "headers": {"content-type": "application/json"}},
         413, "payload_too_large"),
        ("broken adapter file", "put", "/v1/adapters/broken",
         {"content": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", "headers": AUTH}, 422,
         None),
        ("missing token", "put", "/v1/adapters/x", {"content": b"abc"}, 401, "unauthorized"),
        ("wrong token", "delete", "/v1/adapters/x", {"headers": {"Authorization": "Bearer no"}},
         401, "unauthorized"),
        ("invalid id", "put", "/v1/adapters/Bad%20Id", {"content": b"abc", "headers": AUTH}, 400,
         "invalid_adapter_id"),
        ("path traversal id", "get", "/v1/adapters/..%2F..%2Fetc", {}, 400, "invalid_adapter_id"),
        ("invalid id in body", "post", "/v1/vqa", {"json": {**q, "image": img, "adapter": "A/B"}},
         422, "invalid_request"),
        ("nlvr with one image", "post", "/v1/vqa", {"json": {**q, "image": img, "task": "nlvr"}},
         422, "invalid_task"),
        ("unknown task", "post", "/v1/vqa", {"json": {**q, "image": img, "task": "ocr"}}, 422,
         "invalid_request"),
        ("beams 0", "post", "/v1/vqa", {"json": {**q, "image": img, "num_beams": 0}}, 422,
         "invalid_request"),
        ("beams 99", "post", "/v1/vqa", {"json": {**q, "image": img, "num_beams": 99}}, 422,
         "invalid_request"),
        ("no media", "post", "/v1/vqa", {"json": q}, 422, "missing_media"),
        ("two media", "post", "/v1/caption", {"json": {"image": img, "features": features(0)}},
         422, "ambiguous_media"),
        ("wrong feature width", "post", "/v1/vqa", {"json": {**q, "features": [[1.0, 2.0]]}}, 422,
         "invalid_features"),
        ("question too long", "post", "/v1/vqa", {"json": {"question": "x" * 5000, "image": img}},
         422, "invalid_request"),
        ("not json", "post", "/v1/vqa", {"content": b"{oops",
                                          "headers": {"content-type": "application/json"}},
         400, "invalid_json"),
        ("unsupported content type", "post", "/v1/vqa",
         {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_content_type"),
        ("unknown route", "get", "/v2/nothing", {}, 404, "not_found"),
        ("wrong method", "patch", "/v1/vqa", {}, 405, "method_not_allowed"),
    ]


@pytest.mark.parametrize("name,method,path,kwargs,status,code", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_gets_clear_4xx(client, name, method, path, kwargs, status, code):
    r = client.request(method.upper(), path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and (code is None or error["code"] == code), error
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200


def test_auth_reads_option_guards_reads_too(served):
    backend = served[1]
    config = ServerConfig(store_dir=backend.store.root, token=TOKEN, auth_reads=True)
    with TestClient(create_app(backend, config)) as guarded:
        assert guarded.get("/v1/adapters").status_code == 401
        assert guarded.post("/v1/caption", json={"features": features(0)}).status_code == 401
        assert guarded.get("/v1/adapters", headers=AUTH).status_code == 200
        assert guarded.get("/healthz").status_code == 200


def test_chunked_oversize_body_is_cut_off(client):
    def chunks():
        for _ in range(3):
            yield b"x" * 2**20     # no Content-Length: the server must count while reading
    r = client.post("/v1/vqa", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_overload_returns_503_with_retry_after(tiny_t5, tmp_path):
    backend, config = make_backend(tiny_t5, tmp_path, max_queue=2, num_slots=2)
    app = create_app(backend, config)          # engine not started yet: the queue only fills

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            body = {"question": "q", "max_new_tokens": 2}
            queued = [asyncio.create_task(
                ac.post("/v1/vqa", json={**body, "features": features(i)})) for i in range(2)]
            while backend.engine.stats()["queue_length"] < 2:
                await asyncio.sleep(0.005)
            rejected = await ac.post("/v1/vqa", json={**body, "features": features(5)})
            backend.start()
            return rejected, await asyncio.gather(*queued)

    try:
        rejected, served = asyncio.run(scenario())
    finally:
        backend.stop()
    assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "overloaded"
    assert int(rejected.headers["retry-after"]) >= 1
    assert [r.status_code for r in served] == [200, 200]


@pytest.mark.parametrize("path", ["/v1/vqa", "/v1/chat/completions"])
def test_a_client_that_hangs_up_stops_its_generation(tiny_t5, tmp_path, endless, monkeypatch, path):
    """A real HTTP client that closes its connection mid-answer: the route's work is cancelled and
    the job leaves the batch within a step or two (each step slowed, end of sequence suppressed,
    so left alone it would decode all 64 tokens), and the request is counted with status 499."""
    import socket
    import threading

    import uvicorn

    slowed = scheduler_module.decode_step
    monkeypatch.setattr(scheduler_module, "decode_step",
                        lambda model, state: (time.sleep(0.02), slowed(model, state))[1])
    backend, config = make_backend(tiny_t5, tmp_path, num_slots=2)
    backend.start()
    server = uvicorn.Server(uvicorn.Config(create_app(backend, config), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        assert httpx.put(f"{url}/v1/adapters/a", content=make_adapter(tiny_t5, "lora", 0),
                         headers=AUTH).status_code == 201
        question, image = "what is in the image?", base64.b64encode(png_bytes(0)).decode()
        body = json.dumps({"adapter": "a", "question": question, "image": image,
                           "max_new_tokens": 64} if path == "/v1/vqa" else
                          {"model": "a", "max_tokens": 64, "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                              {"type": "text", "text": question}]}]}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: len(endless) >= 3)
        wait_until(lambda: backend.engine.scheduler.running_rows == 0)
        assert len(endless) < 12, len(endless)
        exposition = httpx.get(f"{url}/metrics").text
        assert 'status="499"' in exposition
        assert httpx.post(f"{url}{path}", content=body, headers={
            "content-type": "application/json"}).status_code == 200     # and it serves on
        assert len(endless) >= 64
    finally:
        server.should_exit = True
        thread.join(10)
        backend.stop()
