"""The adapter store's contract, run against both backends (serving/store.py's LocalDirStore and
serving/s3_store.py's S3Store on moto's S3 server): versions, ids, limits, concurrency; then the
local directory's own crash safety. S3-only behaviour is in tests/test_s3_store.py."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from petserve.serving.errors import ApiError
from petserve.serving.store import AdapterStore, LocalDirStore, validate_adapter_id

pytest_plugins = ("tests.moto_s3",)
WRITER = Path(__file__).with_name("store_writer.py")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".tmp-*"))


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path: Path) -> Callable[..., AdapterStore]:
    """Opens stores (keyword arguments: max_bytes, keep_versions) on one fresh backing: a
    directory, or a bucket of the moto server. Each S3Store is another replica, with a cache of
    its own, and with fresh_s=0 so that get() sees other writers at once as the local store's
    does."""
    if request.param == "local":
        return lambda **kw: LocalDirStore(tmp_path / "store", **kw)
    from petserve.serving.s3_store import S3Store
    bucket = request.getfixturevalue("s3_env").new_bucket()
    replicas = itertools.count()
    return lambda **kw: S3Store(bucket, "adapters", tmp_path / f"cache-{next(replicas)}",
                                fresh_s=0, **kw)


@pytest.fixture
def store(backend) -> AdapterStore:
    return backend()


# --- the contract, both backends ---------------------------------------------------------------


def test_put_get_read_list_delete(store: AdapterStore) -> None:
    assert isinstance(store, AdapterStore)
    st = store.put("vqa-lora", b"abc", {"kind": "lora", "trainable_parameters": 12})
    assert (st.id, st.version, st.size, st.sha256) == ("vqa-lora", 1, 3, sha(b"abc"))
    assert st.meta == {"kind": "lora", "trainable_parameters": 12}
    assert store.get("vqa-lora") == st
    assert store.read("vqa-lora") == b"abc"
    assert store.path("vqa-lora").read_bytes() == b"abc"
    store.put("caption.v2", io.BytesIO(b"xyz"), {"kind": "adapter"})
    assert [s.id for s in store.list()] == ["caption.v2", "vqa-lora"]
    assert store.delete("vqa-lora") == st
    assert [s.id for s in store.list()] == ["caption.v2"]
    for call in (store.get, store.read, store.path, store.delete):
        with pytest.raises(ApiError) as e:
            call("vqa-lora")
        assert (e.value.status, e.value.code) == (404, "adapter_not_found")
        assert "vqa-lora" in e.value.message


def test_versions_increase_and_are_kept(store: AdapterStore) -> None:
    for i in range(1, 4):
        assert store.put("a", bytes([i]), {}).version == i
    assert store.get("a").version == 3
    assert store.read("a", 1) == b"\x01"
    assert store.get("a", 2).sha256 == sha(b"\x02")
    with pytest.raises(ApiError) as e:
        store.get("a", 7)
    assert e.value.status == 404 and "version 7" in e.value.message
    assert [s.version for s in store.list()] == [3]


def test_versions_never_repeat(backend) -> None:
    store = backend()
    store.put("a", b"1", {})
    store.put("a", b"2", {})
    store.delete("a")
    assert store.put("a", b"3", {}).version == 3
    store.delete("a")
    reopened = backend()
    assert reopened.list() == []
    assert reopened.put("a", b"4", {}).version == 4
    assert backend().get("a").version == 4


def test_prunes_to_keep_versions(backend) -> None:
    store = backend(keep_versions=2)
    for i in range(5):
        store.put("a", bytes([i]), {})
    other = backend()
    assert [other.read("a", v) for v in (4, 5)] == [b"\x03", b"\x04"]
    for version in (1, 2, 3):
        with pytest.raises(ApiError) as e:
            other.get("a", version)
        assert e.value.status == 404


@pytest.mark.parametrize(
    "bad",
    ["", "..", ".", "../x", "a/../../etc", "a/b", "/etc/passwd", "Adapter", "a b",
     "a\x00b", "-a", ".hidden", "_a", "a" * 65, "é", "a\n", None, 5],
)
def test_invalid_ids(store: AdapterStore, bad: object) -> None:
    with pytest.raises(ApiError) as e:
        validate_adapter_id(bad)
    assert (e.value.status, e.value.code) == (400, "invalid_adapter_id")
    assert "lowercase letter" in e.value.message
    for call in (lambda: store.put(bad, b"x", {}), lambda: store.get(bad), lambda: store.delete(bad)):
        with pytest.raises(ApiError):
            call()
    store.refresh()
    assert store.list() == []


@pytest.mark.parametrize("good", ["a", "0", "vqa-lora_v1.2", "a" * 64, "a..b"])
def test_valid_ids(good: str) -> None:
    assert validate_adapter_id(good) == good


def test_oversize_leaves_nothing(backend, tmp_path: Path) -> None:
    store = backend(max_bytes=1000)
    assert store.put("a", bytes(1000), {}).size == 1000
    for data in (bytes(1001), io.BytesIO(bytes(5000))):
        with pytest.raises(ApiError) as e:
            store.put("a", data, {})
        assert (e.value.status, e.value.code) == (413, "payload_too_large")
    assert leftovers(tmp_path) == []
    assert store.get("a").version == 1
    assert store.put("a", b"ok", {}).version == 2


def test_concurrent_thread_puts_get_distinct_versions(backend) -> None:
    store = backend(keep_versions=None)
    got: list[int] = []

    def work() -> None:
        for _ in range(5):
            got.append(store.put("a", os.urandom(64), {}).version)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 41))
    assert backend().get("a").version == 40


def test_other_replicas_writes_are_seen(backend) -> None:
    mine, theirs = backend(), backend()
    theirs.put("a", b"1", {})
    assert mine.get("a").version == 1  # get() looks at the backend
    assert mine.list()[0].id == "a"
    theirs.put("b", b"2", {})
    mine.refresh()
    assert [s.id for s in mine.list()] == ["a", "b"]
    theirs.delete("a")
    with pytest.raises(ApiError):
        mine.read("a")


# --- the local directory only: temp files, flock, crashed processes, files edited on disk -----


def test_concurrent_process_puts_get_distinct_versions(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, str(WRITER), "hammer", str(tmp_path), "a", "10"],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    got = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        got += [int(line.split()[1]) for line in out.splitlines()]
    assert sorted(got) == list(range(1, 31))


def test_blob_without_metadata_is_invisible(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.put("a", b"one", {})
    # A crash between renaming the blob into place and writing its metadata:
    (tmp_path / "a" / ".counter").write_text("2\n")
    (tmp_path / "a" / "v2.safetensors").write_bytes(b"two")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "v1.safetensors").write_bytes(b"orphan")
    assert store.get("a").version == 1
    reopened = LocalDirStore(tmp_path)
    assert [(s.id, s.version) for s in reopened.list()] == [("a", 1)]
    assert not (tmp_path / "a" / "v2.safetensors").exists()  # cleaned up
    assert reopened.put("a", b"three", {}).version == 3


def test_metadata_naming_a_bad_blob_is_invisible(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path, keep_versions=None)
    store.put("a", b"one", {})
    store.put("a", b"two", {})
    (tmp_path / "a" / "v2.safetensors").write_bytes(b"tw")  # wrong size
    assert store.get("a").version == 1
    (tmp_path / "a" / "v1.safetensors").write_bytes(b"ONE")  # right size, wrong hash
    assert LocalDirStore(tmp_path).get("a").version == 1
    assert LocalDirStore(tmp_path, verify_sha256=True).list() == []
    with pytest.raises(RuntimeError):
        store.read("a")
    meta = tmp_path / "a" / "v1.json"
    meta.write_text(json.dumps({"garbage": True}))
    assert LocalDirStore(tmp_path).list() == []


def test_killed_writer_leaves_only_acknowledged_versions(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(WRITER), "acked", str(tmp_path), "4"],
                            stdout=subprocess.PIPE, text=True)
    acked = {}
    try:
        for line in proc.stdout:
            if line.startswith("ok"):
                _, adapter_id, version, digest = line.split()
                acked[adapter_id] = (int(version), digest)
            if line.startswith("big"):
                break
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size > 4 * 2**20 for p in (tmp_path / "big").glob(".tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        assert proc.poll() is None  # still mid-upload
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert len(acked) == 4
    assert leftovers(tmp_path)  # the crash left a partial temp file ...
    store = LocalDirStore(tmp_path)
    assert leftovers(tmp_path) == []  # ... which start-up removed
    listed = {s.id: (s.version, s.sha256) for s in store.list()}
    assert listed == acked
    for adapter_id, (_version, digest) in acked.items():
        assert sha(store.read(adapter_id)) == digest
    assert store.put("big", b"after", {}).version == 2


def test_startup_cleanup_spares_live_uploads(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    store.put("a", b"first", {})

    class OpensAnotherStoreMidUpload(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            LocalDirStore(tmp_path)  # another replica starting up now
            return super().read(n)

    st = store.put("a", OpensAnotherStoreMidUpload(os.urandom(3 * 2**20)), {})
    assert st.version == 2 and store.get("a") == st


def test_prune_ignores_orphans_of_a_crashed_writer(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path, keep_versions=2)
    store.put("a", b"1", {})
    (tmp_path / "a" / ".counter").write_text("2\n")
    (tmp_path / "a" / "v2.safetensors").write_bytes(b"orphan")  # another replica died here
    store.put("a", b"3", {})
    store.put("a", b"4", {})
    assert sorted(p.name for p in (tmp_path / "a").glob("v*")) == [
        "v3.json", "v3.safetensors", "v4.json", "v4.safetensors",
    ]


def test_memoised_reads_still_see_other_writers(tmp_path: Path) -> None:
    """get() memoises one id's scan on its directory mtime: changes by another instance (another
    replica) after the memo was taken are still seen, puts and deletes alike."""
    reader, writer = LocalDirStore(tmp_path), LocalDirStore(tmp_path)
    writer.put("a", b"one", {})
    time.sleep(0.12)                         # past the racy window: the next get memoises
    assert reader.get("a").version == 1
    assert reader.get("a").version == 1      # served from the memo
    writer.put("a", b"two", {})
    assert reader.get("a").version == 2
    time.sleep(0.12)
    assert reader.get("a").version == 2
    writer.delete("a")
    with pytest.raises(ApiError) as err:
        reader.get("a")
    assert err.value.status == 404
