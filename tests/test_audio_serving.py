"""POST /v1/audio/classify: the audio family's engine beside the VL one, the shipped demo
adapters, mixed batches equal to each request alone, uploads and every kind of bad audio."""
from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from petserve.adapters.audio_demo import AUDIO_RECIPES, ensure_audio_assets
from petserve.adapters.data.audio import AUDIO_TASKS, make_clips, wav_bytes
from petserve.adapters.demo import ensure_demo_assets
from petserve.serving.api import create_app
from petserve.serving.audio_engine import AudioRequest
from petserve.serving.deployments import LocalBackend, seed_store
from petserve.serving.server_config import EngineConfig, ServerConfig
from petserve.serving.store import LocalDirStore
from tests.test_api import TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASKS = tuple(r.task for r in AUDIO_RECIPES)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    assets, audio = ensure_demo_assets(progress=False), ensure_audio_assets(progress=False)
    store_dir = tmp_path_factory.mktemp("store")
    config = ServerConfig(store_dir=store_dir, token=TOKEN, audio_backbone=str(audio.backbone_dir),
                          max_audio_seconds=20, engine=EngineConfig(num_slots=2, max_batch_rows=16))
    store = LocalDirStore(store_dir, max_bytes=config.max_adapter_bytes)
    seed_store(store, {"colors": assets.adapters["colors"], **audio.adapters},
               str(assets.backbone_dir), config.max_adapter_bytes, None, config.audio_backbone)
    config = config.model_copy(update={"backbone": str(assets.backbone_dir)})
    backend = LocalBackend.from_config(config)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, backend, audio
    backend.stop()


def clip_wav(task: str, label: int, seed: int) -> bytes:
    rng_clips = make_clips(task, 1, seed)
    i = rng_clips.labels.index(label)
    return wav_bytes(rng_clips.clips[i])


def test_requests_for_three_adapters_mixed_equal_each_alone(served) -> None:
    _, backend, _ = served
    engine = backend.audio
    reqs = [AudioRequest(TASKS[i % 3], clip_wav(TASKS[i % 3], i % len(AUDIO_TASKS[TASKS[i % 3]]), 50 + i))
            for i in range(24)]
    futures = [engine.submit(r) for r in reqs]       # 3 adapters over 2 slots: batches wait on slots
    mixed = [f.result(timeout=120) for f in futures]
    for req, got in zip(reqs, mixed):
        alone = engine.classify_alone(req)
        assert got.label == alone.label and got.adapter == req.adapter
        want = dict(alone.scores)
        for label, p in got.scores:
            if p > 1e-3:
                assert want.get(label) == pytest.approx(p, abs=1e-4), label
    stats = engine.stats()
    assert stats["adapters_per_step"]["sum"] > stats["adapters_per_step"]["count"]   # mixed
    assert sum(v["count"] for v in stats["requests"].values()) >= 24


