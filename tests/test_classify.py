"""POST /v1/classify: CapS cache adapters and CLIP zero-shot, served in the scheduler's batches
beside VQA rows; the shipped caps-24 demo; cache uploads checked against the server's CLIP."""
from __future__ import annotations

import io
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from petserve.adapters.backbone import build_backbone
from petserve.adapters.cache_file import cache_bytes, load_cache, towers_identity
from petserve.adapters.caps import CacheHead
from petserve.adapters.caps_demo import CACHE_ID, shifted_split
from petserve.adapters.clip_towers import load_towers
from petserve.adapters.data.synthetic import CLASS_LABELS
from petserve.adapters.demo import ensure_demo_assets
from petserve.serving.api import create_app
from petserve.serving.deployments import LocalBackend, seed_store
from petserve.serving.engine_io import ClassifyRequest, InferenceRequest
from petserve.serving.server_config import EngineConfig, ServerConfig
from petserve.serving.store import LocalDirStore
from tests.test_api import TOKEN
from tests.test_generate_api import b64_png

AUTH = {"Authorization": f"Bearer {TOKEN}"}
ZERO_SHOT = [f"a {label}" for label in CLASS_LABELS]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    assets = ensure_demo_assets(progress=False)
    model = build_backbone(assets.backbone_dir)
    towers = load_towers(assets.clip_text, model)
    store_dir = tmp_path_factory.mktemp("store")
    config = ServerConfig(store_dir=store_dir, token=TOKEN,
                          engine=EngineConfig(num_slots=4, max_batch_rows=16))
    store = LocalDirStore(store_dir, max_bytes=config.max_adapter_bytes)
    seed_store(store, {i: assets.store_files()[i] for i in ("colors", CACHE_ID)},
               str(assets.backbone_dir), config.max_adapter_bytes, assets.clip_text)
    backend = LocalBackend(model, store, config.engine, config.max_adapter_bytes, towers=towers)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, backend, towers
    backend.stop()


def caps24(towers) -> CacheHead:
    assets = ensure_demo_assets(progress=False)
    return load_cache(assets.caches[CACHE_ID].read_bytes(), towers_identity(towers),
                      towers.cfg.projection_dim)[0]


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_classify_rows_mixed_with_vqa_and_other_caches_answer_as_alone(served) -> None:
    _, backend, towers = served
    engine = backend.engine
    small = caps24(towers).restricted([0, 4, 8, 13, 17, 22])
    backend.upload_now("caps-6", cache_bytes(small, engine.clip_identity, name="caps-6"))
    test = shifted_split(2, 4242)
    reqs = [ClassifyRequest(("caps-24", "caps-6", None)[i % 3],
                            None if i % 3 < 2 else tuple(ZERO_SHOT), im, 5)
            for i, im in enumerate(test.images[:36])]
    futures = [engine.submit_classify(r) for r in reqs]
    vqa = [engine.submit(InferenceRequest("colors", "vqa", "what color is the shape?", [im]))
           for im in test.images[:6]]
    mixed = [f.result(timeout=60) for f in futures]
    for v in vqa:
        assert v.result(timeout=60).text
    for req, got in zip(reqs, mixed):
        alone = engine.classify_alone(req)
        assert got.label == alone.label
        # Logits are ~100 x cosine: fp32 rounding of a batched vision tower and a grouped matmul
        # moves probabilities by up to ~3e-5 on some CPUs (6e-7 on others); a wrong head by > 0.1.
        want = dict(alone.scores)
        for label, p in got.scores:
            if p > 1e-3:
                assert want.get(label) == pytest.approx(p, abs=2e-4), label
        assert got.adapter == req.adapter and len(got.scores) == 5
    assert {r.adapter_version for r in mixed if r.adapter} == {1}
    stats = engine.stats()
    assert stats["classify_heads"]["sum"] > stats["classify_heads"]["count"]   # heads mixed


