"""SlotPool: LRU over unreferenced slots, references block eviction, prefetch, versions, deletes."""
from __future__ import annotations

import pytest
import torch

from petserve.adapters.adapter_file import adapter_bytes
from petserve.serving.errors import ApiError
from petserve.serving.slot_pool import SlotPool
from petserve.serving.store import LocalDirStore
from tests.conftest import random_adapter

SITE = "enc.0.self.q"          # every default LoRA adapts it


def put_adapter(store, model, adapter_id, kind="lora", options=None, seed=0, noise=0.3, task="vqa"):
    """Store a randomly perturbed adapter; returns its StoredAdapter."""
    cfg, params = random_adapter(model, kind, options or {}, seed=seed, noise=noise)
    data = adapter_bytes(kind, cfg, params, model, task)
    return store.put(adapter_id, data, {"kind": kind, "task": task})


@pytest.fixture
def store(tmp_path, tiny_t5):
    s = LocalDirStore(tmp_path / "store")
    for i, name in enumerate("abcd"):
        put_adapter(s, tiny_t5, name, "lora", {"r": 2 + i}, seed=i)
    return s


def pool_of(model, store, slots=2, cpu_bytes=2**30, composites=8):
    return SlotPool(model, store, num_slots=slots, cpu_cache_bytes=cpu_bytes,
                    cpu_cache_adapters=composites)


def acquire(pool, name, task="vqa", **options):
    """What the engine does: the store's latest version, read once, then the pool."""
    return pool.acquire(name, pool.store.get(name).version, task, **options)


def use(pool, name, task="vqa"):
    """Acquire and release at once (the adapter stays resident, unreferenced)."""
    slot = acquire(pool, name, task)
    pool.release(slot)
    return slot


def names(pool):
    return sorted(k[0] for k in pool.resident())


def test_least_recently_used_unreferenced_slot_is_evicted(tiny_t5, store):
    pool = pool_of(tiny_t5, store)
    sa, sb = use(pool, "a"), use(pool, "b")
    assert sa != sb and names(pool) == ["a", "b"]
    assert use(pool, "a") == sa                     # hit: a becomes most recent
    use(pool, "c")                                  # evicts b, the least recently used
    assert names(pool) == ["a", "c"]
    c = pool.counters()
    assert (c["hits"], c["misses"], c["evictions"]) == (1, 3, 1)


def test_slot_holds_the_adapters_weights(tiny_t5, store):
    pool = pool_of(tiny_t5, store)
    slot = use(pool, "c")                           # rank 4
    stack = pool.bank.lowrank(SITE)
    assert stack.ranks_host[slot] == 4
    use(pool, "a")
    use(pool, "b")                                  # c evicted, its slot rewritten with rank 3
    assert names(pool) == ["a", "b"]
    assert sorted(pool.bank.lowrank(SITE).ranks_host) == [2, 3]


def test_referenced_slots_are_never_evicted_and_busy_returns_none(tiny_t5, store):
    pool = pool_of(tiny_t5, store)
    sa = acquire(pool, "a")
    sb = acquire(pool, "b")
    assert acquire(pool, "c") is None               # both slots in use: no waiting, no eviction
    assert pool.counters()["busy"] == 1 and names(pool) == ["a", "b"]
    again = acquire(pool, "a")                      # sharing a resident slot always works
    assert again == sa and pool.refs(sa) == 2
    pool.release(sb)
    sc = acquire(pool, "c")
    assert sc == sb and names(pool) == ["a", "c"]
    pool.release(sa)
    assert pool.refs(sa) == 1                       # one reference left: still not evictable
    assert acquire(pool, "d") is None
    pool.release(sc)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(sc)


def test_share_only_joins_referenced_slots_but_loads_nothing(tiny_t5, store):
    pool = pool_of(tiny_t5, store)
    assert acquire(pool, "a", share_only=True) is None     # not resident
    use(pool, "a")
    assert acquire(pool, "a", share_only=True) is None     # resident but idle
    sa = acquire(pool, "a")
    assert acquire(pool, "a", share_only=True) == sa
    assert pool.refs(sa) == 2


def test_prefetch_warms_the_cpu_cache_and_holds_nothing(tiny_t5, store):
    pool = pool_of(tiny_t5, store, slots=2)
    pool.prefetch("a", 1)
    c = pool.counters()
    assert (c["store_reads"], c["resident"], c["referenced"]) == (1, 0, 0)   # no slot taken
    use(pool, "a")
    assert pool.counters()["store_reads"] == 1      # the slot load was a CPU hit
    for name in "bcbc":
        use(pool, name)
    assert "a" not in names(pool)                   # prefetched, yet evicted like any other
    with pytest.raises(ApiError) as e:
        pool.prefetch("nope", 1)
    assert e.value.status == 404


