"""AudioEngine: the audio family's frozen AST serving many PETL-for-AST adapters in mixed batches.

A request is decoded and turned into its filterbank on the caller's thread (a worker thread off
the event loop), then queued. One scheduler thread takes up to ``max_batch_rows`` requests at a
time, makes their adapters resident in the shared slot pool (serving/slot_pool.py, the same pool
the VL engine uses), runs ONE encoder pass with every row's adapter (any kinds, any heads:
``AudioModel.classify``) and answers each row with its head's softmax. There is no decode loop,
so a batch is simply the requests waiting (one forward per batch, no continuous batching needed).
``classify_alone`` is the oracle: the request alone in a private one-slot bank.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.serving.engine_io import ClassifyResult
from petserve.serving.errors import ApiError
from petserve.serving.metrics import Histogram
from petserve.serving.scheduler import SIZE_BUCKETS
from petserve.serving.server_config import EngineConfig
from petserve.serving.slot_pool import SlotPool, compile_on_cpu, parse_stored
from petserve.serving.store import AdapterStore

log = logging.getLogger(__name__)
AUDIO_TASK = "audio_classify"


@dataclass
class AudioRequest:
    adapter: str
    audio: bytes                 # an encoded file (wav, flac, ogg)
    top_k: int = 5


@dataclass
class _Job:
    adapter: str
    version: int
    labels: tuple[str, ...]      # the adapter's head's classes
    fbank: torch.Tensor          # (frames, mel)
    top_k: int
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1


class AudioEngine:
    def __init__(self, model, store: AdapterStore, config: EngineConfig | None = None,
                 max_audio_seconds: float = 30.0):
        from petserve.adapters.data.audio import Featurizer
        self.model, self.store = model, store
        self.config = config = config or EngineConfig()
        self.max_audio_seconds = max_audio_seconds
        self.featurize = Featurizer(model.cfg)
        self.pool = SlotPool.from_config(model, store, config)
        self.rows, self.adapters_per_batch = Histogram(SIZE_BUCKETS), Histogram(SIZE_BUCKETS)
        self.requests: dict[str, dict[str, float]] = {}     # adapter -> count, latency_ms_sum
        self.failed: dict[str, int] = {}                     # error code -> count
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._stopping, self._thread = False, None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="petserve-audio", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cv:
            jobs = list(self._queue)
            self._queue.clear()
        for job in jobs:
            self._fail(job, ApiError(503, "shutting_down", "the replica is shutting down"))

    def health_problem(self) -> str | None:
        if self._thread is None or not self._thread.is_alive():
            return "the audio engine's thread is not running"
        return None

    # ---- requests ------------------------------------------------------------------------
    def submit(self, req: AudioRequest) -> Future:
        """Check the adapter (404 unknown, 422 not an audio adapter), decode the audio (4xx from
        adapters.data.audio), queue the job (503 when the queue is full)."""
        version, labels = self._check_adapter(req.adapter)
        job = _Job(req.adapter, version, labels, self._fbank(req.audio), req.top_k)
        with self._cv:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the replica is shutting down; retry on another")
            if len(self._queue) >= self.config.max_queue:
                raise ApiError.overloaded(1.0, f"{self.config.max_queue} audio requests are already "
                                          "waiting on this replica; retry later")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    async def classify(self, req: AudioRequest) -> ClassifyResult:
        future = await asyncio.to_thread(self.submit, req)
        return await asyncio.wrap_future(future)

    def classify_alone(self, req: AudioRequest) -> ClassifyResult:
        """The oracle: ``req`` alone, its adapter compiled afresh into a private one-slot bank."""
        version, _ = self._check_adapter(req.adapter)
        af = parse_stored(self.store.read(req.adapter, version), self.model)
        bank = SlotBank(self.model, 1)
        bank.set(0, compile_on_cpu(af, self.model, AUDIO_TASK))
        with torch.inference_mode():
            logits = self.model.classify(self._fbank(req.audio)[None],
                                         StepContext(bank, BatchMeta.build([0], 1, self.model.device)))
        labels = af.config.labels
        probs = torch.softmax(logits[0, :len(labels)].float(), -1).cpu()
        return _result(req.adapter, version, labels, probs, req.top_k, {})

    def _fbank(self, audio: bytes) -> torch.Tensor:
        from petserve.adapters.data.audio import AudioError
        try:
            return self.featurize.from_bytes(audio, self.max_audio_seconds)
        except AudioError as e:
            raise ApiError(e.status, e.code, e.message) from None

    def _check_adapter(self, adapter_id: str) -> tuple[int, tuple[str, ...]]:
        """(latest version, head labels) of an audio adapter; 404 unknown, 422 another kind."""
        stored = self.store.get(adapter_id)
        if stored.meta.get("task") != AUDIO_TASK:
            raise ApiError.unprocessable("not_an_audio_adapter", f"adapter {adapter_id!r} is a "
                                         f"{stored.meta.get('kind')} adapter for "
                                         f"{stored.meta.get('task')}; /v1/audio/classify takes an "
                                         "audio adapter (petserve train --family audio)")
        labels = tuple(stored.meta.get("config", {}).get("labels", ()))
        if not labels:
            raise ApiError.unprocessable("no_head", f"audio adapter {adapter_id!r} has no "
                                         "classification head (its config lists no labels)")
        return stored.version, labels

    def stats(self) -> dict:
        """The VL engine's stats keys (serving.metrics exports both alike, by replica)."""
        with self._lock:
            return {"requests": {a: dict(v) for a, v in self.requests.items()},
                    "failed": dict(self.failed), "queue_length": len(self._queue),
                    "batch_rows": self.rows.snapshot(),
                    "adapters_per_step": self.adapters_per_batch.snapshot(),
                    "slot_pool": self.pool.counters()}

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._queue:
                        self._cv.wait()
                    if self._stopping:
                        return
                    jobs = [self._queue.popleft()
                            for _ in range(min(self.config.max_batch_rows, len(self._queue)))]
                try:
                    # a job put back to wait for a slot is running already
                    self._batch([j for j in jobs
                                 if j.future.running() or j.future.set_running_or_notify_cancel()])
                except Exception:  # noqa: BLE001 - a batch fails its own jobs; the thread lives
                    log.exception("audio batch failed")

    def _batch(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        t0 = time.perf_counter()
        ready, waiting = [], []
        for j in jobs:
            try:
                j.slot = self.pool.acquire(j.adapter, j.version, AUDIO_TASK)
            except ApiError as e:
                self._fail(j, e)
                continue
            (ready if j.slot is not None else waiting).append(j)
        if waiting:                      # every slot is held by this batch's other adapters
            with self._cv:
                self._queue.extendleft(reversed(waiting))
        if not ready:
            return
        try:
            slots = [j.slot for j in ready]
            meta = BatchMeta.build(slots, self.pool.num_slots, self.model.device)
            fbank = torch.stack([j.fbank for j in ready]).to(self.model.device)
            t1 = time.perf_counter()
            logits = self.model.classify(fbank, StepContext(self.pool.bank, meta)).float().cpu()
            classes = [self.pool.bank.head().classes_host[s] for s in slots]
        except Exception as e:  # noqa: BLE001
            log.exception("audio batch of %d rows failed", len(ready))
            for j in ready:
                self._fail(j, e)
            return
        finally:
            for j in ready:
                self.pool.release(j.slot)
        now = time.perf_counter()
        with self._lock:
            self.rows.observe(len(ready))
            self.adapters_per_batch.observe(len(set(slots)))
            for j in ready:
                entry = self.requests.setdefault(j.adapter, {"count": 0, "latency_ms_sum": 0.0})
                entry["count"] += 1
                entry["latency_ms_sum"] += (now - j.submitted) * 1e3
        for row, j in enumerate(ready):
            probs = torch.softmax(logits[row, :classes[row]], -1)
            timings = {"queue": (t0 - j.submitted) * 1e3, "classify": (now - t1) * 1e3,
                       "total": (now - j.submitted) * 1e3}
            try:
                j.future.set_result(_result(j.adapter, j.version, j.labels, probs, j.top_k, timings))
            except InvalidStateError:
                pass

    def _fail(self, job: _Job, err: Exception) -> None:
        if not isinstance(err, ApiError):
            err = ApiError(500, "inference_failed", f"inference failed: {type(err).__name__}: {err}")
        with self._lock:
            self.failed[err.code] = self.failed.get(err.code, 0) + 1
        try:
            job.future.set_exception(err)
        except InvalidStateError:
            pass


def _result(adapter: str, version: int, labels, probs: torch.Tensor, top_k: int,
            timings: dict) -> ClassifyResult:
    k = min(top_k, probs.shape[0])
    p, idx = probs.topk(k)
    scores = [(labels[i], float(v)) for v, i in zip(p.tolist(), idx.tolist())]
    return ClassifyResult(scores[0][0], scores, adapter, version, timings)
