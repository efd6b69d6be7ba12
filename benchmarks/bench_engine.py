"""Engine-level serving benchmark: workloads straight into serving.engine.Engine (no HTTP, no Ray),
with the baselines (benchmarks/baselines.py) on the same backbone and workload in the same run.

    python -m petserve.benchmarks.bench_engine [--backbones tiny,t5-small] [--repeats 3] [--smoke]
                                      [--out benchmarks/results/engine_cpu.jsonl]

Each backbone is a random Hugging Face T5 checkpoint (benchmarks/workloads.py) that both PEFT and
our backbone load; requests are text-only, greedy, and every one generates exactly
``max_new_tokens`` tokens. The engine is driven closed-loop: ``concurrency`` requests in flight,
a new one submitted as each completes. Cases run interleaved ``repeats`` times; a row reports the
median of its repeats. Per backbone one ``acceptance`` row gives the issue's ratios: 32 distinct
LoRAs (uniform) vs one LoRA (>= 0.8) and vs PEFT's mixed batch on the same workload (>= 2).

Rows: ``{"setup", "metrics", "device", "commit"}``. Plot with ``python -m
benchmarks.plot_serving <jsonl>``.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from petserve.benchmarks import baselines
from petserve.benchmarks.bench_env import commit, device_name
from petserve.benchmarks.workloads import (
    Workload,
    adapter_id,
    fill_store,
    hf_t5_checkpoint,
    make_requests,
    used_adapters,
)
from petserve.serving.server_config import EngineConfig

PEFT_ADAPTERS = 32          # the acceptance workload's LoRAs, created with PEFT
SYSTEMS = ("engine", "backbone", "merged", "peft_mixed", "hf_backbone", "per_adapter")


@dataclass(frozen=True)
class Case:
    system: str             # one of SYSTEMS
    backbone: str
    workload: Workload

    def setup(self, args) -> dict:
        return {"bench": "engine", "system": self.system, "backbone": self.backbone,
                **self.workload.setup(), "concurrency": args.concurrency,
                "max_batch_rows": args.batch, "num_slots": args.num_slots,
                "cpu_cache_mib": args.cpu_cache_mib, "threads": torch.get_num_threads(),
                "dtype": str(args.dtype)}


@dataclass
class Bench:
    """Everything one backbone's cases share (built once, outside the timed runs)."""

    name: str
    model: object
    merged: object
    stores: dict            # kinds -> LocalDirStore
    peft_model: object
    bank: object            # SlotBank with the PEFT LoRAs in slots 0.. (per_adapter baseline)
    results: dict = field(default_factory=dict)     # (system, workload) -> generated tokens


# ---- setup -------------------------------------------------------------------------------
def build_bench(name: str, cases: list[Case], args, tmp: Path) -> Bench:
    from petserve.adapters.backbone import build_backbone
    from petserve.serving.store import LocalDirStore
    hf = hf_t5_checkpoint(name, tmp / "hf")
    model = build_backbone(hf, device=args.device, dtype=args.dtype)
    n_peft = min(PEFT_ADAPTERS, max(c.workload.adapters for c in cases))
    peft_model = baselines.make_peft_loras(hf, n_peft, tmp / "peft")
    peft_model.to(device=args.device, dtype=args.dtype)
    blobs = {adapter_id(i): baselines.peft_zip(baselines.peft_dir(tmp / "peft", i))
             for i in range(n_peft)}
    stores = {}
    for kinds in sorted({c.workload.kinds for c in cases}):
        most = max(c.workload.adapters for c in cases if c.workload.kinds == kinds)
        stores[kinds] = LocalDirStore(tmp / f"store-{kinds}")
        fill_store(stores[kinds], model, Workload(adapters=most, kinds=kinds),
                   blobs if kinds == "lora" else None)
    merged_dir = baselines.merged_checkpoint(hf, baselines.peft_dir(tmp / "peft", 0),
                                             tmp / "merged")
    merged = build_backbone(merged_dir, device=args.device, dtype=args.dtype)
    ids = [adapter_id(i) for i in range(n_peft)]
    bank = baselines.compiled_bank(model, stores["lora"], ids)
    return Bench(name, model, merged, stores, peft_model, bank)