def test_shipped_adapters_answer_fresh_clips_over_http(served) -> None:
    client, _, _ = served
    right = total = 0
    for task in TASKS:
        labels = AUDIO_TASKS[task]
        clips = make_clips(task, 2, 777)
        for clip, y in zip(clips.clips, clips.labels):
            data = wav_bytes(clip)
            if total % 2:
                r = client.post("/v1/audio/classify", json={
                    "adapter": task, "audio": base64.b64encode(data).decode(), "top_k": 3})
            else:
                r = client.post("/v1/audio/classify", data={"adapter": task, "top_k": "3"},
                                files={"audio": ("clip.wav", data, "audio/wav")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["scores"]) == 3 and body["adapter"] == task
            assert body["adapter_version"] == 1 and body["label"] in labels
            right += body["label"] == labels[y]
            total += 1
    assert right / total >= 0.9


def test_flac_and_ogg_at_other_rates_are_resampled(served) -> None:
    client, _, _ = served
    clips = make_clips("pitch", 1, 31)
    import soxr
    for fmt, subtype, sr in (("FLAC", "PCM_16", 44100), ("OGG", "VORBIS", 22050)):
        up = soxr.resample(clips.clips[5], 16000, sr)
        r = client.post("/v1/audio/classify", data={"adapter": "pitch"},
                        files={"audio": ("c", wav_bytes(up, sr, subtype, fmt), "audio/x")})
        assert r.status_code == 200, r.text
        assert r.json()["label"] == AUDIO_TASKS["pitch"][5]


def _post(client, data: bytes, adapter: str = "pitch"):
    return client.post("/v1/audio/classify", data={"adapter": adapter},
                       files={"audio": ("a.wav", data, "audio/wav")})


@pytest.mark.parametrize("case,status,code", [
    ("not audio", 422, "not_audio"),
    ("empty", 400, "empty_audio"),
    ("ten minutes", 413, "audio_too_long"),
    ("1 Hz", 422, "bad_sample_rate"),
    ("NaN", 422, "non_finite_audio"),
    ("16 channels", 422, "too_many_channels"),
])
def test_bad_audio_is_refused_and_the_server_stays_healthy(served, case, status, code) -> None:
    client, _, _ = served
    data = {
        "not audio": b"this is plain text, not a wav file",
        "empty": b"",
        "ten minutes": wav_bytes(np.zeros(600 * 8000, dtype=np.float32), 8000),
        "1 Hz": wav_bytes(np.zeros(4, dtype=np.float32), 1),
        "NaN": wav_bytes(np.full(16000, np.nan, dtype=np.float32), subtype="FLOAT"),
        "16 channels": wav_bytes(np.zeros((16000, 16), dtype=np.float32)),
    }[case]
    r = _post(client, data)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert client.get("/healthz").status_code == 200
    assert _post(client, clip_wav("pitch", 0, 1)).status_code == 200


def test_audio_engine_stats_reach_metrics(served) -> None:
    client, _, _ = served
    assert _post(client, clip_wav("pitch", 1, 3)).status_code == 200
    text = client.get("/metrics").text
    assert 'petserve_engine_request_seconds_count{adapter="pitch",replica="local-audio"}' in text
    assert 'petserve_engine_batch_rows_count{replica="local-audio"}' in text


def test_wrong_adapters_and_missing_fields_are_clear(served) -> None:
    client, _, _ = served
    wav = clip_wav("pitch", 0, 2)
    r = _post(client, wav, adapter="colors")
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_an_audio_adapter"
    assert _post(client, wav, adapter="nope").status_code == 404
    r = client.post("/v1/audio/classify", json={"adapter": "pitch"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_media"
    r = client.post("/v1/audio/classify", json={"adapter": "pitch", "audio": "@@@"})
    assert r.status_code == 400
    r = client.post("/v1/vqa", json={"adapter": "pitch", "question": "what?",
                                     "image": base64.b64encode(wav).decode()})
    assert 400 <= r.status_code < 500


def test_an_audio_adapter_without_a_head_is_refused_not_a_500(served) -> None:
    from petserve.adapters.adapter_file import adapter_bytes
    from petserve.adapters.kinds import get_kind
    client, backend, _ = served
    model = backend.audio.model
    k = get_kind("lora")
    cfg = k.Config(r=2, targets=("enc.self.q",), train_visual_embedding=False)
    backend.upload_now("headless", adapter_bytes("lora", cfg, k.init_params(cfg, model), model,
                                                 "audio_classify"))
    r = _post(client, clip_wav("pitch", 0, 4), adapter="headless")
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_head"


def test_an_uploaded_audio_adapter_is_checked_against_the_audio_backbone(served) -> None:
    client, backend, audio = served
    data = audio.adapters["timbre"].read_bytes()
    r = client.put("/v1/adapters/my-timbre", content=data, headers=AUTH)
    assert r.status_code in (200, 201), r.text
    assert r.json()["kind"] == "adapter"
    clips = make_clips("timbre", 1, 5)
    r = _post(client, wav_bytes(clips.clips[3]), adapter="my-timbre")
    assert r.status_code == 200 and r.json()["adapter"] == "my-timbre"
    bad = bytearray(data)
    bad[-50:] = b"\x00" * 50            # tensor bytes changed: still parses, still an audio file
    r = client.put("/v1/adapters/broken", content=bytes(bad[:len(bad) // 2]), headers=AUTH)
    assert r.status_code == 422
