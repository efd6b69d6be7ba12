"""SlotPool: which adapter sits in which device slot, with a CPU cache of compiled adapters behind it.

    store (bytes) --read+parse--> CPU cache (AdapterFile + its compiled forms, LRU by bytes)
                  --SlotBank.set--> device slot (LRU over unreferenced slots)

A slot is keyed by ``(adapter_id, version, task)`` where ``task`` is None unless the adapter's kind is
task-conditioned. ``acquire`` makes an adapter resident and takes a reference; ``release`` drops it.
Only slots without references are ever evicted, so rows in flight keep their weights. ``acquire``
never waits: when every slot is referenced it returns None and the caller keeps its request queued.

Versions: the engine reads the latest version from the store once per request, at submit, and
acquires that version. Resident older versions are freed at once if unreferenced, or when their
last reference is released. A request for an adapter deleted after its submit fails with the
store's 404 when its blob is gone (rows already holding its slot finish); the slots of deleted
adapters are reclaimed by the LRU.

Composites: ``acquire`` also takes a tuple of ids with a tuple of versions (a request naming
several adapters). Their compiled forms are composed into one (adapters/runtime/compose.py),
cached in the CPU cache under the ordered (id, version) list and held by one slot keyed
``(((id, version), ...), 0, task)``; a newer version or a deletion of any member drops every
composite that holds it, as it drops the member itself.

Threads: acquire/release (and so every SlotBank write) belong to the engine's scheduler thread;
prefetch/check_task/counters may be called from any thread. One lock guards the bookkeeping.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from petserve.adapters.adapter_file import AdapterFile, AdapterFileError, cast_params, load_adapter
from petserve.adapters.kinds import get_kind
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.compose import CompositionError, compose
from petserve.adapters.runtime.forms import CompiledAdapter, tensor_bytes
from petserve.serving.errors import ApiError
from petserve.serving.store import AdapterStore

SlotKey = tuple[str, int, "str | None"]     # (adapter_id, version, task if task-conditioned)
Members = tuple[tuple[str, int], ...]       # a composite: (id, version) of each member, in order


def compile_on_cpu(af: AdapterFile, model, task: str | None) -> CompiledAdapter:
    """``af``'s runtime forms in fp32 on the CPU (SlotBank.set casts and copies them to the device).

    Raises ApiError 422 ``adapter_task_unsupported`` when a task-conditioned kind has no ``task``."""
    params = cast_params(af.params, torch.float32)
    kind = get_kind(af.kind)
    try:
        return kind.compile(af.config, params, model, task or af.meta.task)
    except (KeyError, ValueError) as e:
        if af.task_conditioned:
            raise ApiError.unprocessable("adapter_task_unsupported", f"adapter kind {af.kind!r} "
                                         f"cannot serve task {task!r}: {e}") from e
        raise


def compose_members(parts: list[tuple[str, CompiledAdapter]], model) -> CompiledAdapter:
    """adapters/runtime/compose.py's composite; members that do not compose are a 422."""
    try:
        return compose(parts, model)
    except CompositionError as e:
        raise ApiError.unprocessable("adapters_do_not_compose", str(e)) from None


def parse_stored(data: bytes, model) -> AdapterFile:
    """A stored blob parsed and validated; a blob that no longer fits this backbone is the client's
    upload gone stale, so AdapterFileError becomes an ApiError with its status and code."""
    try:
        return load_adapter(data, model, max_bytes=max(len(data), 1))
    except AdapterFileError as e:
        raise ApiError(e.status, e.code, e.message) from e


@dataclass
class PoolCounters:
    """Monotonic counters (read them with ``SlotPool.counters()``)."""

    hits: int = 0            # acquires that found their adapter resident
    misses: int = 0          # acquires that wrote a slot
    evictions: int = 0       # resident adapters dropped to make room
    busy: int = 0            # acquires refused because every slot was referenced
    cpu_hits: int = 0        # CPU-cache lookups that hit (slot loads, prefetches, task checks)
    store_reads: int = 0     # CPU-cache misses: store read + parse
    load_count: int = 0      # slot writes (== misses)
    load_ms_sum: float = 0.0  # store read + compile + copy into the slot, per slot write
    load_ms_last: float = 0.0
    read_ms_sum: float = 0.0  # store read + parse/validate, per store read
    compile_ms_sum: float = 0.0
    copy_ms_sum: float = 0.0