# ---- running -----------------------------------------------------------------------------
def drive(engine, requests, concurrency: int) -> tuple[list, float]:
    """Closed loop: keep ``concurrency`` requests (RequestSpecs, or InferenceRequests,
    ClassifyRequests and AudioRequests as they are) in flight; returns (results in order,
    seconds)."""
    from petserve.serving.audio_engine import AudioRequest
    from petserve.serving.engine import ClassifyRequest, InferenceRequest
    done: queue.SimpleQueue = queue.SimpleQueue()
    results, pending = [None] * len(requests), iter(enumerate(requests))

    def submit_next() -> bool:
        i, r = next(pending, (None, None))
        if r is None:
            return False
        if isinstance(r, ClassifyRequest):
            fut = engine.submit_classify(r)
        else:
            fut = engine.submit(r if isinstance(r, (InferenceRequest, AudioRequest)) else InferenceRequest(
                r.adapter, "vqa", r.text, max_new_tokens=r.max_new_tokens))
        fut.add_done_callback(lambda f, i=i: done.put((i, f)))
        return True

    t0 = time.perf_counter()
    inflight = sum(submit_next() for _ in range(concurrency))
    while inflight:
        i, f = done.get()
        results[i] = f.result()
        inflight += submit_next() - 1
    return results, time.perf_counter() - t0


def _delta(after: dict, before: dict, key: str) -> float:
    return after[key] - before[key]


def engine_metrics(results, before: dict, after: dict) -> dict:
    lat = np.array([r.timings_ms["total"] for r in results])
    wait = np.array([r.timings_ms["queue"] for r in results])
    pool_a, pool_b = after["slot_pool"], before["slot_pool"]
    hits, misses = _delta(pool_a, pool_b, "hits"), _delta(pool_a, pool_b, "misses")
    steps = _delta(after["adapters_per_step"], before["adapters_per_step"], "count")
    return {"latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p90": float(np.percentile(lat, 90)),
            "latency_ms_p99": float(np.percentile(lat, 99)),
            "queue_ms_p50": float(np.percentile(wait, 50)),
            "queue_ms_p99": float(np.percentile(wait, 99)),
            "slot_hit_rate": hits / max(1, hits + misses),
            "adapters_per_step_mean": _delta(after["adapters_per_step"],
                                             before["adapters_per_step"], "sum") / max(1, steps),
            "batch_rows_mean": _delta(after["batch_rows"], before["batch_rows"], "sum")
            / max(1, steps)}


def warm_up(requests, args) -> list:
    """One short request (one new token) per distinct adapter, first seen first: the CPU cache
    (what of them its byte budget holds) and the slots start as a running server's would."""
    first = {}
    for r in requests:
        first.setdefault(r.adapter, replace(r, max_new_tokens=1))
    return list(first.values()) + \
        [replace(r, max_new_tokens=1) for r in requests[:args.concurrency]]


def run_engine(model, store, requests, args) -> tuple[dict, list]:
    from petserve.serving.engine import Engine
    cfg = EngineConfig(num_slots=args.num_slots, cpu_cache_mib=args.cpu_cache_mib,
                       max_batch_rows=args.batch, max_queue=max(256, 2 * args.concurrency))
    engine = Engine(model, store, cfg)
    engine.start()
    try:
        drive(engine, warm_up(requests, args), args.concurrency)
        before, cpu = engine.stats(), time.process_time()
        results, elapsed = drive(engine, requests, args.concurrency)
        cpu, after = time.process_time() - cpu, engine.stats()
    finally:
        engine.stop()
    tokens = sum(len(r.tokens) for r in results)
    out = {"requests": len(results), "tokens": tokens, "elapsed_s": elapsed, "cpu_s": cpu,
           **engine_metrics(results, before, after)}
    return out, [r.tokens for r in results]


def run_case(case: Case, bench: Bench, args) -> dict:
    w = case.workload
    requests = make_requests(w, adapter=case.system not in ("backbone", "merged", "hf_backbone"))
    if case.system == "engine":
        out, tokens = run_engine(bench.model, bench.stores[w.kinds], requests, args)
        bench.results[("engine", w)] = tokens
    elif case.system in ("backbone", "merged"):
        model = bench.model if case.system == "backbone" else bench.merged
        out, _ = run_engine(model, bench.stores[w.kinds], requests, args)
    elif case.system in ("peft_mixed", "hf_backbone"):
        cpu = time.process_time()
        out = baselines.peft_mixed(bench.peft_model, bench.model, requests, args.batch)
        out["cpu_s"] = time.process_time() - cpu
        bench.results[(case.system, w)] = out.pop("outputs")
    else:
        slot_of = {adapter_id(i): i for i in range(bench.bank.num_slots)}
        cpu = time.process_time()
        out = baselines.per_adapter(bench.model, bench.bank, slot_of, requests, args.batch)
        out["cpu_s"] = time.process_time() - cpu
    out["requests_per_s"] = out["requests"] / out["elapsed_s"]
    out["requests_per_cpu_s"] = out["requests"] / out["cpu_s"]
    out["tokens_per_s"] = out["tokens"] / out["elapsed_s"]
    out["adapters_used"] = used_adapters(requests)
    return out


