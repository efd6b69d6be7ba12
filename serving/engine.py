"""Engine: one frozen backbone on one device serving many adapters, with continuous batching.

Requests arrive as admission built them (serving/schemas.py ``build_inference_request`` checked
every field against this engine's EngineConfig and the backbone); the engine trusts them. ``submit``
reads the adapter's stored version (the one store read of a request), tokenizes the prompt and
hashes the visual content on the caller's thread (``generate`` runs it in a worker thread, off the
event loop), then queues a Job for the scheduler thread (serving/scheduler.py), which mixes every
adapter and kind in one batch. ``run_alone`` is the oracle: the same request alone
with its adapter in a private one-slot SlotBank; a result from ``submit`` must equal it (tokens
exactly, log-probability within float noise).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import replace

import torch

from petserve.adapters.backbone.feature_cache import (
    FeatureCache,
    encode_visual,
    features_key,
    frames_key,
    images_key,
)
from petserve.adapters.backbone.model import DEFAULT_INPUTS, RowInput
from petserve.adapters.backbone.visual import grid_side, pool_grid
from petserve.adapters.generation import GenerationRequest, GenerationResult, generate
from petserve.adapters.kinds.lora import LoRA
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.tasks import InputFormat, get_task
from petserve.serving.engine_io import (
    ClassifyRequest,
    ClassifyResult,
    ContextInput,
    InferenceRequest,
    InferenceResult,
)
from petserve.serving.errors import ApiError
from petserve.serving.metrics import BACKBONE_LABEL, COMPOSITE_LABEL, CONTEXT_LABEL
from petserve.serving.scheduler import (
    ClassifyJob,
    ContextItem,
    ContextJob,
    Job,
    Scheduler,
)
from petserve.serving.server_config import EngineConfig
from petserve.serving.slot_pool import (
    GENERATED_PREFIX,
    SlotPool,
    compile_on_cpu,
    compose_members,
    is_generated,
    parse_stored,
)
from petserve.serving.store import AdapterStore

INPUT_FORMATS_KEPT = 4096      # parsed input formats kept (all dropped when full)
CACHE_HEADS_KEPT = 256         # cache heads (CapS adapters, zero-shot label sets) kept, LRU
CACHE_KIND = "cache"


def _copy_outcome(src: Future, dst: Future, digest: str, generate_ms: float) -> None:
    """A request on a generated adapter finished: its result, naming the context instead, with
    the time its adapter took to generate (0 when the pool had it) in its timings."""
    if src.cancelled() or dst.done():       # its caller left (Engine.generate's ``gone``)
        dst.cancel()
        return
    if src.exception() is not None:
        dst.set_exception(src.exception())
        return
    r = src.result()
    r.adapter, r.adapter_version, r.context_sha256 = None, None, digest
    r.timings_ms["generate"] = generate_ms
    r.timings_ms["total"] = r.timings_ms.get("total", 0.0) + generate_ms
    dst.set_result(r)


class TextDeltas:
    """A streaming job's listener (scheduler.Job.on_tokens): the tokens so far, decoded, less the
    text already sent. Text that does not extend what was sent (a tokenizer may rewrite the end
    of a word as it grows) waits until it does; the final answer brings any rest."""

    def __init__(self, decode: Callable[[list[int]], str], send: Callable[[str], None]) -> None:
        self.decode, self.send, self.sent = decode, send, ""

    def __call__(self, tokens: list[int]) -> None:
        text = self.decode(tokens)
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.send(text[len(self.sent):])
            self.sent = text


class Engine:
    def __init__(self, model, store: AdapterStore, config: EngineConfig | None = None,
                 generator=None, generator_name: str = "", towers=None):
        self.model, self.store = model, store
        self.generator, self.generator_name = generator, generator_name
        self.towers = towers             # CLIP's text side (adapters.clip_towers): /v1/classify
        self.clip_identity = None
        if towers is not None:
            from petserve.adapters.cache_file import towers_identity
            self.clip_identity = towers_identity(towers)
        self.heads = FeatureCache(CACHE_HEADS_KEPT)
        self.config = config = config or EngineConfig()
        self.pool = SlotPool.from_config(model, store, config)
        self.features = FeatureCache(config.feature_cache_items)
        self.scheduler = Scheduler(model, self.pool, self.features, config.max_batch_rows,
                                   config.max_prefill_tokens, self._complete, generator, towers,
                                   self.heads)
        self._lock = threading.Lock()
        self._per_adapter: dict[str, dict[str, float]] = {}
        self._inputs: dict[tuple[str, int], InputFormat] = {}     # see _input_format
        self._generating: dict[str, Future] = {}      # generated id -> its ContextJob's future
        self._latency_ema_s = 1.0

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def prefetch(self, adapter_id: str) -> int:
        """Warm the CPU cache with the latest version of ``adapter_id`` and return that version
        (Ray Serve's multiplexed loader, serving/deployments.py). Holds nothing: no slot taken,
        no reference kept, the pool's LRU may drop it again. Raises ApiError (400 bad id, 404
        unknown)."""
        version = self.store.get(adapter_id).version
        self.pool.prefetch(adapter_id, version)
        return version

    # ---- requests ------------------------------------------------------------------------
    def submit(self, req: InferenceRequest, on_text: Callable[[str], None] | None = None,
               gone: threading.Event | None = None) -> Future:
        """Queue ``req``; the future resolves to an InferenceResult (or an ApiError). Raises
        ApiError now for an unknown adapter (404), a task the adapter lacks (422), too many encoder
        tokens (413) or a full queue (503). A request with an inline ``context`` first has its
        adapter generated (once per distinct context while the pool keeps it). ``on_text``
        (greedy requests): called on the scheduler thread after each decode step that adds text,
        with that text. ``gone``, once set, ends the job: dropped if still queued, else stopped
        after its next decode step (scheduler.Job.gone)."""
        if req.context is not None:
            return self._submit_with_context(req, on_text, gone)
        job = self._job(req, on_text, gone)
        self.scheduler.enqueue(job, self.config.max_queue, self._retry_after_s())
        return job.future

    async def stream(self, req: InferenceRequest) -> AsyncIterator[str | InferenceResult]:
        """``submit`` with the text of every decode step as it comes (greedy requests; a beam
        search has no text before it ends), then the InferenceResult. Raises ApiError where
        ``generate`` would: before the first item for what ``submit`` refuses."""
        loop, events, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def send(item) -> None:
            if not gone.is_set():     # once the reader left, its loop may be gone too
                loop.call_soon_threadsafe(events.put_nowait, item)
        try:
            future = await asyncio.to_thread(self.submit, req, send, gone)
            future.add_done_callback(send)
            while not isinstance(item := await events.get(), Future):
                yield item
        finally:
            gone.set()                # read to its end, or its reader left (the generator closed)
        yield item.result()

    def _submit_with_context(self, req: InferenceRequest, on_text, gone) -> Future:
        """Generate the context's adapter (or find it in the pool, keyed by the context's hash),
        then queue the request on it; the result names the context, not an adapter."""
        items, digest = self._context_items(req.context)
        key = GENERATED_PREFIX + digest
        on_key = replace(req, adapter=key, context=None)
        done: Future = Future()
        t0 = time.perf_counter()

        def queue_request(generate_ms: float) -> None:
            try:
                job = self._job(on_key, on_text, gone)
                self.scheduler.enqueue(job, self.config.max_queue, self._retry_after_s())
            except ApiError as e:
                done.set_exception(e)
                return
            job.future.add_done_callback(lambda f: _copy_outcome(f, done, digest, generate_ms))

        def generated(f: Future) -> None:
            with self._lock:
                self._generating.pop(key, None)
            if f.exception() is not None:
                done.set_exception(f.exception())
                return
            if not self.pool.has_generated(key):     # once, for every request that waited on it
                self.pool.put_generated(key, LoRA.compile(self.generator.cfg.lora_config(),
                                                          f.result(), self.model, "vqa"))
            queue_request((time.perf_counter() - t0) * 1e3)

        if self.pool.has_generated(key):
            queue_request(0.0)
            return done
        with self._lock:
            pending = self._generating.get(key)
        if pending is None:
            future = self._enqueue_context(items)
            with self._lock:
                pending = self._generating.setdefault(key, future)
        pending.add_done_callback(generated)
        return done

    async def generate(self, req: InferenceRequest) -> InferenceResult:
        """``submit`` in a worker thread (tokenizing and hashing stay off the event loop). A
        caller that stops waiting (cancelled: its client left, or Ray Serve cancelled the call)
        ends the job instead of leaving it to decode for nobody."""
        gone = threading.Event()
        try:
            return await asyncio.wrap_future(await asyncio.to_thread(self.submit, req, None, gone))
        finally:
            gone.set()

    def run_alone(self, req: InferenceRequest) -> InferenceResult:
        """``req`` alone, bypassing the scheduler and caches: its adapter (latest version) read
        from the store into a private one-slot SlotBank, then adapters.generation.generate."""
        t0 = time.perf_counter()
        job = self._job(req)
        bank, slot, version = SlotBank(self.model, 1), -1, job.version
        if req.adapter is not None:
            bank.set(0, self._compile_alone(req.adapter, version, req.task))
            slot = 0
        with torch.inference_mode():
            row = RowInput(job.ids, job.encode_visual(), job.zero_boxes)
            out = generate(self.model, bank, [GenerationRequest(row, slot, job.max_new_tokens,
                                                                job.num_beams, job.choices)])[0]
        total = (time.perf_counter() - t0) * 1e3
        return InferenceResult(out.text, out.logprob, req.adapter, version,
                               {"queue": 0.0, "vision": 0.0, "total": total}, out.tokens)

    def _compile_alone(self, adapter, version, task: str):
        """The adapter's (or composite's) forms read and compiled afresh, bypassing every cache."""
        ids, versions = (adapter, version) if isinstance(adapter, tuple) else ((adapter,), (version,))
        parts = []
        for i, v in zip(ids, versions):
            af = parse_stored(self.store.read(i, v), self.model)
            parts.append((i, compile_on_cpu(af, self.model, task if af.task_conditioned else None)))
        return parts[0][1] if len(parts) == 1 else compose_members(parts, self.model)

    def _complete(self, job: Job, out: GenerationResult) -> None:
        """Scheduler callback: a job's searcher finished."""
        result = InferenceResult(self.model.decode_text(out.tokens), out.logprob, job.adapter,
                                 job.version, dict(job.timings_ms), out.tokens,
                                 prompt_tokens=job.n_tokens,
                                 finish_reason="length" if len(out.tokens) >= job.max_new_tokens
                                 else "stop")
        label = COMPOSITE_LABEL if isinstance(job.adapter, tuple) else \
            CONTEXT_LABEL if is_generated(job.adapter) else job.adapter or BACKBONE_LABEL
        self._count(label, job.timings_ms["total"])
        job.future.set_result(result)

    def _count(self, label: str, total_ms: float) -> None:
        with self._lock:
            entry = self._per_adapter.setdefault(label, {"count": 0, "latency_ms_sum": 0.0})
            entry["count"] += 1
            entry["latency_ms_sum"] += total_ms
            self._latency_ema_s = 0.9 * self._latency_ema_s + 0.1 * total_ms / 1e3

    def _retry_after_s(self) -> float:
        """Roughly when a queue slot frees: one request latency per batch of queued requests."""
        batches = math.ceil(max(1, self.scheduler.queue_length()) / self.config.max_batch_rows)
        return max(1.0, self._latency_ema_s * batches)

    # ---- classification (CapS cache adapters, CLIP zero-shot) -----------------------------
    def submit_classify(self, req: ClassifyRequest) -> Future:
        """Queue an image to classify on a cache adapter or zero-shot over ``req.labels``; the
        future resolves to a ClassifyResult. ApiError now: 422 without CLIP towers or for an
        adapter that is no cache, 400 / 404 for a bad / unknown id, 503 for a full queue."""
        job, version = self._classify_job(req)
        self.scheduler.enqueue(job, self.config.max_queue, self._retry_after_s())
        done: Future = Future()

        def finished(f: Future) -> None:
            if f.exception() is not None:
                done.set_exception(f.exception())
                return
            head, probs = f.result()
            self._count(req.adapter or BACKBONE_LABEL, job.timings_ms["total"])
            done.set_result(self._classify_result(req, version, head, probs, job.timings_ms))
        job.future.add_done_callback(finished)
        return done

    async def classify(self, req: ClassifyRequest) -> ClassifyResult:
        return await asyncio.wrap_future(await asyncio.to_thread(self.submit_classify, req))

    def classify_alone(self, req: ClassifyRequest) -> ClassifyResult:
        """The oracle: ``req`` alone, its head read afresh, bypassing the scheduler and caches,
        scored with adapters.caps.logits (no grouping)."""
        from petserve.adapters.caps import logits
        job, version = self._classify_job(req)
        with torch.inference_mode():
            head = job.load_head()
            f = self.towers.image_embeds(job.encode_visual().feats[:1]).float()
            probs = torch.softmax(logits(f, head), -1)[0]
        return self._classify_result(req, version, head, probs, {})

    def _classify_job(self, req: ClassifyRequest) -> tuple[ClassifyJob, int | None]:
        if self.towers is None:
            raise ApiError.unprocessable("no_clip", "this server has no CLIP text side to "
                                         "classify with (start it with --clip FILE_OR_DIR)")
        model, towers, image = self.model, self.towers, req.image
        if req.adapter is not None:
            stored = self.store.get(req.adapter)
            if stored.meta.get("kind") != CACHE_KIND:
                raise ApiError.unprocessable("not_a_cache", f"adapter {req.adapter!r} is a "
                                             f"{stored.meta.get('kind')} adapter; /v1/classify "
                                             "takes a cache adapter (petserve build-cache)")
            adapter_id, version = req.adapter, stored.version
            key = f"cache:{adapter_id}:{version}"

            def load_head():
                from petserve.adapters.cache_file import CacheFileError, load_cache
                try:
                    return load_cache(self.store.read(adapter_id, version), self.clip_identity,
                                      towers.cfg.projection_dim)[0]
                except CacheFileError as e:
                    raise ApiError.unprocessable(e.code, str(e)) from None
        else:
            labels, version = list(req.labels), None
            key = "labels:" + hashlib.sha256(json.dumps(labels).encode()).hexdigest()

            def load_head():
                from petserve.adapters.caps import CacheHead
                from petserve.adapters.caps_build import class_embeddings
                empty = torch.zeros(0, towers.cfg.projection_dim)
                return CacheHead(labels, class_embeddings(towers, labels, ("{}",)).float(),
                                 empty, empty, torch.zeros(0, dtype=torch.int64), alpha=0.0)

        def visual():
            return encode_visual(model, [image], None, None, None)
        return ClassifyJob(key, load_head, images_key([image]), visual), version

    def _classify_result(self, req: ClassifyRequest, version, head, probs, timings) -> ClassifyResult:
        top = torch.topk(probs, min(req.top_k, head.num_classes))
        scores = [(head.labels[i], float(p)) for p, i in zip(top.values.tolist(),
                                                             top.indices.tolist())]
        return ClassifyResult(scores[0][0], scores, req.adapter, version, dict(timings))

    # ---- contexts -> adapters (Generative Adapter) ----------------------------------------
    def submit_context(self, context: list[ContextInput]) -> tuple[Future, str]:
        """Queue a context for the generator: (future of the LoRA's tensors, the context's sha256).
        ApiError as ``_context_items``, 503 when the queue is full."""
        items, digest = self._context_items(context)
        return self._enqueue_context(items), digest

    def _enqueue_context(self, items: list[ContextItem]) -> Future:
        job = ContextJob(items)
        self.scheduler.enqueue(job, self.config.max_queue, self._retry_after_s())
        return job.future

    def _context_items(self, context: list[ContextInput]) -> tuple[list[ContextItem], str]:
        """The items as the backbone reads them and the context's sha256 (ApiError 422 without
        a generator, 413 for too many items or an item over the encoder limit)."""
        from petserve.adapters.generative import context_hash
        if self.generator is None:
            raise ApiError.unprocessable("no_generator", "this server has no generator for its "
                                         "backbone (start it with --generator FILE, made by "
                                         "`petserve train-generator`)")
        if len(context) > self.config.max_context_items:
            raise ApiError.payload_too_large(
                f"the context has {len(context)} items, over this replica's limit of "
                f"{self.config.max_context_items} (max_context_items)", code="context_too_long")
        items = [self._context_item(i, c) for i, c in enumerate(context)]
        return items, context_hash([(it.ids, it.visual_key, it.target) for it in items])

    def _context_item(self, i: int, c: ContextInput) -> ContextItem:
        model = self.model
        if c.text is not None:          # plain text: read and reconstructed (the text task)
            ids, target, key, visual = model.row_input("text", c.text, None).ids, \
                model.target_ids(c.text), None, (lambda: None)
        else:
            images = [c.image]
            ids, target = model.row_input("vqa", c.question, None).ids, model.target_ids(c.answer)
            key = images_key(images)

            def visual():
                return encode_visual(model, images, None, None, None)
        n = len(ids) + (0 if key is None else model.vision.boxes.shape[0])
        if n > self.config.max_prefill_tokens or len(target) > self.config.max_prefill_tokens:
            raise ApiError.payload_too_large(f"context[{i}] has {max(n, len(target))} tokens, "
                                             f"over this replica's limit of "
                                             f"{self.config.max_prefill_tokens}",
                                             code="input_too_long")
        return ContextItem(ids, key, visual, target)

    async def generated_adapter(self, context: list[ContextInput], name: str = "") -> bytes:
        """The ``lora`` adapter file the generator makes of ``context`` (metadata: the generator
        and the context's hash)."""
        from petserve.adapters.generative import lora_file_bytes
        future, digest = await asyncio.to_thread(self.submit_context, context)
        params = await asyncio.wrap_future(future)
        return await asyncio.to_thread(lora_file_bytes, self.generator, params, self.model, "vqa",
                                       self.generator_name, digest, name)

    # ---- request -> job ------------------------------------------------------------------
    def _job(self, req: InferenceRequest, on_text: Callable[[str], None] | None = None,
             gone: threading.Event | None = None) -> Job:
        """A Job: the adapter's latest stored version, the prompt tokenized, the visual content
        hashed. ``req`` is trusted (admission built it); what only the engine knows is checked."""
        version, inputs = None, DEFAULT_INPUTS
        if isinstance(req.adapter, tuple):
            version, inputs = self._composite_versions(req.adapter, req.task)
        elif is_generated(req.adapter):
            version = 0                  # generated from an inline context, held by the pool
        elif req.adapter is not None:
            version, inputs = self._adapter_version(req.adapter, req.task)
        key, n_visual = self._visual_key(req)
        side = inputs.feature_grid
        pool = req.features is not None and side is not None and n_visual > side * side \
            and grid_side(n_visual) is not None
        if pool:                         # the adapter was trained on features pooled to a grid
            key, n_visual = f"{key}:grid{side}", side * side
        ids = self._prompt_ids(req, inputs)
        n_tokens = len(ids) + n_visual
        if n_tokens > self.config.max_prefill_tokens:
            raise ApiError.payload_too_large(f"the request has {n_tokens} encoder tokens, over this "
                                             f"replica's limit of {self.config.max_prefill_tokens}",
                                             code="input_too_long")
        max_new = req.max_new_tokens or min(get_task(req.task).default_new_tokens,
                                            self.config.max_new_tokens_cap)
        model, images, frames, feats, boxes = self.model, req.images, req.frames, req.features, req.boxes
        if pool:
            def visual():
                return pool_grid(encode_visual(model, images, frames, feats, boxes), side)
        else:
            def visual():
                return encode_visual(model, images, frames, feats, boxes)
        job = Job(req.adapter, req.task, ids, key, visual,
                  n_tokens, max_new, req.num_beams, version=version,
                  zero_boxes=inputs.boxes == "zero", choices=self.model.choice_ids(req.task),
                  gone=gone)
        if on_text is not None and job.num_beams == 1 and not job.choices:
            job.on_tokens = TextDeltas(self.model.decode_text, on_text)
        return job

    def _prompt_ids(self, req: InferenceRequest, inputs: InputFormat) -> list[int]:
        try:
            return self.model.row_input(req.task, req.text, None, inputs).ids
        except ValueError as e:          # the adapter records no prompt for this task
            raise ApiError.unprocessable("task_not_supported", str(e)) from None

    def _adapter_version(self, adapter_id: str, task: str) -> tuple[int, InputFormat]:
        """The latest version and the input format it records (400 invalid id, 404 unknown or
        deleted); 422 when a task-conditioned adapter (as recorded in the store's metadata) has
        no entry for ``task``."""
        stored = self.store.get(adapter_id)
        if stored.meta.get("kind") == CACHE_KIND:
            raise ApiError.unprocessable("task_not_supported", f"adapter {adapter_id!r} is a "
                                         "cache classifier; send it to /v1/classify")
        # None: stored before uploads recorded it; the pool then parses the file to find out
        if stored.meta.get("task_conditioned", True):
            self.pool.check_task(adapter_id, stored.version, task)
        return stored.version, self._input_format(adapter_id, stored)

    def _input_format(self, adapter_id: str, stored) -> InputFormat:
        """The stored version's input format, parsed once per (id, version); an adapter stored
        before uploads recorded it was made with the defaults."""
        key = (adapter_id, stored.version)
        with self._lock:
            got = self._inputs.get(key)
        if got is None:
            got = InputFormat.model_validate(stored.meta.get("inputs", {}))
            with self._lock:
                if len(self._inputs) >= INPUT_FORMATS_KEPT:
                    self._inputs.clear()
                self._inputs[key] = got
        return got

    def _composite_versions(self, ids: tuple[str, ...], task: str) -> tuple[tuple[int, ...], InputFormat]:
        """Each member's latest version (one store read each) and the input format they share;
        422 when their inputs differ or their forms do not compose (composed now, on the CPU)."""
        got = [self._adapter_version(i, task) for i in ids]
        formats = {g[1].model_dump_json(): g[1] for g in got}
        if len(formats) > 1:
            raise ApiError.unprocessable("adapters_do_not_compose", "the adapters were trained on "
                                         "differently built inputs (boxes, prompts): "
                                         + "; ".join(f"{i}: {g[1]}" for i, g in zip(ids, got)))
        versions = tuple(g[0] for g in got)
        self.pool.check_composite(tuple(zip(ids, versions)), task)
        return versions, got[0][1]

    def _visual_key(self, req: InferenceRequest) -> tuple[str | None, int]:
        """(feature-cache key, number of visual tokens)."""
        if req.features is not None:
            return features_key(req.features, req.boxes), req.features.shape[0]
        if req.frames is not None:
            return frames_key(req.frames), req.frames.shape[0]
        if req.images:
            return images_key(req.images), len(req.images) * self.model.vision.boxes.shape[0]
        return None, 0

    def check_health(self) -> None:
        """Raise RuntimeError naming the problem when this engine no longer makes progress (see
        ``Scheduler.health_problem``: thread not running, ``unhealthy_after_failures`` failed
        phases in a row, an iteration longer than ``stall_timeout_s``). Ray Serve calls it through
        the replica's ``check_health`` and replaces the replica; ``/healthz`` answers 503."""
        problem = self.scheduler.health_problem(self.config.unhealthy_after_failures,
                                                self.config.stall_timeout_s)
        if problem is not None:
            raise RuntimeError(problem)

    # ---- metrics -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters for Prometheus (a snapshot; counters only grow):

        - ``queue_length``, ``running_rows``, ``running_requests``: gauges now;
        - ``requests``: {adapter id or "_backbone": {"count", "latency_ms_sum"}} of completed requests
          (every id ever served here; /metrics labels only the most active: serving.metrics);
        - ``failed``: {error code: requests failed after they were queued};
        - ``steps_total``, ``prefills_total``: decoder steps and prefill passes run;
          ``prefills_joining_total``: prefills whose rows joined rows already decoding;
        - ``batch_rows``: histogram of decoder rows per step; ``adapters_per_step``: of distinct
          adapters (slots) per step; ``prefill_batch_size``: of requests per prefill. Each histogram is
          {"buckets": {le: cumulative count, ..., "+Inf": n}, "sum", "count"};
        - ``slot_pool``: hits, misses, evictions, busy, cpu_hits, store_reads, load_count,
          load_ms_sum, load_ms_last, read_ms_sum, compile_ms_sum, copy_ms_sum, resident,
          slots, referenced, cpu_cached;
        - ``feature_cache``: hits, misses, items, capacity.
        """
        c = self.scheduler.counters
        with c.lock:
            steps = {"steps_total": c.steps, "prefills_total": c.prefills,
                     "prefills_joining_total": c.prefills_joining, "failed": dict(c.failed),
                     "batch_rows": c.batch_rows.snapshot(),
                     "adapters_per_step": c.adapters_per_step.snapshot(),
                     "prefill_batch_size": c.prefill_batch.snapshot(),
                     "classify_rows": c.classify_rows.snapshot(),
                     "classify_heads": c.classify_heads.snapshot()}
        with self._lock:
            per_adapter = {k: dict(v) for k, v in self._per_adapter.items()}
        return {"queue_length": self.scheduler.queue_length(),
                "running_rows": self.scheduler.running_rows,
                "running_requests": self.scheduler.running_jobs(),
                "requests": per_adapter, **steps,
                "slot_pool": self.pool.counters(), "feature_cache": self.features.counters()}
