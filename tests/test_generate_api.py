"""POST /v1/adapters/{id}/generate: a context becomes a stored lora adapter (Generative Adapter),
generated on the replica in the scheduler's continuous batches; bad contexts are refused."""
from __future__ import annotations

import base64
import io

import pytest
import torch
from fastapi.testclient import TestClient

from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.data import make_demo_examples
from petserve.adapters.generative import Generator, GeneratorConfig, generate_loras
from petserve.adapters.training import BatchBuilder, ExampleFeatures
from petserve.serving.api import create_app
from petserve.serving.deployments import LocalBackend
from petserve.serving.server_config import EngineConfig, ServerConfig
from petserve.serving.store import LocalDirStore
from tests.test_api import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_ITEMS = 12


def random_generator(model) -> Generator:
    gen = Generator.init(GeneratorConfig(r=4), model, seed=1)
    torch.manual_seed(1)
    gen.params = {k: v + 0.1 * torch.randn_like(v) for k, v in gen.params.items()}
    return gen


def b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def demonstrations(n: int, seed: int = 3):
    exs = make_demo_examples("colors", n, seed)
    body = [{"image": b64_png(e.images[0]), "question": e.text, "answer": e.target} for e in exs]
    return exs, body


@pytest.fixture(scope="module")
def served(tiny_t5, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("store")
    config = ServerConfig(store_dir=store_dir, token=TOKEN, max_adapter_bytes=4 * 2**20,
                          engine=EngineConfig(num_slots=4, max_context_items=MAX_ITEMS,
                                              max_batch_rows=4, max_beams=4))
    gen = random_generator(tiny_t5)
    backend = LocalBackend(tiny_t5, LocalDirStore(store_dir, max_bytes=config.max_adapter_bytes),
                           config.engine, config.max_adapter_bytes, generator=gen,
                           generator_name="test-gen")
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, backend, gen
    backend.stop()


def test_a_context_becomes_a_stored_lora_equal_to_the_offline_generator(served, tiny_t5):
    client, backend, gen = served
    exs, body = demonstrations(6)       # 6 items over max_batch_rows 4: two chunks
    r = client.post("/v1/adapters/gen-colors/generate", json={"context": body}, headers=AUTH)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "gen-colors" and info["kind"] == "lora" and info["version"] == 1
    stored = load_adapter(backend.store.read("gen-colors", 1), tiny_t5)
    assert stored.meta.generated["generator"] == "test-gen"
    assert len(stored.meta.generated["context_sha256"]) == 64
    # the same context through the offline path (the PNG round trip is lossless)
    rows, targets = BatchBuilder(tiny_t5, exs, ExampleFeatures(tiny_t5), "vqa").batch(list(range(6)))
    want = generate_loras(tiny_t5, gen, [list(zip(rows, targets))])[0]
    for k, v in want.items():
        torch.testing.assert_close(stored.params[k], v, atol=1e-5, rtol=1e-5)
    again = client.post("/v1/adapters/gen-colors/generate", json={"context": body}, headers=AUTH)
    assert again.status_code == 201 and again.json()["version"] == 2      # like an upload
    second = load_adapter(backend.store.read("gen-colors", 2), tiny_t5)
    assert second.meta.generated == stored.meta.generated            # the same context ...
    for k, v in stored.params.items():                                # ... the same adapter
        torch.testing.assert_close(second.params[k], v, atol=0, rtol=0)
    answer = client.post("/v1/vqa", json={"adapter": "gen-colors", "image": body[0]["image"],
                                          "question": "what color is the shape?"})
    assert answer.status_code == 200 and answer.json()["adapter_version"] == 2


def test_text_only_contexts(served):
    client, _, _ = served
    r = client.post("/v1/adapters/gen-text/generate", headers=AUTH,
                    json={"context": [{"text": "a red circle"}, {"text": "a blue square"}]})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "lora"


def _truncated_png() -> str:
    buf = io.BytesIO()
    make_demo_examples("colors", 1, 0)[0].images[0].save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()[:80]).decode()


