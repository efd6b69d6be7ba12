"""HTTP load generator for a petserve server: closed loop (N concurrent clients) and open loop
(Poisson arrivals at a set rate), adapter popularity uniform / zipf(1.5) / single, 1 to 1000
adapters of one or mixed kinds, uploaded with ``PUT /v1/adapters/{id}``.

    python -m petserve.benchmarks.bench_serving [--backbone tiny] [--adapters 1,8,32,128,1000]
                                       [--server subprocess|in-process|ray] [--smoke]
                                       [--out benchmarks/results/serving_cpu.jsonl]

By default it starts ``petserve serve --no-ray`` (the FastAPI app and one engine in a subprocess;
``--server ray``: the Ray Serve app) on a random port, on a backbone from benchmarks/workloads.py
(``serving_backbone``: random T5 weights, every request generates exactly ``max_new_tokens``
tokens, so tokens/s = requests/s * max_new_tokens). Each request is ``POST /v1/vqa`` with a
question and one 16-d feature row, sent by a lean keep-alive client (benchmarks/http_load.py;
httpx cost as much CPU per request as the server). Reported per run: requests/s, tokens/s,
client latency p50/p90/p99 (and 101 quantiles for CDF plots), time queued in the engine (the
response's ``timings_ms.queue``), the slot pool's hit rate and adapters mixed per step
(``/metrics`` deltas).
Rows: ``{"setup", "metrics", "device", "commit"}``; plot with ``python -m petserve.benchmarks.plot_serving``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

from petserve.benchmarks.bench_env import commit, device_name
from petserve.benchmarks.http_load import HttpError, LoadClient
from petserve.benchmarks.workloads import (
    Workload,
    adapter_id,
    make_requests,
    poisson_arrivals,
    serving_backbone,
    used_adapters,
    workload_adapter_bytes,
)
from petserve.serving.server_config import EngineConfig

TOKEN = "bench-token"
FEATURES = [[0.25] * 16]
_SAMPLE = re.compile(r"^(\w+)(?:\{[^}]*\})? ([-+.\w]+)$")


# ---- server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(backbone: Path, store: Path, port: int, args) -> dict:
    return {"backbone": str(backbone), "store_dir": str(store), "port": port, "token": TOKEN,
            "engine": {"num_slots": args.num_slots, "cpu_cache_mib": args.cpu_cache_mib,
                       "max_batch_rows": args.batch, "max_queue": 4096}}


def wait_healthy(url: str, alive, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive()
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server did not answer /healthz within {timeout_s} s")


def start_subprocess(backbone: Path, store: Path, args) -> tuple[str, callable]:
    """``petserve serve`` (``--no-ray`` unless args.server == "ray") with args.server_threads
    torch threads; returns (url, stop) once /healthz answers."""
    port = free_port()
    path = store.parent / "server.json"          # JSON is YAML
    path.write_text(json.dumps(server_config(backbone, store, port, args)))
    cmd = [sys.executable, "-m", "petserve.serving.cli", "serve", "--config", str(path)]
    cmd += [] if args.server == "ray" else ["--no-ray"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def alive():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")

    def stop():
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, alive)
    except BaseException:
        stop()
        raise
    return url, stop


def start_in_process(backbone: Path, store: Path, args) -> tuple[str, callable]:
    """The same app served by uvicorn on a thread of this process (smoke runs: no second
    interpreter to start; client and server then share one GIL)."""
    import threading

    import torch
    import uvicorn

    from petserve.serving.api import create_app
    from petserve.serving.auth import TokenCheck
    from petserve.serving.deployments import LocalBackend
    from petserve.serving.server_config import ServerConfig
    torch.set_num_threads(args.server_threads)
    port = free_port()
    cfg = ServerConfig.model_validate(server_config(backbone, store, port, args))
    backend = LocalBackend.from_config(cfg)
    backend.start()
    app = create_app(backend, cfg, TokenCheck.for_token(TOKEN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=30)
        backend.stop()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, lambda: None)
    return url, stop


def upload(url: str, model, w: Workload, have: set[str]) -> None:
    """PUT the workload's adapters the server does not hold yet."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(timeout=60) as client:
        for i in range(w.adapters):
            aid = adapter_id(i, w.kinds)
            if aid in have:
                continue
            r = client.put(f"{url}/v1/adapters/{aid}", content=workload_adapter_bytes(model, w, i),
                           headers=headers)
            if r.status_code != 201:
                raise RuntimeError(f"upload of {aid} failed: {r.status_code} {r.text[:300]}")
            have.add(aid)


