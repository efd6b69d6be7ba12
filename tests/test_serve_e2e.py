"""The real Ray Serve app on CPU: two backbone replicas, adapters uploaded over HTTP, 64 concurrent
requests over three adapter kinds and the bare backbone. Every answer must equal the same request
run alone through an independently built model (adapters.generation.generate, one-slot SlotBank),
and /metrics must show batches that mixed adapters, and sticky adapter-affinity routing."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from petserve.adapters.adapter_file import adapter_bytes, load_adapter
from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.visual import feature_tokens
from petserve.adapters.generation import GenerationRequest, generate
from petserve.adapters.runtime.bank import SlotBank
from tests.conftest import random_adapter

pytestmark = pytest.mark.slow
TOKEN = "e2e-token"
BACKBONE = "tiny-t5"
ADAPTERS = {"paint": ("lora", {"r": 8}), "shape": ("adapter", {"reduction_factor": 4}),
            "count": ("vlpet", {"gate": "small"})}
REPLICAS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import ray
    from ray import serve

    from petserve.serving.deployments import build_app
    from petserve.serving.server_config import EngineConfig, ServerConfig
    port = free_port()
    config = ServerConfig(backbone=BACKBONE, store_dir=tmp_path_factory.mktemp("store"),
                          port=port, device="cpu", replicas=REPLICAS, backbone_cpus=0.5,
                          ingress_cpus=0.5, metrics_push_interval_s=0.2,
                          engine=EngineConfig(num_slots=8, max_batch_rows=32))
    started = time.monotonic()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config, TOKEN), name="petserve-e2e", route_prefix="/")
    print(f"\napp ready in {time.monotonic() - started:.1f} s (Ray start included)")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return build_backbone(BACKBONE)


@pytest.fixture(scope="module")
def adapter_files(model):
    files = {}
    for seed, (adapter_id, (kind, options)) in enumerate(ADAPTERS.items()):
        cfg, params = random_adapter(model, kind, options, seed)
        files[adapter_id] = adapter_bytes(kind, cfg, params, model, "vqa")
    return files


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def make_requests() -> list[tuple[str, dict]]:
    """64 (route, body) pairs: adapters round-robin with the bare backbone, vqa and caption,
    images and features, greedy and beam search."""
    adapters = [*ADAPTERS, None]
    out = []
    for i in range(64):
        body = {"adapter": adapters[i % 4], "max_new_tokens": 4 + i % 5,
                "num_beams": 2 if i % 7 == 0 else 1}
        if i % 3 == 0:
            body["image"] = base64.b64encode(png(i % 6)).decode()
        else:
            body["features"] = np.random.default_rng(i).normal(size=(3, 64)).round(3).tolist()
        if i % 2:
            out.append(("/v1/caption", {**body, "prompt": ""}))
        else:
            out.append(("/v1/vqa", {**body, "question": ["what color?", "how many?"][i % 4 // 2]}))
    return out


def run_alone(model, adapter_files, route: str, body: dict):
    """Oracle: the request alone through the model, with nothing of the server's code."""
    task = "vqa" if route == "/v1/vqa" else "caption"
    if "image" in body:
        image = Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")
        visual = model.vision.image_tokens([image])
    else:
        visual = feature_tokens(np.asarray(body["features"], dtype=np.float32))
    row = model.row_input(task, body.get("question", body.get("prompt", "")), visual)
    bank, slot = SlotBank(model, 1), -1
    if body["adapter"] is not None:
        bank.set(0, load_adapter(adapter_files[body["adapter"]], model).compile(model, task))
        slot = 0
    return generate(model, bank, [GenerationRequest(row, slot, body["max_new_tokens"],
                                                    body["num_beams"])])[0]


async def send_all(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post(route, json=body) for route, body in requests))


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