@pytest.mark.parametrize("body, status, fragment", [
    ({"context": [{"image": _truncated_png(), "question": "q?", "answer": "a"}]}, 400,
     "context[0].image"),
    ({"context": []}, 422, "context"),
    ({}, 422, "context"),
    ({"context": [{"text": "x"}] * (MAX_ITEMS + 1)}, 413, f"limit of {MAX_ITEMS}"),
    ({"context": [{"image": "bm90IGFuIGltYWdl", "question": "q?", "answer": "a"}]}, 415,
     "context[0].image"),
    ({"context": [{"question": "what color?", "answer": "red"}]}, 422, "missing image"),
    ({"context": [{"text": "a", "answer": "b"}]}, 422, "text alone"),
    ({"context": [{"text": 3}]}, 422, "context"),
])
def test_bad_contexts_are_refused_and_nothing_is_stored(served, body, status, fragment):
    client, backend, _ = served
    r = client.post("/v1/adapters/bad-ctx/generate", json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"], r.text
    assert "bad-ctx" not in {s.id for s in backend.store.list()}


def test_writes_need_the_token(served):
    client, _, _ = served
    r = client.post("/v1/adapters/x/generate", json={"context": [{"text": "a"}]})
    assert r.status_code == 401


def test_a_backbone_without_a_generator_says_so(tiny_t5, tmp_path):
    from tests.test_api import make_backend
    backend, config = make_backend(tiny_t5, tmp_path / "store", num_slots=2)
    backend.start()
    try:
        with TestClient(create_app(backend, config)) as client:
            r = client.post("/v1/adapters/x/generate", json={"context": [{"text": "a"}]},
                            headers=AUTH)
    finally:
        backend.stop()
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_generator", r.text
    assert backend.store.list() == []


def test_an_inline_context_answers_as_its_adapter_stored_as_a_file(served):
    """The same context inline (generated on the replica, never stored) and through the generate
    endpoint then named as an adapter: equal answers and log-probabilities."""
    client, backend, _ = served
    _, body = demonstrations(4, seed=11)
    query = demonstrations(1, seed=12)[1][0]
    stored = client.post("/v1/adapters/gen-inline/generate", json={"context": body}, headers=AUTH)
    assert stored.status_code == 201, stored.text
    ask = {"image": query["image"], "question": "what color is the shape?", "max_new_tokens": 6}
    by_file = client.post("/v1/vqa", json={**ask, "adapter": "gen-inline"}).json()
    inline = client.post("/v1/vqa", json={**ask, "context": body})
    assert inline.status_code == 200, inline.text
    got = inline.json()
    assert got["answer"] == by_file["answer"]
    assert abs(got["logprob"] - by_file["logprob"]) < 1e-4
    assert got["adapter"] is None and got["adapter_version"] is None
    assert len(got["context_sha256"]) == 64
    assert backend.engine.pool.has_generated("@" + got["context_sha256"])
    again = client.post("/v1/vqa", json={**ask, "context": body}).json()   # from the pool
    assert again["answer"] == got["answer"] and again["context_sha256"] == got["context_sha256"]
    assert "gen-inline" in {s.id for s in backend.store.list()}
    assert not any(s.id.startswith("@") for s in backend.store.list())    # never stored


def test_inline_contexts_mix_with_stored_adapters_and_the_backbone(served):
    """Concurrent requests: two contexts inline, a stored generated adapter, adapters of other
    kinds, the backbone alone; each equals its request alone."""
    import asyncio
    from dataclasses import replace

    import numpy as np

    from petserve.serving.engine_io import ContextInput, InferenceRequest
    _, backend, _ = served
    engine = backend.engine
    feats = np.random.default_rng(5).normal(size=(3, 64)).astype(np.float32)

    def context(seed):
        exs = make_demo_examples("shapes", 3, seed)
        return [ContextInput(question=e.text, answer=e.target, image=e.images[0]) for e in exs]

    reqs = [InferenceRequest(adapter=None, task="vqa", text="what shape is it?", features=feats,
                             max_new_tokens=5, context=context(s)) for s in (21, 22)]
    from petserve.adapters.adapter_file import adapter_bytes
    from tests.conftest import random_adapter
    others = {"mix-vlpet": ("vlpet", {"gate": "small"}), "mix-adapter": ("adapter", {}),
              "mix-prompt": ("prompt", {"length": 4})}
    for i, (adapter_id, (kind, options)) in enumerate(others.items()):
        cfg, params = random_adapter(engine.model, kind, options, seed=40 + i)
        backend.upload_now(adapter_id, adapter_bytes(kind, cfg, params, engine.model, "vqa"))
    backend.upload_now("mix-generated", asyncio.run(engine.generated_adapter(context(23))))
    reqs += [InferenceRequest(adapter=a, task="vqa", text="what is it?", features=feats,
                              max_new_tokens=5) for a in ["mix-generated", *others, None]]
    futures = [engine.submit(r) for r in reqs]
    results = [f.result(timeout=60) for f in futures]
    assert results[0].context_sha256 != results[1].context_sha256
    for r, res in zip(reqs[2:], results[2:]):
        alone = engine.run_alone(r)
        assert res.tokens == alone.tokens and abs(res.logprob - alone.logprob) < 1e-4
    for i, (r, res) in enumerate(zip(reqs[:2], results[:2])):   # alone: as a stored file
        data = asyncio.run(engine.generated_adapter(r.context, name=f"mix-{i}"))
        backend.upload_now(f"mix-{i}", data)
        alone = engine.run_alone(replace(r, adapter=f"mix-{i}", context=None))
        assert res.tokens == alone.tokens and abs(res.logprob - alone.logprob) < 1e-4


def test_adapter_and_context_together_are_refused(served):
    client, _, _ = served
    _, body = demonstrations(1)
    r = client.post("/v1/vqa", json={"adapter": "gen-colors", "context": body,
                                     "image": body[0]["image"], "question": "what?"})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]


def test_a_multipart_context_field(served):
    import json
    client, _, _ = served
    _, body = demonstrations(2, seed=31)
    r = client.post("/v1/adapters/gen-form/generate", headers=AUTH,
                    data={"context": json.dumps(body)})
    assert r.status_code == 201, r.text
    bad = client.post("/v1/adapters/gen-form/generate", headers=AUTH, data={"context": "[{"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]["message"]


def test_an_inline_answer_times_its_generation(served):
    client, _, _ = served
    _, body = demonstrations(2, seed=41)
    ask = {"image": body[0]["image"], "question": "what color is the shape?", "max_new_tokens": 3,
           "context": body}
    first, second = (client.post("/v1/vqa", json=ask).json()["timings_ms"] for _ in range(2))
    assert first["generate"] > 0 and second["generate"] == 0.0      # then from the slot pool
    assert first["total"] >= first["generate"]