GENERATED_PREFIX = "@"   # ids of adapters generated from an inline context (never store ids)


def is_generated(adapter_id) -> bool:
    return isinstance(adapter_id, str) and adapter_id.startswith(GENERATED_PREFIX)


@dataclass
class _CpuEntry:
    file: AdapterFile | None                 # None: generated from a context, never stored
    compiled: dict[str | None, CompiledAdapter] = field(default_factory=dict)
    key: tuple[str, int] | None = None       # its key in the CPU cache (stored adapters)
    nbytes: int = 0                          # what the CPU cache counts for it

    @property
    def task_conditioned(self) -> bool:
        return self.file is not None and self.file.task_conditioned


@dataclass
class _Slot:
    key: SlotKey | None = None
    refs: int = 0
    stale: bool = False      # a newer version exists or the adapter was deleted: free on last release


class SlotPool:
    def __init__(self, model, store: AdapterStore, num_slots: int, cpu_cache_bytes: int,
                 cpu_cache_adapters: int):
        """``cpu_cache_bytes``: what the parsed stored adapters and their compiled forms may take
        in CPU memory (the most recently used one always stays); ``cpu_cache_adapters``: how many
        composites and generated adapters are kept."""
        self.model, self.store = model, store
        self.bank = SlotBank(model, num_slots)
        self.num_slots, self.cpu_capacity = num_slots, max(1, cpu_cache_adapters)
        self.cpu_budget, self._cpu_bytes = cpu_cache_bytes, 0
        self._slots = [_Slot() for _ in range(num_slots)]
        self._empty = list(range(num_slots))                     # sorted
        self._where: dict[SlotKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()       # resident, unreferenced; LRU first
        self._cpu: OrderedDict[tuple[str, int], _CpuEntry] = OrderedDict()
        self._composites: OrderedDict[tuple[Members, str | None], CompiledAdapter] = OrderedDict()
        self._generated: OrderedDict[str, CompiledAdapter] = OrderedDict()   # LRU, version 0
        # per stored id, at most the oldest version any of the maps above may hold: an acquire
        # of a version no newer than that has nothing to forget (no scan of the maps)
        self._oldest: dict[str, int] = {}
        self._stats = PoolCounters()
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, model, store: AdapterStore, config) -> SlotPool:
        """The pool an engine's ``config`` (serving.server_config.EngineConfig) describes."""
        return cls(model, store, config.num_slots, int(config.cpu_cache_mib * 2**20),
                   config.cpu_cache_adapters)

    # ---- the scheduler's side ------------------------------------------------------------
    def acquire(self, adapter_id: str | tuple[str, ...], version: int | tuple[int, ...], task: str,
                share_only: bool = False) -> int | None:
        """Make ``version`` of ``adapter_id`` (the store's latest when the request came in)
        resident and reference its slot; older versions are dropped (freed once unreferenced).
        A tuple of ids (and of their versions) is a composite.

        Returns the slot, or None when no slot can be had now (every slot referenced),
        or with ``share_only`` when the adapter is not already held by rows in flight. Raises
        ApiError (404 deleted since, 4xx unusable file or members that do not compose)."""
        if isinstance(adapter_id, tuple):
            adapter_id, version = tuple(zip(adapter_id, version)), 0
        with self._lock:
            for member, v in (adapter_id if isinstance(adapter_id, tuple) else [(adapter_id, version)]):
                self._forget(member, older_than=v)
            slot = self._resident_slot(adapter_id, version, task)
            if slot is not None and (not share_only or self._slots[slot].refs > 0):
                self._stats.hits += 1
                return self._reference(slot)
            if slot is not None or share_only:
                return None
            if not self._has_room():
                self._stats.busy += 1
                return None
            return self._load_into_slot(adapter_id, version, task)

    @contextmanager
    def batched_loads(self):
        """Acquires inside the block write their slots' low-rank weights together when it ends
        (SlotBank.batched): the scheduler admits a step's jobs in one block. The rows of those
        slots must not run before it ends."""
        with self.bank.batched():
            yield
            t0 = time.perf_counter()
        ms = (time.perf_counter() - t0) * 1e3         # the held-back writes, counted as copying
        with self._lock:
            self._stats.copy_ms_sum += ms
            self._stats.load_ms_sum += ms

    def release(self, slot: int) -> None:
        """Drop one reference taken by ``acquire``."""
        with self._lock:
            s = self._slots[slot]
            if s.refs <= 0:
                raise RuntimeError(f"slot {slot} released more often than acquired")
            s.refs -= 1
            if s.refs == 0 and s.stale:
                self._free(slot)
            elif s.refs == 0:
                self._idle[slot] = None          # most recently used end of the LRU

    # ---- any thread ----------------------------------------------------------------------
    def prefetch(self, adapter_id: str, version: int) -> None:
        """Read and parse ``version`` of ``adapter_id`` into the CPU cache now, so that a later
        slot load skips the store. Takes no reference and keeps nothing from eviction. Raises
        ApiError (404 deleted, 4xx unusable file)."""
        with self._lock:
            self._cpu_entry(adapter_id, version)

    def has_generated(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._generated

    def put_generated(self, adapter_id: str, compiled: CompiledAdapter) -> None:
        """Keep an adapter generated from an inline context (id ``@<context hash>``, version 0)
        beside the stored ones: loaded into slots, evicted and LRU-dropped like them."""
        with self._lock:
            self._generated[adapter_id] = compiled
            self._generated.move_to_end(adapter_id)
            while len(self._generated) > self.cpu_capacity:
                self._generated.popitem(last=False)

    def check_composite(self, members: Members, task: str) -> None:
        """Compose the members for ``task`` into the CPU cache now: ApiError 422 when they do not
        compose (or a member cannot serve ``task``), 404 for a member gone."""
        with self._lock:
            self._composite(members, task)

    def check_task(self, adapter_id: str, version: int, task: str) -> None:
        """Raise ApiError 422 now if the adapter's kind is task-conditioned and has no ``task``;
        compiles it for ``task`` into the CPU cache (so the later slot load is a CPU hit)."""
        with self._lock:
            entry = self._cpu_entry(adapter_id, version)
            if entry.task_conditioned and task not in entry.compiled:
                self._compile_into(entry, task)

    def counters(self) -> dict:
        with self._lock:
            out = asdict(self._stats)
            out.update(resident=len(self._where), slots=self.num_slots,
                       referenced=sum(s.refs > 0 for s in self._slots), cpu_cached=len(self._cpu),
                       cpu_cached_bytes=self._cpu_bytes)
            return out

    def resident(self) -> dict[SlotKey, int]:
        """Snapshot: slot of every resident adapter."""
        with self._lock:
            return dict(self._where)

    def refs(self, slot: int) -> int:
        with self._lock:
            return self._slots[slot].refs

    # ---- internals (lock held) -----------------------------------------------------------
    def _forget(self, adapter_id: str, older_than: int) -> None:
        """Drop every copy of ``adapter_id`` older than version ``older_than``, and every
        composite holding one."""
        if self._oldest.get(adapter_id, older_than) >= older_than:
            return
        self._oldest[adapter_id] = older_than      # what the scan below leaves

        def old(key) -> bool:
            if isinstance(key[0], tuple):
                return any(m == adapter_id and v < older_than for m, v in key[0])
            return key[0] == adapter_id and key[1] < older_than
        for key, slot in list(self._where.items()):
            if old(key):
                if self._slots[slot].refs:
                    self._slots[slot].stale = True
                else:
                    self._free(slot)
        for key in [k for k in self._cpu if old(k)]:
            self._cpu_bytes -= self._cpu.pop(key).nbytes
        for key in [k for k in self._composites if old((k[0], 0))]:
            del self._composites[key]

    def _resident_slot(self, adapter_id: str, version: int, task: str) -> int | None:
        slot = self._where.get((adapter_id, version, task))
        return self._where.get((adapter_id, version, None)) if slot is None else slot

    def _reference(self, slot: int) -> int:
        self._slots[slot].refs += 1
        self._idle.pop(slot, None)
        return slot

    def _has_room(self) -> bool:
        return bool(self._empty) or bool(self._idle)

    def _claim_slot(self) -> int:
        """An empty slot, or the least recently used unreferenced one (evicted)."""
        if not self._empty:
            victim = next(iter(self._idle))
            self._free(victim)
            self._stats.evictions += 1
        return self._empty.pop(0)

    def _free(self, slot: int) -> None:
        s = self._slots[slot]
        if s.key is not None:
            del self._where[s.key]
        self._idle.pop(slot, None)
        self.bank.reset(slot)
        self._slots[slot] = _Slot()
        bisect.insort(self._empty, slot)

    def _load_into_slot(self, adapter_id: str | Members, version: int, task: str) -> int:
        t0 = time.perf_counter()
        if isinstance(adapter_id, tuple):
            t1 = time.perf_counter()
            tkey, compiled = self._composite(adapter_id, task)
        else:
            entry = self._cpu_entry(adapter_id, version)
            tkey = task if entry.task_conditioned else None
            t1 = time.perf_counter()
            compiled = entry.compiled.get(tkey)
            if compiled is None:
                compiled = self._compile_into(entry, tkey)
        t2 = time.perf_counter()
        slot = self._claim_slot()
        self.bank.set(slot, compiled)
        self._slots[slot] = _Slot((adapter_id, version, tkey))
        self._where[(adapter_id, version, tkey)] = slot
        self._record_load(t0, t1, t2, time.perf_counter())
        return self._reference(slot)

    def _record_load(self, t0: float, t1: float, t2: float, t3: float) -> None:
        st = self._stats
        st.misses += 1
        st.load_count += 1
        st.load_ms_last = (t3 - t0) * 1e3
        st.load_ms_sum += st.load_ms_last
        st.compile_ms_sum += (t2 - t1) * 1e3
        st.copy_ms_sum += (t3 - t2) * 1e3

    def _composite(self, members: Members, task: str) -> tuple[str | None, CompiledAdapter]:
        """(task key, composed forms) of ``members`` for ``task``, from the composite cache."""
        entries = [self._cpu_entry(m, v) for m, v in members]
        tkey = task if any(e.task_conditioned for e in entries) else None
        key = (members, tkey)
        got = self._composites.get(key)
        if got is not None:
            self._composites.move_to_end(key)
            return tkey, got
        parts = []
        for (m, _), e in zip(members, entries):
            mkey = task if e.task_conditioned else None
            parts.append((m, e.compiled[mkey] if mkey in e.compiled else self._compile_into(e, mkey)))
        got = self._composites[key] = compose_members(parts, self.model)
        while len(self._composites) > self.cpu_capacity:
            self._composites.popitem(last=False)
        return tkey, got

    def _cpu_entry(self, adapter_id: str, version: int) -> _CpuEntry:
        """The parsed adapter from the CPU cache, read from the store on a miss (LRU)."""
        if is_generated(adapter_id):
            compiled = self._generated.get(adapter_id)
            if compiled is None:
                raise ApiError(503, "generated_adapter_evicted", "the adapter generated from this "
                               "context was evicted before it could run; retry",
                               {"Retry-After": "1"})
            self._generated.move_to_end(adapter_id)
            return _CpuEntry(None, {None: compiled})
        key = (adapter_id, version)
        entry = self._cpu.get(key)
        if entry is not None:
            self._cpu.move_to_end(key)
            self._stats.cpu_hits += 1
            return entry
        t0 = time.perf_counter()
        self._oldest[adapter_id] = min(version, self._oldest.get(adapter_id, version))
        entry = _CpuEntry(parse_stored(self.store.read(adapter_id, version), self.model), key=key)
        self._stats.store_reads += 1
        self._stats.read_ms_sum += (time.perf_counter() - t0) * 1e3
        self._cpu[key] = entry
        self._count(entry)
        return entry

    def _compile_into(self, entry: _CpuEntry, task: str | None) -> CompiledAdapter:
        """Compile ``entry`` for ``task`` (None: not task-conditioned) and keep it in the entry."""
        compiled = entry.compiled[task] = compile_on_cpu(entry.file, self.model, task)
        if self._cpu.get(entry.key) is entry:       # still cached
            self._count(entry)
        return compiled

    def _count(self, entry: _CpuEntry) -> None:
        """Re-count ``entry``'s bytes (it is in the CPU cache, most recently used) and drop the
        least recently used entries while the cache is over its budget."""
        nbytes = tensor_bytes(entry.file.params, list(entry.compiled.values()))
        self._cpu_bytes += nbytes - entry.nbytes
        entry.nbytes = nbytes
        while self._cpu_bytes > self.cpu_budget and len(self._cpu) > 1:
            self._cpu_bytes -= self._cpu.popitem(last=False)[1].nbytes