def test_new_version_loads_a_fresh_slot_while_the_old_one_is_in_use(tiny_t5, store):
    pool = pool_of(tiny_t5, store, slots=3)
    old = acquire(pool, "a")
    old_A = pool.bank.lowrank(SITE).A[old].clone()
    put_adapter(store, tiny_t5, "a", "lora", {"r": 2}, seed=99)
    new = acquire(pool, "a")
    assert new != old
    assert pool.resident() == {("a", 1, None): old, ("a", 2, None): new}
    torch.testing.assert_close(pool.bank.lowrank(SITE).A[old], old_A)   # rows in flight unchanged
    assert not torch.equal(pool.bank.lowrank(SITE).A[new], old_A)
    pool.release(old)                               # last v1 reference: freed, not cached
    assert pool.resident() == {("a", 2, None): new}
    assert use(pool, "a") == new


def test_an_older_version_admitted_late_is_dropped_by_the_next_newer_acquire(tiny_t5, store):
    """A request admitted before an upload may reach the pool after the new version did: the old
    version loads for it and the next acquire of the newer version drops it (slot and CPU copy);
    acquires of a version already seen scan nothing."""
    pool = pool_of(tiny_t5, store, slots=3)
    put_adapter(store, tiny_t5, "a", "lora", {"r": 2}, seed=99)
    use(pool, "a")                                   # v2
    late = pool.acquire("a", 1, "vqa")               # admitted before the upload
    assert set(pool.resident()) == {("a", 1, None), ("a", 2, None)}
    pool.release(late)
    use(pool, "a")
    assert set(pool.resident()) == {("a", 2, None)}
    assert [k for k in pool._cpu if k[0] == "a"] == [("a", 2)]


def test_deleted_adapter_is_404_but_rows_in_flight_keep_their_slot(tiny_t5, store):
    pool = pool_of(tiny_t5, store, cpu_bytes=1)
    sa = acquire(pool, "a")
    sb = acquire(pool, "b")
    store.delete("a")
    store.delete("b")
    assert pool.acquire("a", 1, "vqa") == sa        # admitted before the delete: still served
    assert pool.refs(sa) == 2 and pool.bank.lowrank(SITE).ranks_host[sa] == 2
    pool.release(sa)
    pool.release(sa)
    pool.release(sb)
    with pytest.raises(ApiError) as e:              # evicted everywhere, its blob gone: 404
        use(pool, "c")
        use(pool, "d")
        pool.acquire("a", 1, "vqa")
    assert e.value.status == 404 and e.value.code == "adapter_not_found"


def test_cpu_cache_serves_reloads_without_store_reads(tiny_t5, store):
    pool = pool_of(tiny_t5, store, slots=1)
    for name in "abab":
        use(pool, name)
    c = pool.counters()
    assert (c["store_reads"], c["cpu_hits"], c["misses"], c["evictions"]) == (2, 2, 4, 3)
    small = pool_of(tiny_t5, store, slots=1, cpu_bytes=1)     # keeps only the latest
    for name in "abab":
        use(small, name)
    assert small.counters()["store_reads"] == 4 and small.counters()["cpu_hits"] == 0


def test_the_cpu_cache_holds_what_its_byte_budget_allows(tiny_t5, store):
    sizes = {}
    for name in "abcd":                         # ranks 2..5: four different sizes
        alone = pool_of(tiny_t5, store, slots=1)
        use(alone, name)
        sizes[name] = alone.counters()["cpu_cached_bytes"]
    assert len(set(sizes.values())) == 4 and min(sizes.values()) > 0
    pool = pool_of(tiny_t5, store, slots=1, cpu_bytes=sizes["c"] + sizes["d"])
    for name in "abcd":
        use(pool, name)
    c = pool.counters()
    assert sorted(k[0] for k in pool._cpu) == ["c", "d"]       # the least recently used went
    assert c["cpu_cached_bytes"] == sizes["c"] + sizes["d"] and c["cpu_cached"] == 2
    use(pool, "c")                                              # a hit: nothing read, nothing dropped
    assert pool.counters()["store_reads"] == 4 and sorted(k[0] for k in pool._cpu) == ["c", "d"]
    put_adapter(store, tiny_t5, "c", "lora", {"r": 2}, seed=9)  # version 2 of c, rank 2
    use(pool, "c")
    assert sorted(pool._cpu) == [("c", 2), ("d", 1)]            # version 1 forgotten, its bytes too
    assert pool.counters()["cpu_cached_bytes"] == sizes["a"] + sizes["d"]


def test_load_time_is_recorded(tiny_t5, store):
    pool = pool_of(tiny_t5, store)
    use(pool, "a")
    use(pool, "b")
    c = pool.counters()
    assert c["load_count"] == 2 and c["load_ms_last"] > 0
    assert c["load_ms_sum"] >= c["load_ms_last"] and c["read_ms_sum"] > 0 and c["copy_ms_sum"] > 0
