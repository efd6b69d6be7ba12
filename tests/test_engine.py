"""Engine: continuously batched mixed-adapter requests equal each request run alone; admission,
caches, overload, validation, deletes and new versions while requests are in flight."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import petserve.serving.engine as engine_module
import petserve.serving.scheduler as scheduler_module
from petserve.adapters.backbone import build_backbone
from petserve.adapters.data import make_demo_examples
from petserve.serving.engine import Engine, EngineConfig, InferenceRequest
from petserve.serving.errors import ApiError
from petserve.serving.store import LocalDirStore
from tests.test_slot_pool import put_adapter

ADAPTERS = {"lora": ("lora", {"r": 8}), "houlsby": ("adapter", {}),
            "vlpet-s": ("vlpet", {"gate": "small"}), "vlpet-l": ("vlpet", {"gate": "large", "gate_rank": 12})}
NOISE = 0.15   # visibly changes outputs; stronger noise amplifies fp32 padding noise past 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: OpenMP threads that wait on a busy core make every step 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_t5):
    s = LocalDirStore(tmp_path_factory.mktemp("store"))
    for i, (name, (kind, options)) in enumerate(ADAPTERS.items()):
        put_adapter(s, tiny_t5, name, kind, options, seed=i, noise=NOISE)
    return s


@pytest.fixture(scope="module")
def media():
    exs = make_demo_examples("count", 3, 1) + make_demo_examples("caption", 3, 2)
    images = [e.load_images()[0] for e in exs]
    rng = np.random.default_rng(0)
    return {"images": images, "questions": [e.text for e in exs],
            "frames": rng.integers(0, 256, (4, 40, 48, 3), dtype=np.uint8),
            "features": rng.normal(size=(9, 64)).astype(np.float32)}


def make_request(media, i: int, adapter) -> InferenceRequest:
    """Request i: one of five input shapes, greedy or beam 3, 4..16 new tokens."""
    ims, shape = media["images"], i % 5
    common = dict(adapter=adapter, max_new_tokens=4 + 4 * (i % 4), num_beams=3 if i % 3 == 2 else 1)
    if shape == 0:
        return InferenceRequest(task="vqa", text=media["questions"][i % 6], images=[ims[i % 6]], **common)
    if shape == 1:
        return InferenceRequest(task="caption", text="", images=[ims[(i + 1) % 6]], **common)
    if shape == 2:
        return InferenceRequest(task="nlvr", text="both show a square", images=[ims[i % 6], ims[0]], **common)
    if shape == 3:
        return InferenceRequest(task="gqa", text="what is left?", features=media["features"], **common)
    return InferenceRequest(task="video_qa", text="what moves?", frames=media["frames"], **common)


def wait_until(cond, timeout=30.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.001)


def assert_same(result, alone):
    assert result.tokens == alone.tokens and result.text == alone.text
    assert result.logprob == pytest.approx(alone.logprob, abs=1e-4)
    assert result.adapter_version == alone.adapter_version


@pytest.fixture
def engine_factory(tiny_t5, store):
    engines = []

    def make(model=tiny_t5, store=store, **options):
        eng = Engine(model, store, EngineConfig(**options))
        engines.append(eng)
        return eng
    yield make
    for eng in engines:
        eng.stop()


def test_concurrent_mixed_requests_equal_run_alone(engine_factory, media):
    eng = engine_factory(num_slots=3, max_batch_rows=16, max_prefill_tokens=400)
    names = [None, *ADAPTERS]
    reqs = [make_request(media, i, names[i % 5]) for i in range(54)]
    eng.start()
    with ThreadPoolExecutor(6) as ex:                       # wave 1: many threads at once
        futures = list(ex.map(eng.submit, reqs[:18]))
    wait_until(lambda: eng.stats()["running_requests"] > 0 or all(f.done() for f in futures))
    futures += [eng.submit(r) for r in reqs[18:36]]          # wave 2: joins rows mid-decode

    async def wave3():
        return await asyncio.gather(*(eng.generate(r) for r in reqs[36:]))
    late = asyncio.run(wave3())
    results = [f.result(timeout=60) for f in futures] + late
    for req, res in zip(reqs, results):
        assert_same(res, eng.run_alone(req))
    st = eng.stats()
    assert st["failed"] == {} and st["queue_length"] == 0 and st["running_rows"] == 0
    mixed = st["adapters_per_step"]
    assert mixed["count"] - mixed["buckets"]["1"] > 0        # some steps mixed >= 2 adapters
    assert st["batch_rows"]["buckets"]["16"] == st["steps_total"]   # never over max_batch_rows
    assert st["prefills_joining_total"] > 0 and st["slot_pool"]["evictions"] > 0
    assert sum(v["count"] for v in st["requests"].values()) == 54 and st["requests"]["_backbone"]["count"]


def test_decoder_cache_stays_bounded_while_the_batch_never_drains(engine_factory, media, monkeypatch):
    """Rows that left must not leave their columns behind: the self-attention cache is as wide as
    the oldest running row is old (<= max_new_tokens), not as the number of steps run."""
    widths, real = [], scheduler_module.decode_step

    def recording(model, state):
        widths.append(state.cache.key_pos.shape[1])
        return real(model, state)
    monkeypatch.setattr(scheduler_module, "decode_step", recording)
    eng = engine_factory(max_batch_rows=4, max_beams=3)
    reqs = [make_request(media, i, [None, "lora"][i % 2]) for i in range(30)]   # <= 16 new tokens
    futures = [eng.submit(r) for r in reqs]
    eng.start()
    assert all(f.result(timeout=60) for f in futures)
    assert len(widths) > 60 and max(widths) <= 16


def test_a_request_waiting_for_a_slot_is_not_starved(engine_factory, media):
    """One slot, a stream of requests for the resident adapter: the one that needs another adapter
    may be passed a few times, then admission turns FIFO and its slot frees."""
    eng = engine_factory(num_slots=1, max_batch_rows=4, max_beams=3)
    names = ["lora", "houlsby"] + ["lora"] * 30
    reqs = [InferenceRequest(name, "vqa", "what?", [media["images"][0]], max_new_tokens=3 + 5 * (i % 3))
            for i, name in enumerate(names)]      # staggered lengths: some lora row is always live
    order = []
    futures = [eng.submit(r) for r in reqs]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _, i=i: order.append(i))
    eng.start()
    assert all(f.result(timeout=60).tokens for f in futures)
    assert order.index(1) < 12, order
    assert eng.stats()["slot_pool"]["busy"] > 0


def test_task_conditioned_prefix_and_compacter_kinds(engine_factory, tiny_t5, media, tmp_path):
    """A task-conditioned adapter takes one slot per task and refuses tasks it has none for; prompt
    tuning (prefix vectors) and compacter mix into the same batches."""
    from petserve.adapters.kinds import KINDS
    if not {"hyperformer", "prompt", "compacter"} <= set(KINDS):
        pytest.skip("kinds not registered")
    store = LocalDirStore(tmp_path)
    put_adapter(store, tiny_t5, "hyper", "hyperformer", {"tasks": ("vqa", "caption")}, seed=3, noise=NOISE)
    put_adapter(store, tiny_t5, "prompt", "prompt", {"length": 5}, seed=4, noise=NOISE)
    put_adapter(store, tiny_t5, "phm", "compacter", {}, seed=5, noise=NOISE)
    eng = engine_factory(store=store, num_slots=4)
    with pytest.raises(ApiError) as e:
        eng.submit(InferenceRequest("hyper", "nlvr", "x", media["images"][:2]))
    assert (e.value.status, e.value.code) == (422, "adapter_task_unsupported")
    reqs = [make_request(media, i, name) for i in (0, 1, 5, 6) for name in ("hyper", "prompt", "phm", None)]
    futures = [eng.submit(r) for r in reqs]
    eng.start()
    for req, f in zip(reqs, futures):
        assert_same(f.result(timeout=60), eng.run_alone(req))
    hyper = {k for k in eng.pool.resident() if k[0] == "hyper"}
    assert hyper == {("hyper", 1, "vqa"), ("hyper", 1, "caption")}


def test_adapters_change_the_answers(engine_factory, media):
    """Guard for the equality above: each adapter really changes what is generated (its tokens,
    or at least their log-probability: a random tiny model often repeats one token)."""
    eng = engine_factory()
    outs = {name: eng.run_alone(make_request(media, 5, name)) for name in [None, *ADAPTERS]}
    assert len({(tuple(r.tokens), round(r.logprob, 3)) for r in outs.values()}) == len(outs)


def test_one_image_asked_of_many_adapters_is_encoded_once(engine_factory, tiny_t5, media, monkeypatch):
    calls = []
    real = tiny_t5.vision.image_tokens
    monkeypatch.setattr(tiny_t5.vision, "image_tokens", lambda ims: calls.append(1) or real(ims))
    eng = engine_factory()
    image = media["images"][2].copy()                      # same pixels, another object
    reqs = [InferenceRequest(a, "vqa", "what is it?", [im]) for a in [None, *ADAPTERS]
            for im in (media["images"][2], image)]
    futures = [eng.submit(r) for r in reqs]
    eng.start()
    assert all(f.result(timeout=30).tokens for f in futures)
    assert len(calls) == 1
    cache = eng.stats()["feature_cache"]
    assert (cache["misses"], cache["hits"], cache["items"]) == (1, 9, 1)


def test_full_queue_is_503_with_retry_after(engine_factory, media):
    eng = engine_factory(max_queue=3)
    futures = [eng.submit(make_request(media, i, None)) for i in range(3)]
    with pytest.raises(ApiError) as e:
        eng.submit(make_request(media, 3, None))
    assert e.value.status == 503 and e.value.code == "overloaded"
    assert int(e.value.headers["Retry-After"]) >= 1
    eng.start()
    assert all(f.result(timeout=30) for f in futures)


# What only the engine can know (the adapter's store entry, the tokenized length); every other rule
# is admission's (serving/schemas.py; tests/test_admission.py, tests/test_api.py).
BAD = [
    (dict(adapter="nope"), 404, "adapter_not_found"),
    (dict(adapter="Bad/Id"), 400, "invalid_adapter_id"),
    (dict(text="word " * 500), 413, "input_too_long"),
]


@pytest.mark.parametrize("change,status,code", BAD, ids=[c for _, _, c in BAD])
def test_bad_requests_are_refused_at_submit(engine_factory, media, change, status, code):
    eng = engine_factory(max_prefill_tokens=300)
    req = InferenceRequest(**{**dict(adapter="lora", task="vqa", text="what?", images=[media["images"][0]]),
                              **change})
    with pytest.raises(ApiError) as e:
        eng.submit(req)
    assert (e.value.status, e.value.code) == (status, code)
    assert eng.stats()["queue_length"] == 0


def test_text_only_and_features_only_backbone(engine_factory, tmp_path):
    eng = engine_factory()
    assert eng.run_alone(InferenceRequest("lora", "vqa", "what is it?")).adapter_version == 1
    model = build_backbone("tiny-t5+rn101")
    feats = np.random.default_rng(0).normal(size=(6, 2048)).astype(np.float32)
    eng = Engine(model, LocalDirStore(tmp_path))
    assert eng.run_alone(InferenceRequest(None, "vqa", "what?", features=feats)).tokens


@pytest.fixture
def gate(monkeypatch):
    """Holds the scheduler in its first decode step until ``go`` is set."""
    entered, go = threading.Event(), threading.Event()
    real = scheduler_module.decode_step

    def gated(model, state):
        entered.set()
        assert go.wait(30)
        return real(model, state)
    monkeypatch.setattr(scheduler_module, "decode_step", gated)
    yield entered, go
    go.set()


def test_deleted_adapter_finishes_in_flight_and_404s_later(engine_factory, tiny_t5, media, tmp_path, gate):
    entered, go = gate
    store = LocalDirStore(tmp_path)
    put_adapter(store, tiny_t5, "gone", "vlpet", {"gate": "large"}, seed=7, noise=NOISE)
    eng = engine_factory(store=store)
    req = make_request(media, 0, "gone")
    alone = eng.run_alone(req)
    eng.start()
    in_flight = eng.submit(req)
    assert entered.wait(30)
    queued = eng.submit(req)                # accepted before the delete: served with its version
    store.delete("gone")
    with pytest.raises(ApiError) as e:
        eng.submit(req)
    assert e.value.status == 404 and e.value.code == "adapter_not_found"
    go.set()
    assert_same(in_flight.result(timeout=30), alone)
    assert_same(queued.result(timeout=30), alone)


def test_new_version_is_served_to_later_requests(engine_factory, tiny_t5, media, tmp_path, gate):
    entered, go = gate
    store = LocalDirStore(tmp_path)
    put_adapter(store, tiny_t5, "ver", "lora", {"r": 8}, seed=1, noise=NOISE)
    eng = engine_factory(store=store)
    req = make_request(media, 1, "ver")
    alone_v1 = eng.run_alone(req)
    eng.start()
    first = eng.submit(req)
    assert entered.wait(30)
    put_adapter(store, tiny_t5, "ver", "lora", {"r": 8}, seed=2, noise=NOISE)
    alone_v2 = eng.run_alone(req)
    second = eng.submit(req)
    go.set()
    assert alone_v1.tokens != alone_v2.tokens and alone_v2.adapter_version == 2
    assert_same(first.result(timeout=30), alone_v1)
    assert_same(second.result(timeout=30), alone_v2)
    assert list(eng.pool.resident()) == [("ver", 2, None)]


def test_a_failing_step_fails_only_its_requests(engine_factory, media, monkeypatch):
    real_visual = engine_module.encode_visual
    monkeypatch.setattr(engine_module, "encode_visual",
                        lambda model, ims, *a: 1 / 0 if not ims else real_visual(model, ims, *a))
    eng = engine_factory()
    ok = [eng.submit(make_request(media, i, "lora")) for i in (0, 1)]
    broken = eng.submit(InferenceRequest("lora", "gqa", "x", features=media["features"]))
    eng.start()
    with pytest.raises(ApiError) as e:
        broken.result(timeout=30)
    assert e.value.status == 500 and "ZeroDivisionError" in e.value.message
    assert all(f.result(timeout=30).tokens for f in ok)
    steps = iter([RuntimeError("device fell over")])
    real_step = scheduler_module.decode_step

    def failing_once(model, state):
        err = next(steps, None)
        if err is not None:
            raise err
        return real_step(model, state)
    monkeypatch.setattr(scheduler_module, "decode_step", failing_once)
    doomed = eng.submit(make_request(media, 0, "houlsby"))
    with pytest.raises(ApiError, match="device fell over"):
        doomed.result(timeout=30)
    after = make_request(media, 0, "houlsby")
    assert_same(eng.submit(after).result(timeout=30), eng.run_alone(after))
    assert eng.pool.counters()["referenced"] == 0 and eng.stats()["failed"]["inference_failed"] == 2


def test_stop_fails_what_is_still_queued(engine_factory, media):
    eng = engine_factory()
    future = eng.submit(make_request(media, 0, None))
    eng.stop()
    with pytest.raises(ApiError) as e:
        future.result(timeout=5)
    assert e.value.status == 503 and e.value.code == "shutting_down"
    assert eng.fingerprint == eng.model.fingerprint


def test_health_reports_a_broken_a_hung_and_a_stopped_engine(engine_factory, media, monkeypatch):
    """check_health (Ray Serve's replica health check, /healthz) names what is wrong, and an engine
    that recovers is healthy again."""
    eng = engine_factory(unhealthy_after_failures=2, stall_timeout_s=0.5)
    with pytest.raises(RuntimeError, match="not running"):
        eng.check_health()
    eng.start()
    eng.check_health()
    real_step, mode = scheduler_module.decode_step, {"now": "broken"}
    gate = threading.Event()

    def step(model, state):
        if mode["now"] == "broken":        # prefills still succeed: decode steps are counted apart
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if mode["now"] == "hung":
            gate.wait(30)
        return real_step(model, state)
    monkeypatch.setattr(scheduler_module, "decode_step", step)
    for expect_healthy in (True, False):
        with pytest.raises(ApiError):
            eng.submit(make_request(media, 0, "lora")).result(timeout=30)
        if expect_healthy:
            eng.check_health()
    with pytest.raises(RuntimeError, match="last 2 decode steps failed.*illegal memory access"):
        eng.check_health()
    mode["now"] = "ok"
    assert eng.submit(make_request(media, 0, "lora")).result(timeout=30).tokens
    eng.check_health()
    mode["now"] = "hung"
    future = eng.submit(make_request(media, 0, "lora"))
    wait_until(lambda: eng.scheduler.health_problem(2, 0.5) is not None)
    with pytest.raises(RuntimeError, match="one engine step has run for"):
        eng.check_health()
    gate.set()
    assert future.result(timeout=30).tokens
    eng.check_health()
    eng.stop()
    with pytest.raises(RuntimeError, match="not running"):
        eng.check_health()


def test_a_stream_closed_by_its_reader_stops_decoding(engine_factory, media, endless):
    """A streaming client that goes away (the HTTP layer closes the stream's generator) frees
    its row within a step or two instead of decoding to max_new_tokens."""
    eng = engine_factory()
    eng.start()
    req = InferenceRequest(task="caption", text="", images=[media["images"][0]], adapter="lora",
                           max_new_tokens=200)

    async def read_one_then_leave():
        stream = eng.stream(req)
        first = await anext(stream)
        await stream.aclose()
        return first
    first = asyncio.run(read_one_then_leave())
    assert isinstance(first, str) and first
    wait_until(lambda: eng.scheduler.running_rows == 0 and not eng.scheduler.pending_count)
    assert len(endless) < 20, len(endless)

    endless.clear()                                 # the same stream read to its end: 200 steps
    async def read_all():
        return [item async for item in eng.stream(req)]
    items = asyncio.run(read_all())
    assert len(items[-1].tokens) == 200 and len(endless) >= 199


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_request_nobody_waits_for_stops_decoding(engine_factory, media, endless, num_beams):
    """Engine.generate cancelled while its job decodes (its HTTP client left, or Ray Serve
    cancelled the call) ends the job at its next step, greedy or beam search; a job cancelled
    while still queued never runs."""
    eng = engine_factory(max_batch_rows=2 * num_beams - 1, max_beams=num_beams)   # room for one
    eng.start()
    req = InferenceRequest(task="caption", text="", images=[media["images"][0]], adapter="lora",
                           max_new_tokens=200, num_beams=num_beams)

    async def leave_while_decoding():
        running = asyncio.ensure_future(eng.generate(req))
        queued = asyncio.ensure_future(eng.generate(req))      # no rows left for it
        await asyncio.to_thread(wait_until, lambda: len(endless) >= 3)
        assert eng.scheduler.pending_count == 1
        queued.cancel()
        running.cancel()
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(leave_while_decoding())
    wait_until(lambda: eng.scheduler.running_rows == 0 and not eng.scheduler.pending_count)
    assert len(endless) < 20, len(endless)
    assert set(endless) == {num_beams}, "the queued job was admitted"
    assert eng.pool.counters()["referenced"] == 0                # the slot was released
