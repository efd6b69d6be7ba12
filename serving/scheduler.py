"""Scheduler: continuous batching of mixed-adapter requests on one backbone replica (one thread).

Each iteration:

1. admit waiting jobs, FIFO, while decoder rows (``max_batch_rows``, a beam request takes
   ``num_beams``), the prefill token budget and adapter slots allow; a job blocked by a busy slot may
   be passed only by jobs that share a slot already in use (so idle slots drain towards it), and at
   most ``max_batch_rows`` times before admission turns strictly FIFO (no starvation);
2. prefill every admitted job together (one encoder pass, rows on different adapters and kinds),
   then append their rows to the running decode state (DecoderCache.concat / BatchMeta.concat);
3. one decode_step for every running row;
4. advance each job's searcher; finished jobs complete their futures at once and release their slot;
   a streaming job that goes on hears its tokens so far (``Job.on_tokens``); a job nobody waits
   for any more (``Job.gone``: its client left) stops, its row leaving after the next step;
5. one chunk of waiting contexts (Generative Adapter: ``ContextJob``): up to ``max_batch_rows``
   context items of one or more contexts in one teacher-forced backbone pass, their S summed into
   each context's; a context whose items are all in becomes its LoRA. One chunk per iteration, so
   turning a long context into an adapter never stalls the decode steps of running requests;
6. up to ``max_batch_rows`` waiting classify rows (CapS, ``ClassifyJob``): their CLS features from
   the shared vision tower and feature cache, one CLIP projection, and the logits of every row on
   its own cache head in one grouped pass (adapters.caps.grouped_logits, many heads, no loop).

A failure fails only the jobs it touched (a job's vision or adapter load: that job; a prefill: the
jobs admitted with it; a decode step: the running jobs) and the thread goes on.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from petserve.adapters.backbone.feature_cache import FeatureCache
from petserve.adapters.backbone.model import RowInput
from petserve.adapters.backbone.visual import VisualTokens
from petserve.adapters.generation import (
    DecodeState,
    GenerationRequest,
    GenerationResult,
    advance,
    decode_step,
    make_searcher,
    prefill,
)
from petserve.serving.errors import ApiError
from petserve.serving.metrics import Histogram
from petserve.serving.slot_pool import SlotPool

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One validated request inside the engine. ``encode_visual`` computes its visual tokens (keyed
    in the feature cache by ``visual_key``); ``n_tokens`` is its encoder length without prefixes."""

    adapter: str | None
    task: str
    ids: list[int]
    visual_key: str | None
    encode_visual: Callable[[], VisualTokens | None]
    n_tokens: int
    max_new_tokens: int
    num_beams: int
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    version: int | None = None           # the adapter's stored version, read once at submit
    zero_boxes: bool = False             # its adapter was trained with all-zero boxes
    choices: tuple[int, ...] = ()        # answered by the likeliest of these tokens (NLVR2)
    # streaming (greedy jobs only): called on the scheduler thread after every decode step that
    # leaves the job running, with the tokens generated so far; it must not block
    on_tokens: Callable[[list[int]], None] | None = None
    # set when nobody waits for the answer any more (the client left): a queued job is dropped,
    # a decoding one ends after its next step
    gone: threading.Event | None = None
    # set by the scheduler
    slot: int = -1
    searcher: object = None
    visual: VisualTokens | None = None
    bypassed: int = 0
    started: float = 0.0                 # end of its prefill: decoding starts
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def abandoned(self) -> bool:
        return self.gone is not None and self.gone.is_set()


@dataclass
class ContextItem:
    """One item of a context as the backbone sees it: prompt ids, its visual tokens (computed on
    the scheduler thread through the feature cache, like a Job's) and the teacher-forced target."""

    ids: list[int]
    visual_key: str | None
    encode_visual: Callable[[], VisualTokens | None]
    target: list[int]


@dataclass
class ContextJob:
    """A context to turn into a LoRA with the engine's generator; the future resolves to the
    LoRA's tensors (``lora.<site>.A`` / ``.B``)."""

    items: list[ContextItem]
    future: Future = field(default_factory=Future)
    started: bool = False
    done: int = 0                        # items already summed into S
    S: dict | None = None                # site -> (r, r)