def steps_mixing_adapters(url: str) -> float:
    """Engine steps (all replicas) whose batch held rows of >= 2 different adapters."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts = metric_samples(text, "petserve_engine_adapters_per_step_count")
    single = metric_samples(text, "petserve_engine_adapters_per_step_bucket")
    at_most_one = sum(v for labels, v in single if labels["le"] == "1.0")
    return sum(v for _, v in counts) - at_most_one


def test_uploads_then_64_concurrent_mixed_requests_match_run_alone(app_url, model,
                                                                   adapter_files):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for adapter_id, data in adapter_files.items():
        r = httpx.put(f"{app_url}/v1/adapters/{adapter_id}", content=data, headers=auth,
                      timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == ADAPTERS[adapter_id][0]
    requests = make_requests()
    started = time.monotonic()
    responses = asyncio.run(send_all(app_url, requests))
    elapsed = time.monotonic() - started
    print(f"64 concurrent requests in {elapsed:.2f} s = {64 / elapsed:.1f} requests/s")
    assert [r.status_code for r in responses] == [200] * 64, [r.text for r in responses][:3]
    for (route, body), response in zip(requests, responses):
        got, expected = response.json(), run_alone(model, adapter_files, route, body)
        text = got["answer"] if route == "/v1/vqa" else got["caption"]
        assert (text, got["adapter"]) == (expected.text, body["adapter"]), body
        assert got["logprob"] == pytest.approx(expected.logprob, abs=2e-3), body
    deadline = time.monotonic() + 10       # replicas push stats every 0.2 s
    while steps_mixing_adapters(app_url) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert steps_mixing_adapters(app_url) >= 1


def test_requests_for_one_adapter_stick_to_one_replica(app_url, adapter_files):
    """A never-used adapter: the replica that loads it reports it to Serve's routers, and the
    requests that follow (one at a time, so load never forces a spill) all go there."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.put(f"{app_url}/v1/adapters/solo", content=adapter_files["paint"], headers=auth,
                  timeout=60)
    assert r.status_code == 201, r.text
    body = {"adapter": "solo", "question": "what color?", "max_new_tokens": 2,
            "features": np.zeros((2, 64)).tolist()}
    assert httpx.post(f"{app_url}/v1/vqa", json=body, timeout=60).status_code == 200
    # Replicas report their multiplexed ids to the routers periodically; on a busy machine that
    # takes a few seconds, after which routing must stick.
    time.sleep(5.0)

    def per_replica() -> dict[str, float]:
        text = httpx.get(f"{app_url}/metrics", timeout=30).text
        return {labels["replica"]: v for labels, v in
                metric_samples(text, "petserve_engine_request_seconds_count")
                if labels["adapter"] == "solo"}

    for _ in range(12):
        assert httpx.post(f"{app_url}/v1/vqa", json=body, timeout=60).status_code == 200
    time.sleep(1.0)
    served_by = {replica: n for replica, n in per_replica().items() if n}
    assert sum(served_by.values()) == 13 and len(served_by) == 1, served_by


def test_a_streamed_chat_completion_through_ray_equals_the_request_alone(app_url, model,
                                                                         adapter_files):
    """POST /v1/chat/completions with stream: the ingress streams the Backbone replica's
    generator (each decode step's text) as server-sent events; they add up to the answer run
    alone, and an unknown model is an OpenAI-shaped 404 before any event."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.put(f"{app_url}/v1/adapters/paint", content=adapter_files["paint"], headers=auth,
                  timeout=60)
    assert r.status_code == 201, r.text
    image = base64.b64encode(png(4)).decode()
    chat = {"model": "paint", "max_tokens": 8, "stream": True, "messages": [{"role": "user",
            "content": [{"type": "text", "text": "what color?"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]}]}
    events = []
    with httpx.stream("POST", f"{app_url}/v1/chat/completions", json=chat, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    expected = run_alone(model, adapter_files, "/v1/vqa", {"adapter": "paint", "image": image,
                         "question": "what color?", "max_new_tokens": 8, "num_beams": 1})
    assert "".join(deltas) == expected.text
    r = httpx.post(f"{app_url}/v1/chat/completions", json={**chat, "model": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
