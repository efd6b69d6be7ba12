"""Generative Adapter on the engine: what turning a context into an adapter costs.

Rows (``{"setup", "metrics", "device", "commit"}``):

* ``latency``: one context of 1 / 8 / 32 demonstrations (fresh images: vision included) from
  submission to its LoRA, through the scheduler (median of ``--repeats``);
* ``batched``: 8 contexts of 8 demonstrations submitted together (they share backbone passes);
* ``load``: a closed loop of VQA requests over ``--contexts`` tasks, each request naming a stored
  generated adapter, carrying the same context inline (generated once, then from the slot pool), or
  carrying a fresh context every time (generation on every request).

Runs on the embedded default (its shipped generator). ``python -m petserve.benchmarks.bench_generator``
writes benchmarks/results/generator_cpu.jsonl and its plot; ``--smoke`` runs in seconds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from petserve.benchmarks.bench_env import commit, device_name, save_figure, write_results


def demonstrations(n: int, seed: int):
    from petserve.adapters.data import make_demo_examples
    from petserve.serving.engine_io import ContextInput
    return [ContextInput(question=e.text, answer=e.target, image=e.images[0])
            for e in make_demo_examples("colors", n, seed)]


def make_engine(model, store, generator, args):
    from petserve.serving.engine import Engine, EngineConfig
    cfg = EngineConfig(num_slots=args.num_slots, max_batch_rows=args.batch,
                       max_queue=max(256, 2 * args.concurrency))
    engine = Engine(model, store, cfg, generator, "demo-generator")
    engine.start()
    return engine


def latency_rows(engine, args) -> list[dict]:
    rows, seed = [], 1000
    for n in args.demos:
        times = []
        for _ in range(args.repeats):
            seed += 1
            ctx = demonstrations(n, seed)
            t0 = time.perf_counter()
            engine.submit_context(ctx)[0].result()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(row({"measure": "latency", "demonstrations": n, "contexts": 1},
                        {"generate_ms": float(np.median(times))}))
    times = []
    for _ in range(args.repeats):
        contexts = [demonstrations(8, seed + 100 + k) for k in range(8)]
        seed += 100
        t0 = time.perf_counter()
        futures = [engine.submit_context(c)[0] for c in contexts]
        for f in futures:
            f.result()
        times.append((time.perf_counter() - t0) * 1e3)
    total = float(np.median(times))
    rows.append(row({"measure": "batched", "demonstrations": 8, "contexts": 8},
                    {"generate_ms": total, "per_context_ms": total / 8}))
    return rows


def load_rows(engine, backend_store, args) -> list[dict]:
    import asyncio

    from petserve.benchmarks.bench_engine import drive
    from petserve.serving.engine_io import InferenceRequest
    from petserve.serving.uploads import prepare_upload
    contexts = [demonstrations(8, 5000 + k) for k in range(args.contexts)]
    for k, ctx in enumerate(contexts):
        data = asyncio.run(engine.generated_adapter(ctx, name=f"g{k}"))
        blob, meta = prepare_upload(data, engine.model, max_bytes=1 << 30)
        backend_store.put(f"g{k:03d}", blob, meta)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.requests, 4, engine.model.cfg.vision.feat_dim)).astype(np.float32)
    which = rng.integers(0, args.contexts, args.requests)

    def ask(i, **kw):
        return InferenceRequest(task="vqa", text="what color is the shape?", features=feats[i],
                                max_new_tokens=args.max_new_tokens, **kw)
    systems = {
        "stored generated adapter": [ask(i, adapter=f"g{which[i]:03d}") for i in range(args.requests)],
        "inline context (same contexts)": [ask(i, adapter=None, context=contexts[which[i]])
                                           for i in range(args.requests)],
        "inline context (fresh every request)": [
            ask(i, adapter=None, context=demonstrations(8, 90_000 + i)) for i in range(args.requests)],
    }
    rows = []
    for system, requests in systems.items():
        results, elapsed = drive(engine, requests, args.concurrency)
        lat = np.array([r.timings_ms["total"] for r in results])
        rows.append(row({"measure": "load", "system": system, "contexts": args.contexts,
                         "requests": args.requests, "concurrency": args.concurrency},
                        {"requests_per_s": len(results) / elapsed,
                         "latency_ms_p50": float(np.percentile(lat, 50)),
                         "latency_ms_p90": float(np.percentile(lat, 90))}))
    return rows


def row(setup: dict, metrics: dict) -> dict:
    return {"setup": {"bench": "generator", **setup}, "metrics": metrics, "device": device_name(),
            "commit": commit()}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lat = [r for r in rows if r["setup"]["measure"] in ("latency", "batched")]
    load = [r for r in rows if r["setup"]["measure"] == "load"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    labels = [f"{r['setup']['contexts']} x {r['setup']['demonstrations']} demos" for r in lat]
    a.barh(labels, [r["metrics"]["generate_ms"] for r in lat])
    a.set_xlabel("ms to the generated LoRA")
    a.set_title("generation latency")
    b.barh([r["setup"]["system"] for r in load], [r["metrics"]["requests_per_s"] for r in load])
    b.set_xlabel("requests / s")
    b.set_title("VQA under load")
    save_figure(fig, rows, png)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demos", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--contexts", type=int, default=8)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-slots", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.demos, args.repeats, args.contexts, args.requests = "1,4", 1, 2, 8
        args.concurrency, args.batch, args.num_slots = 4, 8, 4
    args.demos = [int(d) for d in str(args.demos).split(",")]
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-generator.jsonl"
                            if args.smoke else Path("benchmarks/results/generator_cpu.jsonl"))
    return args


def main(argv=None) -> int:
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.demo import ensure_demo_assets
    from petserve.adapters.generative import load_generator
    from petserve.serving.store import LocalDirStore
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = ensure_demo_assets(progress=False)
    model = build_backbone(assets.backbone_dir)
    generator = load_generator(assets.generator, model)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalDirStore(Path(tmp) / "store")
        engine = make_engine(model, store, generator, args)
        try:
            rows = latency_rows(engine, args) + load_rows(engine, store, args)
        finally:
            engine.stop()
    for r in rows:
        r["setup"]["backbone"] = "demo"
    write_results(rows, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