def test_shipped_caps24_beats_zero_shot_on_the_shifted_domain(served) -> None:
    _, backend, _ = served
    test = shifted_split(3, 99)
    futures = [backend.engine.submit_classify(ClassifyRequest(a, labels, im, 1))
               for a, labels in (("caps-24", None), (None, tuple(ZERO_SHOT)))
               for im in test.images]
    got = [f.result(timeout=120).label for f in futures]
    truth = [CLASS_LABELS[t] for t in test.targets]
    n = len(truth)
    caps = sum(g == t for g, t in zip(got[:n], truth)) / n
    zero = sum(g == f"a {t}" for g, t in zip(got[n:], truth)) / n
    assert caps >= zero + 0.10, (caps, zero)


def test_classify_json_and_form_as_the_readme_shows(served) -> None:
    client, _, _ = served
    image = shifted_split(1, 5).images[0]
    r = client.post("/v1/classify", json={"adapter": "caps-24", "image": b64_png(image)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "caps-24" and body["adapter_version"] == 1
    assert body["label"] == body["scores"][0][0] and len(body["scores"]) == 5
    assert body["scores"][0][1] >= body["scores"][1][1]
    form = client.post("/v1/classify", files={"image": ("x.png", png(image), "image/png")},
                       data={"adapter": "caps-24", "top_k": "2"})
    assert form.status_code == 200, form.text
    assert form.json()["label"] == body["label"] and len(form.json()["scores"]) == 2
    zero = client.post("/v1/classify", files={"image": ("x.png", png(image), "image/png")},
                       data={"labels": '["a red circle", "a blue square"]'})
    assert zero.status_code == 200, zero.text
    assert zero.json()["adapter"] is None
    assert {s[0] for s in zero.json()["scores"]} == {"a red circle", "a blue square"}


@pytest.mark.parametrize("body, status, code", [
    ({"adapter": "no-such-cache"}, 404, "adapter_not_found"),
    ({"adapter": "colors"}, 422, "not_a_cache"),
    ({"labels": []}, 422, "invalid_request"),
    ({"labels": ["a", "a"]}, 422, "invalid_request"),
    ({"adapter": "caps-24", "labels": ["a red circle"]}, 422, "invalid_request"),
    ({}, 422, "invalid_request"),
    ({"adapter": "caps-24", "top_k": 0}, 422, "invalid_request"),
])
def test_bad_classify_requests_get_clear_errors(served, body, status, code) -> None:
    client, _, _ = served
    r = client.post("/v1/classify", json={"image": b64_png(shifted_split(1, 6).images[0]), **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]


def test_classify_without_an_image_and_vqa_on_a_cache_are_refused(served) -> None:
    client, _, _ = served
    r = client.post("/v1/classify", json={"adapter": "caps-24"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_media"
    image = b64_png(shifted_split(1, 6).images[0])
    r = client.post("/v1/vqa", json={"adapter": "caps-24", "image": image, "question": "what?"})
    assert r.status_code == 422 and "classify" in r.json()["error"]["message"]


def test_cache_uploads_are_checked_against_the_servers_clip(served) -> None:
    client, backend, towers = served
    head = caps24(towers)
    identity = backend.engine.clip_identity
    put = lambda data: client.put("/v1/adapters/my-cache", headers=AUTH, content=data)  # noqa: E731
    ok = put(cache_bytes(head, identity, name="mine"))
    assert ok.status_code == 201, ok.text
    assert ok.json()["kind"] == "cache" and ok.json()["task"] == "classify"
    other = put(cache_bytes(head, "0123456789abcdef"))
    assert other.status_code == 422 and other.json()["error"]["code"] == "clip_mismatch"
    narrow = replace(head, text=head.text[:, :8], images=head.images[:, :8],
                     captions=head.captions[:, :8])
    wide = put(cache_bytes(narrow, identity))
    assert wide.status_code == 422 and wide.json()["error"]["code"] == "feature_dim_mismatch"
    broken = put(cache_bytes(head, identity)[:-100])
    assert broken.status_code == 422
