"""The embedded default seeds the store with the demo adapters: missing ones are added, earlier
builds of a demo adapter are replaced by the shipped one, and a user's own upload under a demo id is
never touched."""
from __future__ import annotations

from petserve.adapters.adapter_file import adapter_bytes
from petserve.serving.deployments import seed_store
from petserve.serving.store import LocalDirStore
from petserve.serving.uploads import prepare_upload
from tests.conftest import random_adapter


def demo_file(tmp_path, model, seed: int, name: str):
    cfg, params = random_adapter(model, "lora", {"r": 4}, seed)
    path = tmp_path / f"{name}-{seed}.safetensors"
    path.write_bytes(adapter_bytes("lora", cfg, params, model, "vqa", name=name))
    return path


def test_missing_added_earlier_builds_replaced_user_uploads_kept(tmp_path, tiny_t5):
    store = LocalDirStore(tmp_path / "store")
    old, new = (demo_file(tmp_path, tiny_t5, seed, "demo-colors") for seed in (1, 2))
    assert seed_store(store, {"colors": old}, "tiny-t5", 2**22) == ["colors"]
    assert store.get("colors").version == 1
    seed_store(store, {"colors": old}, "tiny-t5", 2**22)              # the same build: no new version
    assert store.get("colors").version == 1
    seed_store(store, {"colors": new}, "tiny-t5", 2**22)              # a rebuilt demo adapter
    assert store.get("colors").version == 2 and store.read("colors") == new.read_bytes()
    mine = demo_file(tmp_path, tiny_t5, 3, "my-colors")
    store.put("colors", *prepare_upload(mine.read_bytes(), tiny_t5, 2**22))
    seed_store(store, {"colors": old}, "tiny-t5", 2**22)              # a user's upload stays
    assert store.get("colors").version == 3 and store.read("colors") == mine.read_bytes()