# ---- cases and summaries -----------------------------------------------------------------
def cases_for(name: str, args) -> list[Case]:
    """The engine sweep (uniform LoRAs over ``--adapters``; zipf and mixed kinds over the same
    sweep on tiny, at the acceptance count on t5-small, whose runs take ~40x longer) and the
    baselines on the acceptance workload (32 LoRAs, uniform); merged on its single-adapter twin."""
    base = Workload(requests=args.requests if name == "tiny" else args.requests_large,
                    max_new_tokens=args.max_new_tokens)
    acc = replace(base, adapters=args.acceptance_adapters)
    sweep = args.adapters if name == "tiny" else [a for a in args.adapters
                                                  if a <= args.large_adapters_cap]
    more = [a for a in sweep if a > 1] if name == "tiny" else [acc.adapters]
    engine = [replace(acc, popularity="single")] + [replace(base, adapters=a) for a in sweep]
    engine += [replace(base, popularity="zipf", adapters=a) for a in more]
    engine += [replace(base, kinds="mixed", adapters=a) for a in more]
    cases = [Case("engine", name, w) for w in dict.fromkeys(engine)]
    cases += [Case("peft_mixed", name, acc), Case("hf_backbone", name, acc),
              Case("per_adapter", name, acc), Case("backbone", name, acc),
              Case("merged", name, replace(acc, popularity="single"))]
    return cases