def scrape(url: str) -> dict[str, float]:
    """/metrics summed over label sets: {family sample name: value}."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


# ---- load --------------------------------------------------------------------------------
async def send(client: LoadClient, req, t_sched: float) -> tuple:
    """(latency s from the scheduled send time, status, engine queue ms or None)."""
    body = {"adapter": req.adapter, "question": req.text, "features": FEATURES,
            "max_new_tokens": req.max_new_tokens}
    try:
        status, out = await client.post_json("/v1/vqa", body)
        queue_ms = out["timings_ms"].get("queue") if status == 200 else None
    except HttpError:
        status, queue_ms = 0, None
    return time.perf_counter() - t_sched, status, queue_ms


async def closed_loop(url: str, requests, concurrency: int) -> list[tuple]:
    """``concurrency`` clients, each sending its next request when the previous one returns."""
    out, it = [], iter(requests)
    async with LoadClient(url, concurrency) as client:
        async def worker():
            for req in it:
                out.append(await send(client, req, time.perf_counter()))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(url: str, requests, rate: float, seed: int) -> list[tuple]:
    """Requests sent at Poisson arrival times; latency counts from the scheduled time, so a
    client that falls behind does not hide queueing (no coordinated omission)."""
    times = poisson_arrivals(len(requests), rate, seed)
    async with LoadClient(url, 1024) as client:
        t0, tasks = time.perf_counter(), []
        for req, at in zip(requests, times):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(client, req, t0 + at)))
        return await asyncio.gather(*tasks)


def run_metrics(samples: list[tuple], elapsed: float, w: Workload, requests, before: dict,
                after: dict) -> dict:
    ok = [s for s in samples if s[1] == 200]
    lat = np.array([s[0] for s in ok]) * 1e3 if ok else np.zeros(1)
    queue = np.array([s[2] for s in ok]) if ok else np.zeros(1)
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    hits = d.get("petserve_slot_pool_hits_total", 0)
    misses = d.get("petserve_slot_pool_misses_total", 0)
    mixed = d.get("petserve_engine_adapters_per_step_sum", 0)
    steps = d.get("petserve_engine_adapters_per_step_count", 0)
    return {"requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
            "elapsed_s": elapsed, "requests_per_s": len(ok) / elapsed,
            "tokens_per_s": len(ok) * w.max_new_tokens / elapsed,
            **{f"latency_ms_p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)},
            "queue_ms_p50": float(np.percentile(queue, 50)),
            "queue_ms_p99": float(np.percentile(queue, 99)),
            "latency_ms_quantiles": np.percentile(lat, np.arange(101)).round(3).tolist(),
            "slot_hit_rate": hits / max(1.0, hits + misses),
            "adapters_per_step_mean": mixed / max(1.0, steps),
            "adapters_used": used_adapters(requests)}


def measure(url: str, w: Workload, mode: str, load: float, warm_adapters: int,
            adapter: bool = True) -> dict:
    """One run: ``mode`` "closed" (``load`` clients) or "open" (``load`` requests/s), after a
    one-token request for each of the first ``warm_adapters`` adapters the run uses (first seen
    first), so the slots hold what a running server's would. ``adapter`` False: the same texts
    on the backbone alone."""
    requests = make_requests(w, adapter)
    first: dict = {}
    for r in requests:
        first.setdefault(r.adapter, replace(r, max_new_tokens=1))
    asyncio.run(closed_loop(url, list(first.values())[:warm_adapters], 16))
    before, t0 = scrape(url), time.perf_counter()
    if mode == "closed":
        samples = asyncio.run(closed_loop(url, requests, int(load)))
    else:
        samples = asyncio.run(open_loop(url, requests, load, w.seed))
    elapsed = time.perf_counter() - t0
    return run_metrics(samples, elapsed, w, requests, before, scrape(url))


# ---- sweep -------------------------------------------------------------------------------
def workloads(args) -> list[Workload]:
    """Closed-loop sweep: one LoRA; LoRAs uniform over --adapters; zipf LoRAs and uniform mixed
    kinds over --more-adapters."""
    base = Workload(requests=args.requests, max_new_tokens=args.max_new_tokens)
    more = args.more_adapters
    out = [replace(base, popularity="single", adapters=args.acceptance_adapters)]
    out += [replace(base, adapters=a) for a in args.adapters]
    out += [replace(base, popularity="zipf", adapters=a) for a in more]
    out += [replace(base, kinds="mixed", adapters=a) for a in more]
    return list(dict.fromkeys(out))


def row(w: Workload, mode: str, load: float, runs: list[dict], args,
        system: str = "engine") -> dict:
    """The run of median throughput stands for its repeats (all its metrics from one run)."""
    runs = sorted(runs, key=lambda m: m["requests_per_s"])
    metrics = {**runs[len(runs) // 2], "requests_per_s_runs": [m["requests_per_s"] for m in runs],
               "load_avg_1m": os.getloadavg()[0]}
    setup = {"bench": "serving", "system": system, "mode": mode,
             ("concurrency" if mode == "closed" else "rate"): load,
             "backbone": args.backbone, **w.setup(), "server": args.server,
             "server_threads": args.server_threads, "num_slots": args.num_slots,
             "cpu_cache_mib": args.cpu_cache_mib, "max_batch_rows": args.batch}
    return {"setup": setup, "metrics": metrics, "device": device_name(), "commit": commit()}


def run_suite(url: str, model, args, sink) -> None:
    have: set[str] = set()
    sweep = workloads(args)
    for w in sweep:
        upload(url, model, w, have)
    runs = {w: [] for w in sweep}
    acc = replace(sweep[0], popularity="uniform")
    bare = []
    for rep in range(args.repeats):
        for w in sweep:
            runs[w].append(measure(url, w, "closed", args.concurrency, args.num_slots))
            print(f"[closed rep {rep}] {w.popularity:<7} {w.kinds:<5} A={w.adapters:<4} "
                  f"{runs[w][-1]['requests_per_s']:8.1f} req/s", flush=True)
        if args.bare:
            bare.append(measure(url, acc, "closed", args.concurrency, 0, adapter=False))
            print(f"[closed rep {rep}] backbone alone {bare[-1]['requests_per_s']:8.1f} req/s",
                  flush=True)
    for w in sweep:
        sink(row(w, "closed", args.concurrency, runs[w], args))
    if bare:
        sink(row(acc, "closed", args.concurrency, bare, args, system="backbone"))
    peak = float(np.median([m["requests_per_s"] for m in runs[acc]]))
    for frac in args.open_fractions:
        rate = round(frac * peak, 1)
        w = replace(acc, requests=max(8, int(rate * args.open_seconds)))
        m = measure(url, w, "open", rate, args.num_slots)
        print(f"[open {frac:.2f} x peak] {rate:7.1f} req/s offered: p50 {m['latency_ms_p50']:.1f} "
              f"p99 {m['latency_ms_p99']:.1f} ms", flush=True)
        sink(row(w, "open", rate, [m], args))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny", help="tiny | t5-small (benchmarks/workloads.py)")
    p.add_argument("--server", default="subprocess", choices=("subprocess", "in-process", "ray"))
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--adapters", default="1,8,32,128,1000")
    p.add_argument("--more-adapters", default="32,1000", help="zipf and mixed-kind sweep")
    p.add_argument("--acceptance-adapters", type=int, default=32)
    p.add_argument("--requests", type=int, default=256, help="per closed-loop run")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    p.add_argument("--open-fractions", default="0.25,0.5,0.75,0.9",
                   help="open-loop rates as fractions of the closed-loop throughput (32 LoRAs)")
    p.add_argument("--open-seconds", type=float, default=8.0, help="length of an open-loop run")
    p.add_argument("--batch", type=int, default=32, help="engine max_batch_rows")
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--cpu-cache-mib", type=float,
                   default=EngineConfig.model_fields["cpu_cache_mib"].default)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bare", action="store_true", help="also the backbone alone (no adapter), "
                   "interleaved with the sweep's repeats")
    p.add_argument("--smoke", action="store_true", help="in-process server, a few requests")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/serving_cpu.jsonl; --smoke: a temp file")
    args = p.parse_args(argv)
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-serving.jsonl"
                            if args.smoke else Path("benchmarks/results/serving_cpu.jsonl"))
    if args.smoke:
        args.server, args.adapters, args.acceptance_adapters = "in-process", "1,3", 3
        args.more_adapters = "3"
        args.requests, args.max_new_tokens, args.concurrency = 8, 2, 4
        args.open_fractions, args.open_seconds, args.repeats, args.num_slots = "0.5", 1.0, 1, 4
    args.adapters = [int(a) for a in str(args.adapters).split(",")]
    args.more_adapters = [int(a) for a in str(args.more_adapters).split(",") if a]
    args.open_fractions = [float(f) for f in str(args.open_fractions).split(",") if f]
    return args


def main(argv=None) -> int:
    import torch

    from petserve.adapters.backbone import build_backbone
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(args.server_threads)   # the client only builds adapter files
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="petserve-serving-") as tmp:
        backbone = serving_backbone(args.backbone, Path(tmp))
        model = build_backbone(backbone)           # client side: builds the adapter files
        start = start_in_process if args.server == "in-process" else start_subprocess
        url, stop = start(backbone, Path(tmp) / "store", args)
        try:
            with args.out.open("w") as f:
                def sink(r):
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                run_suite(url, model, args, sink)
        finally:
            stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
