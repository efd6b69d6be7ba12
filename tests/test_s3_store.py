"""S3Store's own behaviour on moto's S3 server: racing replicas, a crash between blob and manifest,
replicas seeing each other, the read-through cache through an outage, and the HTTP API in one.
The contract both backends share is tests/test_store.py's."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from petserve.adapters.adapter_file import adapter_bytes
from petserve.serving import s3_store
from petserve.serving.errors import ApiError
from petserve.serving.s3_store import S3Store
from petserve.serving.server_config import ServerConfig
from petserve.serving.store import open_store
from tests.conftest import random_adapter

pytest_plugins = ("tests.moto_s3",)
PREFIX = "team/adapters"
TOKEN = "s3-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.new_bucket()


def replica(bucket: str, cache: Path, **kw) -> S3Store:
    return S3Store(bucket, PREFIX, cache, **kw)


def keys(s3, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return sorted(o["Key"].removeprefix(PREFIX + "/") for o in listed)


def test_racing_replicas_get_consecutive_versions_and_keep_every_upload(bucket, tmp_path):
    stores = [replica(bucket, tmp_path / f"r{i}", keep_versions=None) for i in range(3)]
    acked: list[tuple[int, bytes]] = []

    def upload(store: S3Store) -> None:
        for _ in range(4):
            data = os.urandom(200)
            acked.append((store.put("a", data, {}).version, data))

    threads = [threading.Thread(target=upload, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in acked) == list(range(1, 25))
    reader = replica(bucket, tmp_path / "reader")
    for version, data in acked:
        assert reader.read("a", version) == data
    assert reader.get("a").version == 24


def test_blob_without_a_published_manifest_is_invisible(s3_env, bucket, tmp_path, monkeypatch):
    store = replica(bucket, tmp_path / "r0")
    store.put("a", b"one", {})
    # A crash between writing the blob and publishing its manifest (the number was claimed):
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/a/blobs/{sha(b'two')}-dead", Body=b"two")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/a/counter", Body=b"2\n")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/b/blobs/{sha(b'orphan')}-dead", Body=b"orphan")
    other = replica(bucket, tmp_path / "r1")
    assert [(s.id, s.version) for s in other.list()] == [("a", 1)]
    assert other.read("a") == b"one"
    with pytest.raises(ApiError) as e:
        other.get("b")
    assert e.value.status == 404
    monkeypatch.setattr(s3_store, "ORPHAN_AGE_S", 0.0)     # the crashed upload is long gone
    assert other.put("a", b"three", {}).version == 3       # the claimed number stays burned
    left = [k for k in keys(s3_env, bucket) if k.startswith("a/")]
    blobs = [k for k in left if k.startswith("a/blobs/")]
    assert [k for k in left if k not in blobs] == ["a/counter", "a/v1.json", "a/v3.json"]
    assert sorted(k.split("/")[-1][:64] for k in blobs) == sorted([sha(b"one"), sha(b"three")])


def test_replicas_see_each_others_writes_after_refresh(bucket, tmp_path):
    one, two = replica(bucket, tmp_path / "r1"), replica(bucket, tmp_path / "r2")
    one.put("a", b"a1", {"kind": "lora"})
    assert two.list() == []                     # its index is from before
    two.refresh()
    assert [(s.id, s.version, s.meta) for s in two.list()] == [("a", 1, {"kind": "lora"})]
    two.put("a", b"a2", {})
    two.put("b", b"b1", {})
    one.refresh()
    assert [(s.id, s.version) for s in one.list()] == [("a", 2), ("b", 1)]
    assert one.read("a") == b"a2"
    one.delete("a")
    two.refresh()
    assert [s.id for s in two.list()] == ["b"]
    with pytest.raises(ApiError) as e:
        two.read("a")
    assert e.value.status == 404
    assert two.put("a", b"a3", {}).version == 3


def test_delete_is_one_marker_and_removes_what_it_hides(s3_env, bucket, tmp_path):
    store = replica(bucket, tmp_path / "r")
    store.put("a", b"1", {})
    store.put("a", b"2", {})
    store.delete("a")
    assert keys(s3_env, bucket) == ["a/counter", "a/v2.deleted"]
    store.put("a", b"3", {})
    store.delete("a")
    assert keys(s3_env, bucket) == ["a/counter", "a/v3.deleted"]


def test_corrupt_cached_blob_is_fetched_again(bucket, tmp_path):
    store = replica(bucket, tmp_path / "r")
    stored = store.put("a", b"payload", {})
    cached = store.path("a")
    assert cached == tmp_path / "r" / stored.sha256 and cached.read_bytes() == b"payload"
    cached.write_bytes(b"PAYLOAD")
    assert store.read("a") == b"payload" and cached.read_bytes() == b"payload"


def test_the_blob_cache_keeps_the_most_recently_used_blobs_within_its_budget(bucket, tmp_path):
    cache = tmp_path / "r"
    store = replica(bucket, cache, cache_max_bytes=250)
    blob = {i: i.encode() * 100 for i in "abcd"}

    def cached() -> set[str]:
        return {i for i in blob if (cache / sha(blob[i])).exists()}
    for i in "ab":
        store.put(i, blob[i], {})
        time.sleep(0.02)                       # distinct mtimes on coarse file system clocks
    assert store.read("a") == blob["a"]        # a hit: "a" is now the more recently used
    time.sleep(0.02)
    store.put("c", blob["c"], {})              # 300 bytes: the least recently used goes
    assert cached() == {"a", "c"}
    time.sleep(0.02)
    assert store.read("b") == blob["b"]        # dropped from the cache, not from the store
    assert cached() == {"b", "c"}
    (cache / "unrelated.tmp").write_bytes(b"x" * 1000)   # a temp file in flight is not a blob
    small = replica(bucket, cache, cache_max_bytes=10)  # under one blob: only the newest stays
    small.put("d", blob["d"], {})
    assert small.read("d") == blob["d"] and cached() == {"d"}
    assert (cache / "unrelated.tmp").exists()


def test_outage_reads_from_cache_and_uploads_fail_fast_with_503(private_moto_s3, tmp_path):
    bucket = private_moto_s3.new_bucket()
    store = replica(bucket, tmp_path / "r", fresh_s=0)
    store.put("a", b"alpha", {"kind": "lora"})
    store.put("b", b"beta", {})
    private_moto_s3.stop()
    assert store.read("a") == b"alpha"                    # last known metadata, cached blob
    assert store.get("b").version == 1
    store.refresh()
    assert [s.id for s in store.list()] == ["a", "b"]
    for attempt in range(2):                              # the call that finds S3 down, then
        start = time.monotonic()                          # one while the store backs off
        with pytest.raises(ApiError) as e:
            store.put("a", b"alpha-2", {})
        elapsed = time.monotonic() - start
        assert elapsed < 3.0, (attempt, elapsed)
        assert (e.value.status, e.value.code) == (503, "store_unavailable")
        assert f"s3://{bucket}/{PREFIX}" in e.value.message
        assert e.value.headers["Retry-After"] == "5"
    with pytest.raises(ApiError) as e:
        store.get("never-seen")
    assert e.value.status == 503
    with pytest.raises(ApiError) as e:
        store.delete("a")
    assert e.value.status == 503


def test_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    with pytest.raises(ApiError) as e:
        replica("no-such-bucket", tmp_path / "r")
    assert e.value.status == 503
    assert "s3://no-such-bucket/team/adapters: bucket 'no-such-bucket' does not exist" in \
        e.value.message


def test_http_upload_is_503_in_an_outage_while_loaded_adapters_answer(private_moto_s3, tiny_t5,
                                                                       tmp_path):
    from petserve.serving.api import create_app
    from petserve.serving.deployments import LocalBackend
    config = ServerConfig(store_dir=tmp_path, store_url=f"s3://{private_moto_s3.new_bucket()}/p",
                          token=TOKEN, max_adapter_bytes=4 * 2**20)
    store = open_store(config)
    assert isinstance(store, S3Store) and store.cache_dir == tmp_path / ".s3-cache"
    backend = LocalBackend(tiny_t5, store, config.engine, config.max_adapter_bytes)
    cfg, params = random_adapter(tiny_t5, "lora", {"r": 4}, seed=1)
    adapter = adapter_bytes("lora", cfg, params, tiny_t5, "vqa")
    feats = np.random.default_rng(0).normal(size=(4, 64)).round(4).tolist()
    vqa = {"adapter": "x", "features": feats, "question": "what is it?", "max_new_tokens": 4}
    backend.start()
    try:
        with TestClient(create_app(backend, config)) as client:
            assert client.put("/v1/adapters/x", content=adapter, headers=AUTH).status_code == 201
            before = client.post("/v1/vqa", json=vqa)
            assert before.status_code == 200, before.text
            private_moto_s3.stop()
            r = client.put("/v1/adapters/x", content=adapter, headers=AUTH)
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            error = r.json()["error"]
            assert error["code"] == "store_unavailable" and config.store_url in error["message"]
            after = client.post("/v1/vqa", json=vqa)
            assert after.status_code == 200, after.text
            assert after.json()["answer"] == before.json()["answer"]
    finally:
        backend.stop()