def median_row(case: Case, runs: list[dict], args) -> dict:
    metrics = {k: statistics.median(r[k] for r in runs) for k in runs[0]
               if isinstance(runs[0][k], (int, float))}
    metrics["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    metrics["load_avg_1m"] = os.getloadavg()[0]
    return {"setup": case.setup(args), "metrics": metrics, "device": device_name(),
            "commit": commit()}


def acceptance_row(name: str, rows: list[dict], cases: list[Case], bench: Bench, args) -> dict:
    """32 distinct LoRAs (uniform) vs one LoRA and vs PEFT, from the medians of this run."""
    acc = next(c.workload for c in cases if c.system == "peft_mixed")
    single = replace(acc, popularity="single")

    def median(system, w, key="requests_per_s"):
        return next(r["metrics"][key] for c, r in zip(cases, rows)
                    if (c.system, c.workload) == (system, w))
    ours, theirs = bench.results.get(("engine", acc)), bench.results.get(("peft_mixed", acc))
    metrics = {"outputs_equal_peft": sum(a == b for a, b in zip(ours, theirs)) / len(ours)}
    for key in ("requests_per_s", "requests_per_cpu_s"):
        mixed, one = median("engine", acc, key), median("engine", single, key)
        peft, hf = median("peft_mixed", acc, key), median("hf_backbone", acc, key)
        metrics.update({f"{key}_mixed": mixed, f"{key}_single": one, f"{key}_peft": peft,
                        f"{key}_hf_backbone": hf, f"{key}_backbone": median("backbone", acc, key),
                        f"ratio_vs_single_{key}": mixed / one,
                        f"ratio_vs_peft_{key}": mixed / peft})
    metrics["ratio_vs_single"] = metrics["ratio_vs_single_requests_per_s"]
    metrics["ratio_vs_peft"] = metrics["ratio_vs_peft_requests_per_s"]
    metrics["pass_vs_single"] = metrics["ratio_vs_single"] >= 0.8
    metrics["pass_vs_peft"] = metrics["ratio_vs_peft"] >= 2.0
    setup = {"bench": "engine_acceptance", "backbone": name, **acc.setup(),
             "threads": torch.get_num_threads(), "repeats": args.repeats}
    return {"setup": setup, "metrics": metrics, "device": device_name(), "commit": commit()}


def add_limits(rows: list[dict], cases: list[Case], bench: Bench, args) -> None:
    """Beside every engine row: its ratio to the backbone alone (measured on the acceptance
    workload's texts), the limit its adapters' FLOPs and bytes allow (benchmarks/limits.py,
    docs/PERFORMANCE.md) and how much of it the engine reached."""
    from petserve.benchmarks.limits import adapter_cost, encoder_params, limit_ratio, measure_rates
    backbone = next(r["metrics"]["requests_per_s"] for c, r in zip(cases, rows)
                    if c.system == "backbone")
    rates = measure_rates(args.dtype, args.device)
    enc_params, costs = encoder_params(bench.model), {}
    for case, row in zip(cases, rows):
        if case.system != "engine":
            continue
        requests = make_requests(case.workload)
        for r in requests:
            if r.adapter not in costs:
                costs[r.adapter] = adapter_cost(bench.stores[case.workload.kinds].read(r.adapter))
        enc_tokens = float(np.mean([len(bench.model.row_input("vqa", r.text, None).ids)
                                    for r in requests]))
        limit = limit_ratio(1.0 / backbone, costs, requests, enc_tokens,
                            min(args.batch, args.concurrency), rates, enc_params)
        ratio = row["metrics"]["requests_per_s"] / backbone
        row["metrics"].update({"ratio_vs_backbone": ratio, "limit": limit["limit"],
                               "of_limit": ratio / limit["limit"],
                               "adapter_s_limit": limit["adapter_s"],
                               "peak_flops": rates.flops_per_s, "bandwidth": rates.bytes_per_s})
        w = case.workload
        print(f"[{bench.name}] engine {w.popularity:<7} {w.kinds:<5} A={w.adapters:<4} "
              f"{ratio:.3f}x backbone, limit {limit['limit']:.3f} ({ratio / limit['limit']:.2f} "
              "of it)", flush=True)


def run_backbone(name: str, args, sink) -> None:
    cases = cases_for(name, args)
    with tempfile.TemporaryDirectory(prefix="petserve-bench-") as tmp:
        bench = build_bench(name, cases, args, Path(tmp))
        runs: dict[Case, list[dict]] = {c: [] for c in cases}
        for rep in range(args.repeats):
            for case in cases:
                runs[case].append(run_case(case, bench, args))
                print(f"[{name} rep {rep}] {case.system:<11} {case.workload.popularity:<7} "
                      f"{case.workload.kinds:<5} A={case.workload.adapters:<4} "
                      f"{runs[case][-1]['requests_per_s']:8.1f} req/s", flush=True)
        rows = [median_row(c, runs[c], args) for c in cases]
        add_limits(rows, cases, bench, args)
        rows.append(acceptance_row(name, rows, cases, bench, args))
        for row in rows:
            sink(row)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="tiny,t5-small")
    p.add_argument("--adapters", default="1,8,32,128,1000", help="engine sweep (t5-small: <= 128)")
    p.add_argument("--large-adapters-cap", type=int, default=128, help="largest adapter count of "
                   "the sweep on backbones other than tiny (a GPU takes 1000)")
    p.add_argument("--acceptance-adapters", type=int, default=32)
    p.add_argument("--requests", type=int, default=512, help="per run, tiny backbone")
    p.add_argument("--requests-large", type=int, default=128, help="per run, t5-small")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (closed loop)")
    p.add_argument("--batch", type=int, default=32, help="engine max_batch_rows = baseline batch")
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--cpu-cache-mib", type=float,
                   default=EngineConfig.model_fields["cpu_cache_mib"].default)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="tiny backbone, a few requests: seconds")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/engine_cpu.jsonl; --smoke: a temp file")
    args = p.parse_args(argv)
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-engine.jsonl"
                            if args.smoke else Path("benchmarks/results/engine_cpu.jsonl"))
    if args.smoke:
        args.backbones, args.adapters, args.acceptance_adapters = "tiny", "1,4", 4
        args.requests, args.max_new_tokens, args.concurrency, args.batch = 16, 4, 8, 8
        args.requests_large = 16
        args.repeats, args.num_slots = 1, 8
    args.adapters = [int(a) for a in str(args.adapters).split(",")]
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        def sink(row):
            f.write(json.dumps(row) + "\n")
            f.flush()
        for name in args.backbones.split(","):
            run_backbone(name, args, sink)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
