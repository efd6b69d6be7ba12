"""Engine: one frozen backbone on one device serving many adapters, with continuous batching.

``submit`` validates a request on the caller's thread (raising ApiError synchronously), tokenizes it
and hashes its visual content, then queues it for the scheduler thread (serving/scheduler.py),
which mixes every adapter and kind in one batch. ``run_alone`` is the oracle: the same request alone
with its adapter in a private one-slot SlotBank; a result from ``submit`` must equal it (tokens
exactly, log-probability within float noise).
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from petserve.adapters.backbone.model import TASK_PREFIX, RowInput
from petserve.adapters.generation import GenerationRequest, GenerationResult, generate
from petserve.adapters.kinds import KINDS
from petserve.adapters.runtime.bank import SlotBank
from petserve.serving.errors import ApiError
from petserve.serving.feature_cache import FeatureCache, encode_visual, features_key, frames_key, images_key
from petserve.serving.scheduler import Job, Scheduler
from petserve.serving.slot_pool import SlotPool, compile_on_cpu, parse_stored
from petserve.serving.store import AdapterStore

VIDEO_TASKS = ("video_qa", "video_caption")
CAPTION_TASKS = ("caption", "video_caption")
MAX_FRAMES = 256
BACKBONE_LABEL = "_backbone"        # stats key of requests without adapter (ids cannot start with _)


@dataclass
class EngineConfig:
    num_slots: int = 16              # adapter slots on the device (SlotBank size)
    cpu_cache_adapters: int = 64     # compiled adapters kept in CPU memory (behind the device slots)
    max_batch_rows: int = 32         # decoder rows per step (a beam search request takes num_beams rows)
    max_prefill_tokens: int = 4096   # encoder tokens admitted in one step (token budget)
    max_queue: int = 256             # waiting requests; beyond it submit() raises ApiError.overloaded
    feature_cache_items: int = 1024  # vision features cached by image content hash
    max_new_tokens_cap: int = 64
    max_beams: int = 5
    unhealthy_after_failures: int = 5   # prefill/decode phases failing in a row (check_health)
    stall_timeout_s: float = 300.0      # one scheduler iteration running longer is a hang

    def __post_init__(self):
        if self.num_slots < 1 or self.max_batch_rows < 1 or self.max_queue < 1:
            raise ValueError("num_slots, max_batch_rows and max_queue must be >= 1")
        if self.unhealthy_after_failures < 1 or self.stall_timeout_s <= 0:
            raise ValueError("unhealthy_after_failures must be >= 1 and stall_timeout_s > 0")
        if not 1 <= self.max_beams <= self.max_batch_rows:
            raise ValueError(f"max_beams must be in 1..max_batch_rows ({self.max_batch_rows})")


@dataclass
class InferenceRequest:
    adapter: str | None              # adapter id; None = frozen backbone alone
    task: str                        # "vqa" | "gqa" | "nlvr" | "caption" | "video_qa" | "video_caption"
    text: str                        # question / statement / caption prompt ("" allowed for captions)
    images: list = field(default_factory=list)       # 0, 1 or 2 PIL RGB images (2 = NLVR2 style)
    frames: np.ndarray | None = None                # video: (T, H, W, 3) uint8 frames already sampled
    features: np.ndarray | None = None              # precomputed visual features (N, feat_dim)
    boxes: np.ndarray | None = None                 # optional (N, 4) boxes for features
    max_new_tokens: int | None = None                 # None: 20, captions 40 (clamped to the cap)
    num_beams: int = 1


@dataclass
class InferenceResult:
    text: str
    logprob: float                   # sum of the generated tokens' log-probabilities
    adapter: str | None
    adapter_version: int | None
    timings_ms: dict[str, float]     # queue, vision, prefill, decode, total
    tokens: list[int] = field(default_factory=list)   # generated ids, end-of-sequence excluded


def _bad(code: str, message: str) -> ApiError:
    return ApiError.unprocessable(code, message)


class Engine:
    def __init__(self, model, store: AdapterStore, config: EngineConfig | None = None):
        self.model, self.store = model, store
        self.config = config = config or EngineConfig()
        self.pool = SlotPool(model, store, config.num_slots, config.cpu_cache_adapters)
        self.features = FeatureCache(config.feature_cache_items)
        self.scheduler = Scheduler(model, self.pool, self.features, config.max_batch_rows,
                                   config.max_prefill_tokens, self._complete)
        self._lock = threading.Lock()
        self._per_adapter: dict[str, dict[str, float]] = {}
        self._latency_ema_s = 1.0

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()

    def pin(self, adapter_id: str) -> None:
        """Keep ``adapter_id`` resident (Ray Serve multiplexing); see SlotPool.pin."""
        self.pool.pin(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.pool.unpin(adapter_id)

    # ---- requests ------------------------------------------------------------------------
    def submit(self, req: InferenceRequest) -> Future:
        """Validate and queue ``req``; the future resolves to an InferenceResult (or an ApiError).
        Raises ApiError now for bad values (4xx), an unknown adapter (404) or a full queue (503)."""
        job = self._job(req)
        self.scheduler.enqueue(job, self.config.max_queue, self._retry_after_s())
        return job.future

    async def generate(self, req: InferenceRequest) -> InferenceResult:
        return await asyncio.wrap_future(self.submit(req))

    def run_alone(self, req: InferenceRequest) -> InferenceResult:
        """``req`` alone, bypassing the scheduler and caches: its adapter (latest version) read
        from the store into a private one-slot SlotBank, then adapters.generation.generate."""
        t0 = time.perf_counter()
        job = self._job(req)
        bank, slot, version = SlotBank(self.model, 1), -1, None
        if req.adapter is not None:
            version = self.store.get(req.adapter).version
            af = parse_stored(self.store.read(req.adapter, version), self.model)
            task = req.task if af.task_conditioned else None
            bank.set(0, compile_on_cpu(af, self.model, task))
            slot = 0
        with torch.inference_mode():
            row = RowInput(job.ids, job.encode_visual())
            out = generate(self.model, bank, [GenerationRequest(row, slot, job.max_new_tokens,
                                                                job.num_beams)])[0]
        total = (time.perf_counter() - t0) * 1e3
        return InferenceResult(out.text, out.logprob, req.adapter, version,
                               {"queue": 0.0, "vision": 0.0, "total": total}, out.tokens)

    def _complete(self, job: Job, out: GenerationResult) -> None:
        """Scheduler callback: a job's searcher finished."""
        result = InferenceResult(self.model.decode_text(out.tokens), out.logprob, job.adapter,
                                 job.version, dict(job.timings_ms), out.tokens)
        total_ms = job.timings_ms["total"]
        with self._lock:
            entry = self._per_adapter.setdefault(job.adapter or BACKBONE_LABEL,
                                                 {"count": 0, "latency_ms_sum": 0.0})
            entry["count"] += 1
            entry["latency_ms_sum"] += total_ms
            self._latency_ema_s = 0.9 * self._latency_ema_s + 0.1 * total_ms / 1e3
        job.future.set_result(result)

    def _retry_after_s(self) -> float:
        """Roughly when a queue slot frees: one request latency per batch of queued requests."""
        batches = math.ceil(max(1, self.scheduler.queue_length()) / self.config.max_batch_rows)
        return max(1.0, self._latency_ema_s * batches)

    # ---- validation ----------------------------------------------------------------------
    def _job(self, req: InferenceRequest) -> Job:
        """A validated Job (tokenized, content hashed) or ApiError."""
        if req.task not in TASK_PREFIX:
            raise _bad("invalid_task", f"unknown task {req.task!r}; choose one of {sorted(TASK_PREFIX)}")
        if not isinstance(req.text, str):
            raise _bad("invalid_text", "text must be a string")
        if len(req.text) > 8 * self.config.max_prefill_tokens:   # before spending time tokenizing it
            raise ApiError.payload_too_large(f"text of {len(req.text)} characters is far over this "
                                             f"replica's limit of {self.config.max_prefill_tokens} "
                                             "encoder tokens", code="input_too_long")
        max_new = self._max_new_tokens(req)
        beams = req.num_beams
        if not isinstance(beams, int) or not 1 <= beams <= self.config.max_beams:
            raise _bad("invalid_num_beams", f"num_beams must be an integer in 1..{self.config.max_beams}, "
                       f"got {beams!r}")
        if req.adapter is not None:
            self._check_adapter(req.adapter, req.task)
        images, frames, feats, boxes = self._visual_inputs(req)
        key, n_visual = self._visual_key(images, frames, feats, boxes)
        ids = self.model.row_input(req.task, req.text, None).ids
        n_tokens = len(ids) + n_visual
        if n_tokens > self.config.max_prefill_tokens:
            raise ApiError.payload_too_large(f"the request has {n_tokens} encoder tokens, over this "
                                             f"replica's limit of {self.config.max_prefill_tokens}",
                                             code="input_too_long")
        model = self.model
        return Job(req.adapter, req.task, ids, key,
                   lambda: encode_visual(model, images, frames, feats, boxes),
                   n_tokens, max_new, beams)

    def _check_adapter(self, adapter_id: str, task: str) -> None:
        """400 invalid id, 404 unknown or deleted, 422 a task-conditioned adapter without ``task``
        (known from the kind the upload recorded in the store's metadata)."""
        stored = self.store.get(adapter_id)
        kind = KINDS.get(stored.meta.get("kind", ""))
        if kind is None:
            return
        try:
            conditioned = kind.is_task_conditioned(kind.Config(**stored.meta.get("config", {})))
        except ValueError:      # metadata of an older upload: the pool checks when it loads
            conditioned = kind.task_conditioned
        if conditioned:
            self.pool.check_task(adapter_id, stored.version, task)

    def _max_new_tokens(self, req: InferenceRequest) -> int:
        cap = self.config.max_new_tokens_cap
        if req.max_new_tokens is None:
            return min(40 if req.task in CAPTION_TASKS else 20, cap)
        n = req.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= cap:
            raise _bad("invalid_max_new_tokens", f"max_new_tokens must be an integer in 1..{cap}, "
                       f"got {n!r}")
        return n

    def _visual_inputs(self, req: InferenceRequest):
        """(images as RGB, frames, features, boxes) checked against the task and the backbone;
        arrays are copied so a caller mutating them later cannot change a queued request."""
        given = [n for n, v in (("images", req.images), ("frames", req.frames),
                                ("features", req.features)) if v is not None and len(v)]
        if len(given) > 1:
            raise _bad("ambiguous_visual_input", f"give one of images, frames or features, not {given}")
        video = req.task in VIDEO_TASKS
        if video and not given:
            raise _bad("missing_frames", f"task {req.task!r} needs video frames")
        if video and given == ["images"]:
            raise _bad("missing_frames", f"task {req.task!r} takes video frames, not images")
        if not video and given == ["frames"]:
            raise _bad("unexpected_frames", f"video frames need task video_qa or video_caption, "
                       f"not {req.task!r}")
        if given in (["images"], ["frames"]) and self.model.vision is None:
            raise _bad("features_required", "this backbone has no image encoder: it takes precomputed "
                       f"features (N, {self.model.cfg.vision.feat_dim}), not images or frames")
        if given == ["features"]:
            return [], None, *self._features(req)
        if given == ["frames"]:
            return [], self._frames(req.frames), None, None
        return self._images(req.images or []), None, None, None

    def _images(self, images: list) -> list:
        if len(images) > self.model.cfg.n_images:
            raise _bad("too_many_images", f"at most {self.model.cfg.n_images} images per request, "
                       f"got {len(images)}")
        out = []
        for i, im in enumerate(images):
            if hasattr(im, "convert"):
                out.append(im if im.mode == "RGB" else im.convert("RGB"))
                continue
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
                raise _bad("invalid_image", f"image {i} must be a PIL image or an (H, W, 3) uint8 "
                           f"array, got {type(im).__name__} {getattr(a, 'shape', '')}")
            out.append(a.copy())
        return out

    def _frames(self, frames) -> np.ndarray:
        a = np.asarray(frames)
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] != 3 or 0 in a.shape:
            raise _bad("invalid_frames", f"frames must be a (T, H, W, 3) uint8 array, got "
                       f"{a.dtype} {a.shape}")
        if a.shape[0] > MAX_FRAMES:
            raise _bad("too_many_frames", f"at most {MAX_FRAMES} frames, got {a.shape[0]}")
        return a.copy()

    def _features(self, req: InferenceRequest) -> tuple[np.ndarray, np.ndarray | None]:
        f_dim = self.model.cfg.vision.feat_dim
        try:
            feats = np.array(req.features, dtype=np.float32)
            boxes = None if req.boxes is None else np.array(req.boxes, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise _bad("invalid_features", f"features/boxes must be numeric arrays: {e}") from e
        if feats.ndim != 2 or feats.shape[1] != f_dim:
            raise _bad("invalid_features", f"features must have shape (N, {f_dim}) for this "
                       f"backbone, got {feats.shape}")
        if boxes is not None and boxes.shape != (feats.shape[0], 4):
            raise _bad("invalid_boxes", f"boxes must have shape ({feats.shape[0]}, 4), got {boxes.shape}")
        if not np.isfinite(feats).all() or (boxes is not None and not np.isfinite(boxes).all()):
            raise _bad("invalid_features", "features and boxes must be finite")
        return feats, boxes

    def _visual_key(self, images, frames, feats, boxes) -> tuple[str | None, int]:
        """(feature-cache key, number of visual tokens)."""
        if feats is not None:
            return features_key(feats, boxes), feats.shape[0]
        if frames is not None:
            return frames_key(frames), frames.shape[0]
        if images:
            return images_key(images), len(images) * self.model.vision.boxes.shape[0]
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
        - ``requests``: {adapter id or "_backbone": {"count", "latency_ms_sum"}} of completed requests;
        - ``failed``: {error code: requests failed after they were queued};
        - ``steps_total``, ``prefills_total``: decoder steps and prefill passes run;
          ``prefills_joining_total``: prefills whose rows joined rows already decoding;
        - ``batch_rows``: histogram of decoder rows per step; ``adapters_per_step``: of distinct
          adapters (slots) per step; ``prefill_batch_size``: of requests per prefill. Each histogram is
          {"buckets": {le: cumulative count, ..., "+Inf": n}, "sum", "count"};
        - ``slot_pool``: hits, misses, evictions, busy, cpu_hits, store_reads, load_count,
          load_ms_sum, load_ms_last, read_ms_sum, compile_ms_sum, copy_ms_sum, resident, pinned,
          slots, referenced, cpu_cached;
        - ``feature_cache``: hits, misses, items, capacity.
        """
        c = self.scheduler.counters
        with c.lock:
            steps = {"steps_total": c.steps, "prefills_total": c.prefills,
                     "prefills_joining_total": c.prefills_joining, "failed": dict(c.failed),
                     "batch_rows": c.batch_rows.snapshot(),
                     "adapters_per_step": c.adapters_per_step.snapshot(),
                     "prefill_batch_size": c.prefill_batch.snapshot()}
        with self._lock:
            per_adapter = {k: dict(v) for k, v in self._per_adapter.items()}
        return {"queue_length": self.scheduler.queue_length(),
                "running_rows": self.scheduler.running_rows,
                "running_requests": self.scheduler.running_jobs(),
                "requests": per_adapter, **steps,
                "slot_pool": self.pool.counters(), "feature_cache": self.features.counters()}