@dataclass
class ClassifyJob:
    """One image to classify on a cache head (``load_head`` makes it, kept in the engine's head
    cache under ``head_key``); the future resolves to (head, its (C,) class probabilities)."""

    head_key: str
    load_head: Callable[[], object]
    visual_key: str
    encode_visual: Callable[[], VisualTokens]
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    timings_ms: dict[str, float] = field(default_factory=dict)


SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)    # rows, adapters or requests in one step


def _sizes() -> Histogram:
    return Histogram(SIZE_BUCKETS)


@dataclass
class StepCounters:
    """What the scheduler counts (guarded by ``lock``; the engine snapshots it)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    steps: int = 0
    prefills: int = 0
    prefills_joining: int = 0    # prefills merged into rows that were already decoding
    batch_rows: Histogram = field(default_factory=_sizes)
    adapters_per_step: Histogram = field(default_factory=_sizes)
    prefill_batch: Histogram = field(default_factory=_sizes)
    failed: dict[str, int] = field(default_factory=dict)          # error code -> jobs
    classify_rows: Histogram = field(default_factory=_sizes)      # classify rows per pass
    classify_heads: Histogram = field(default_factory=_sizes)     # distinct cache heads per pass


@dataclass
class Progress:
    """Whether the scheduler still gets work done (read by Engine.check_health from any thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # phase ("prefill" / "decode") -> times it failed since it last succeeded; per phase, so a
    # device that fails every decode step is caught even while prefills still succeed
    failures_in_a_row: dict[str, int] = field(default_factory=dict)
    last_error: str = ""
    # time.monotonic() at the start of the iteration running now; written by the scheduler thread
    # alone, read once by health checks (no lock needed)
    busy_since: float | None = None

    def succeeded(self, phase: str) -> None:
        with self.lock:
            self.failures_in_a_row[phase] = 0

    def failed(self, phase: str, err: Exception) -> None:
        with self.lock:
            self.failures_in_a_row[phase] = self.failures_in_a_row.get(phase, 0) + 1
            self.last_error = f"{type(err).__name__}: {err}"


class Scheduler:
    def __init__(self, model, pool: SlotPool, features: FeatureCache, max_batch_rows: int,
                 max_prefill_tokens: int, on_done: Callable[[Job, GenerationResult], None],
                 generator=None, towers=None, heads: FeatureCache | None = None):
        self.model, self.pool, self.features, self.generator = model, pool, features, generator
        self.towers, self.heads = towers, heads if heads is not None else FeatureCache(64)
        self.max_rows, self.max_tokens, self.on_done = max_batch_rows, max_prefill_tokens, on_done
        self.counters = StepCounters()
        self.progress = Progress()
        self._cv = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._stopping, self._thread = False, None
        # owned by the scheduler thread; the two ints are published for stats / queue limits
        self._pending: list[Job] = []
        self._running: list[Job] = []                 # in row order of _state
        self._contexts: deque[ContextJob] = deque()   # FIFO; the first may be part-way done
        self._classify: deque[ClassifyJob] = deque()
        self._state: DecodeState | None = None
        self.pending_count, self.running_rows = 0, 0

    # ---- any thread ----------------------------------------------------------------------
    def enqueue(self, job: Job | ContextJob | ClassifyJob, max_queue: int,
                retry_after_s: float) -> None:
        with self._cv:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the replica is shutting down; retry on another")
            if len(self._inbox) + self.pending_count + len(self._contexts) + \
                    len(self._classify) >= max_queue:
                raise ApiError.overloaded(retry_after_s, f"{max_queue} requests are already "
                                          "waiting on this replica; retry later")
            if isinstance(job, ContextJob):
                self._contexts.append(job)
            elif isinstance(job, ClassifyJob):
                self._classify.append(job)
            else:
                self._inbox.append(job)
            self._cv.notify()

    def health_problem(self, failures: int, stall_s: float) -> str | None:
        """Why this scheduler no longer makes progress, or None: its thread is not running, its
        last ``failures`` phases all failed (a broken device fails every one), or one iteration
        has run for more than ``stall_s`` seconds (a hung device)."""
        if self._thread is None or not self._thread.is_alive():
            return "the engine's scheduler thread is not running"
        p = self.progress
        with p.lock:
            for phase, count in p.failures_in_a_row.items():
                if count >= failures:
                    return f"the last {count} {phase} steps failed ({p.last_error})"
        since = p.busy_since                  # one read: the scheduler thread writes it
        if since is not None and time.monotonic() - since > stall_s:
            return f"one engine step has run for {time.monotonic() - since:.0f} s"
        return None

    def queue_length(self) -> int:
        return len(self._inbox) + self.pending_count

    def running_jobs(self) -> int:
        return len(self._running)

    def start(self) -> None:
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="petserve-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread; jobs still queued or running fail with 503 shutting_down."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        err = ApiError(503, "shutting_down", "the replica is shutting down; retry on another")
        with self._cv:
            jobs, self._pending = [*self._pending, *self._inbox, *self._running, *self._contexts,
                                   *self._classify], []
            self._inbox.clear()
            self._contexts.clear()
            self._classify.clear()
        self._running, self._state = [], None
        for job in jobs:
            self._fail(job, err)
        self.pending_count = self.running_rows = 0

    # ---- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait_for_work():
                self.progress.busy_since = time.monotonic()
                try:
                    self._iteration()
                except Exception:   # noqa: BLE001 - phases fail their own jobs; the thread must live
                    log.exception("scheduler iteration failed")
                self.progress.busy_since = None

    def _wait_for_work(self) -> bool:
        with self._cv:
            while not self._stopping and not (self._inbox or self._pending or self._running
                                              or self._contexts or self._classify):
                self._cv.wait()
            self._pending.extend(self._inbox)
            self._inbox.clear()
            self.pending_count = len(self._pending)
            return not self._stopping

    def _iteration(self) -> None:
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._state is not None:
            self._step()
        classified = bool(self._classify)
        if classified:
            self._classify_chunk()
        if self._contexts:
            self._context_chunk()
        elif not admitted and self._state is None and not classified:
            with self._cv:    # waiting jobs, none admissible (slots busy elsewhere): don't spin
                self._cv.wait(0.005)

    # ---- 1. admission --------------------------------------------------------------------
    def _admit(self) -> list[Job]:
        rows, tokens = self.max_rows - self.running_rows, self.max_tokens
        admitted, waiting = [], []
        with self.pool.batched_loads():
            self._admit_each(admitted, waiting, rows, tokens)
        self._pending = waiting
        self.pending_count = len(waiting)
        return admitted

    def _admit_each(self, admitted: list[Job], waiting: list[Job], rows: int, tokens: int) -> None:
        blocked, slot_wait = None, False       # first job left waiting; is some job waiting on a slot
        for job in self._pending:
            if job.abandoned:
                job.future.cancel()
            if job.future.cancelled():
                continue
            if blocked is not None and blocked.bypassed >= self.max_rows:
                waiting.append(job)                       # strict FIFO until it gets in
                continue
            fits = job.num_beams <= rows and job.n_tokens <= tokens
            status = self._take_slot(job, share_only=slot_wait) if fits else "busy"
            if status == "busy":
                waiting.append(job)
                blocked, slot_wait = blocked or job, slot_wait or fits
            elif status == "ok" and self._start(job):
                admitted.append(job)
                rows, tokens = rows - job.num_beams, tokens - job.n_tokens
                if blocked is not None:
                    blocked.bypassed += 1

    def _take_slot(self, job: Job, share_only: bool) -> str:
        """"ok" (slot referenced, or no adapter), "busy" (try later) or "failed" (future failed)."""
        if job.adapter is None:
            return "ok"
        try:
            slot = self.pool.acquire(job.adapter, job.version, job.task, share_only=share_only)
        except Exception as e:  # noqa: BLE001 - 404 deleted, unusable file, store trouble
            self._fail(job, e)
            return "failed"
        if slot is None:
            return "busy"
        job.slot = slot
        return "ok"

    def _start(self, job: Job) -> bool:
        """Mark the job running and get its visual tokens (feature cache). False: dropped."""
        if not job.future.set_running_or_notify_cancel():
            self._release(job)
            return False
        t0 = time.perf_counter()
        job.timings_ms["queue"] = (t0 - job.submitted) * 1e3
        try:
            job.visual = (job.encode_visual() if job.visual_key is None
                          else self.features.get_or_compute(job.visual_key, job.encode_visual))
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)
            return False
        job.timings_ms["vision"] = (time.perf_counter() - t0) * 1e3
        return True

    # ---- 2. prefill + merge --------------------------------------------------------------
    def _prefill(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        try:
            eos = self.model.cfg.lm.eos_id
            searchers = [make_searcher(j.num_beams, j.max_new_tokens, eos, j.choices) for j in jobs]
            gen = [GenerationRequest(RowInput(j.ids, j.visual, j.zero_boxes), j.slot, j.max_new_tokens,
                                     j.num_beams, j.choices) for j in jobs]
            state = prefill(self.model, self.pool.bank, gen, searchers)
            merged = state if self._state is None else DecodeState.concat([self._state, state])
        except Exception as e:  # noqa: BLE001
            log.exception("prefill of %d jobs failed", len(jobs))
            self.progress.failed("prefill", e)
            for j in jobs:
                self._fail(j, e)
            return
        self.progress.succeeded("prefill")
        now = time.perf_counter()
        for j, s in zip(jobs, searchers):
            j.searcher, j.visual, j.started = s, None, now
            j.timings_ms["prefill"] = (now - t0) * 1e3
        joining = self._state is not None
        self._state, self._running = merged, self._running + jobs
        self.running_rows = merged.tokens.shape[0]
        with self.counters.lock:
            self.counters.prefills += 1
            self.counters.prefills_joining += joining
            self.counters.prefill_batch.observe(len(jobs))

    # ---- 3 + 4. decode step and advance --------------------------------------------------
    def _step(self) -> None:
        rows, jobs = self.running_rows, self._running
        try:
            logprobs = decode_step(self.model, self._state)
            self._state = advance(self._state, [j.searcher for j in jobs], logprobs)
        except Exception as e:  # noqa: BLE001
            log.exception("decode step over %d rows failed", rows)
            self.progress.failed("decode", e)
            self._state, self._running, self.running_rows = None, [], 0
            for j in jobs:
                self._fail(j, e)
            return
        self.progress.succeeded("decode")
        self._running = [j for j in jobs if not j.searcher.done]
        self.running_rows = 0 if self._state is None else self._state.tokens.shape[0]
        with self.counters.lock:
            self.counters.steps += 1
            self.counters.batch_rows.observe(rows)
            self.counters.adapters_per_step.observe(len({j.slot for j in jobs if j.slot >= 0}))
        for j in jobs:
            if j.searcher.done:
                self._finish(j)
            elif j.abandoned:
                j.searcher.stop()             # its row leaves the batch after the next step
            elif j.on_tokens is not None:
                self._stream(j)

    # ---- 5. one chunk of contexts --------------------------------------------------------
    def _context_chunk(self) -> None:
        from petserve.adapters.generative import context_states
        with self._cv:
            jobs, part, room = [], [], self.max_rows
            for job in list(self._contexts):
                if room == 0:
                    break
                if not job.started:
                    if not job.future.set_running_or_notify_cancel():
                        self._contexts.remove(job)              # cancelled while waiting
                        continue
                    job.started = True
                take = job.items[job.done:job.done + room]
                jobs.append((job, len(take)))
                part += [(len(jobs) - 1, item) for item in take]
                room -= len(take)
        if not part:
            return
        try:
            rows = []
            for _, item in part:
                visual = (item.encode_visual() if item.visual_key is None
                          else self.features.get_or_compute(item.visual_key, item.encode_visual))
                rows.append(RowInput(item.ids, visual))
            states, masks = context_states(self.model, self.generator.sites, rows,
                                           [item.target for _, item in part])
            owner = torch.tensor([k for k, _ in part], device=self.model.device)
            S = self.generator.accumulate(None, states, masks, owner, len(jobs))
        except Exception as e:  # noqa: BLE001
            log.exception("context chunk of %d items failed", len(part))
            self.progress.failed("context", e)
            with self._cv:
                for job, _ in jobs:
                    self._contexts.remove(job)
            for job, _ in jobs:
                self._fail(job, e)
            return
        self.progress.succeeded("context")
        for k, (job, n) in enumerate(jobs):
            mine = {site: v[k:k + 1] for site, v in S.items()}
            job.S = mine if job.S is None else {site: job.S[site] + mine[site] for site in mine}
            job.done += n
            if job.done == len(job.items):
                with self._cv:
                    self._contexts.remove(job)
                try:
                    job.future.set_result(self.generator.lora_params(job.S, 0))
                except InvalidStateError:
                    pass

    # ---- 6. classify rows ----------------------------------------------------------------
    def _classify_chunk(self) -> None:
        from petserve.adapters.caps import CacheStack, grouped_logits
        with self._cv:
            jobs = [self._classify.popleft() for _ in range(min(self.max_rows, len(self._classify)))]
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            cls = torch.stack([self.features.get_or_compute(j.visual_key, j.encode_visual).feats[0]
                               for j in jobs])
            heads, slot_of, slots = [], {}, []
            for j in jobs:
                if j.head_key not in slot_of:
                    slot_of[j.head_key] = len(heads)
                    heads.append(self.heads.get_or_compute(j.head_key, j.load_head))
                slots.append(slot_of[j.head_key])
            t1 = time.perf_counter()
            f = self.towers.image_embeds(cls).float()
            logits = grouped_logits(f, CacheStack.of(heads), torch.tensor(slots))
            probs = torch.softmax(logits, -1).cpu()
        except Exception as e:  # noqa: BLE001
            log.exception("classify chunk of %d rows failed", len(jobs))
            self.progress.failed("classify", e)
            for j in jobs:
                self._fail(j, e)
            return
        self.progress.succeeded("classify")
        now = time.perf_counter()
        with self.counters.lock:
            self.counters.classify_rows.observe(len(jobs))
            self.counters.classify_heads.observe(len(heads))
        for row, (j, s) in enumerate(zip(jobs, slots)):
            j.timings_ms.update(queue=(t0 - j.submitted) * 1e3, vision=(t1 - t0) * 1e3,
                                classify=(now - t1) * 1e3, total=(now - j.submitted) * 1e3)
            try:
                j.future.set_result((heads[s], probs[row, :heads[s].num_classes]))
            except InvalidStateError:
                pass

    # ---- completion ----------------------------------------------------------------------
    @staticmethod
    def _stream(job: Job) -> None:
        try:
            job.on_tokens(job.searcher.tokens)
        except Exception:  # noqa: BLE001 - a listener gone wrong must not fail the batch
            log.exception("a stream listener failed; the job goes on without it")
            job.on_tokens = None

    def _finish(self, job: Job) -> None:
        self._release(job)
        now = time.perf_counter()
        job.timings_ms["decode"] = (now - job.started) * 1e3
        job.timings_ms["total"] = (now - job.submitted) * 1e3
        try:
            self.on_done(job, job.searcher.result())
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)

    def _release(self, job: Job) -> None:
        if job.slot >= 0:
            self.pool.release(job.slot)
            job.slot = -1

    def _fail(self, job: Job | ContextJob | ClassifyJob, err: Exception) -> None:
        """Fail one job or context with a clear ApiError (client errors keep theirs; the rest
        become 500)."""
        if isinstance(job, Job):
            self._release(job)
        if not isinstance(err, ApiError):
            err = ApiError(500, "inference_failed", f"inference failed: {type(err).__name__}: {err}")
        with self.counters.lock:
            self.counters.failed[err.code] = self.counters.failed.get(err.code, 0) + 1
        try:
            job.future.set_exception(err)
        except InvalidStateError:
            pass                       # cancelled meanwhile
