"""CapS classification on the engine: classify rows in the scheduler's batches.

Rows (``{"setup", "metrics", "device", "commit"}``):

* ``throughput``: a closed loop of classify requests (fresh images: the vision tower runs for each)
  over 1 or 32 cache adapters mixed, alone or with as many VQA requests beside them (the ``colors``
  demo adapter, 4 new tokens) sharing the scheduler, the vision tower and the feature cache;
* ``grouped``: one pass of ``--rows`` rows over 32 cache heads: ``caps.grouped_logits`` (batched
  matmuls over the rows' heads) against a loop over the heads (``caps.logits`` per head).

Runs on the embedded default (its ``caps-24`` and variants of it: 32 heads of 12-24 classes).
``python -m petserve.benchmarks.bench_classify`` writes benchmarks/results/classify_cpu.jsonl and
its plot; ``--smoke`` runs in seconds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from petserve.benchmarks.bench_env import commit, device_name, save_figure, write_results


def variant_heads(head, n: int) -> list:
    """``n`` cache heads from ``head``: each a random subset (12-24) of its classes."""
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        classes = sorted(rng.choice(head.num_classes, rng.integers(12, head.num_classes + 1),
                                    replace=False).tolist())
        out.append(head.restricted(classes))
    return out


def throughput_rows(engine, args) -> list[dict]:
    from petserve.adapters.caps_demo import shifted_split
    from petserve.benchmarks.bench_engine import drive
    from petserve.serving.engine_io import ClassifyRequest, InferenceRequest
    rng, rows, seed = np.random.default_rng(1), [], 31337
    for caches in (1, 32):
        for traffic in ("classify", "classify + vqa"):
            seed += 1                                    # fresh images: the vision tower runs
            images = shifted_split(args.requests // 24 + 1, seed).images
            order = rng.permutation(len(images))[:args.requests]
            reqs = [ClassifyRequest(f"cache-{rng.integers(caches):02d}", None, images[i], 5)
                    for i in order]
            if traffic != "classify":
                vqa = [InferenceRequest("colors", "vqa", "what color is the shape?", [images[i]],
                                        max_new_tokens=4) for i in rng.permutation(len(images))
                       [:args.requests]]
                reqs = [r for pair in zip(reqs, vqa) for r in pair]
            results, elapsed = drive(engine, reqs, args.concurrency)
            lat = np.array([r.timings_ms["total"] for r in results if hasattr(r, "label")])
            n_cls = len(lat)
            rows.append(row({"measure": "throughput", "caches": caches, "traffic": traffic,
                             "requests": len(reqs), "concurrency": args.concurrency},
                            {"classify_per_s": n_cls / elapsed,
                             "vqa_per_s": (len(reqs) - n_cls) / elapsed,
                             "classify_latency_ms_p50": float(np.percentile(lat, 50)),
                             "classify_latency_ms_p90": float(np.percentile(lat, 90))}))
    return rows


def grouped_rows(heads, args) -> list[dict]:
    from petserve.adapters.caps import CacheStack, grouped_logits, logits
    f = torch.nn.functional.normalize(torch.randn(args.rows, heads[0].text.shape[1]), dim=-1)
    slots = torch.arange(args.rows) % len(heads)

    def grouped():
        return grouped_logits(f, CacheStack.of(heads), slots)

    def loop():
        return [logits(f[slots == s], h) for s, h in enumerate(heads)]
    out = {}
    for name, fn in (("grouped", grouped), ("loop", loop)):
        fn()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        out[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3 / args.repeats
    return [row({"measure": "grouped", "rows": args.rows, "caches": len(heads)}, out)]


def row(setup: dict, metrics: dict) -> dict:
    return {"setup": {"bench": "classify", **setup}, "metrics": metrics, "device": device_name(),
            "commit": commit()}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tp = [r for r in rows if r["setup"]["measure"] == "throughput"]
    gr = [r for r in rows if r["setup"]["measure"] == "grouped"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.barh([f"{r['setup']['caches']} caches, {r['setup']['traffic']}" for r in tp],
           [r["metrics"]["classify_per_s"] for r in tp])
    a.set_xlabel("classify requests / s")
    a.set_title("classify throughput")
    if gr:
        m = gr[0]["metrics"]
        b.barh(["grouped_logits", "loop over heads"], [m["grouped_ms"], m["loop_ms"]])
        b.set_xlabel(f"ms for {gr[0]['setup']['rows']} rows on {gr[0]['setup']['caches']} heads")
        b.set_title("many cache heads in one pass")
    save_figure(fig, rows, png)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.batch, args.rows, args.repeats = 8, 4, 8, 8, 2
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-classify.jsonl"
                            if args.smoke else Path("benchmarks/results/classify_cpu.jsonl"))
    return args


def main(argv=None) -> int:
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.cache_file import cache_bytes, load_cache
    from petserve.adapters.caps_demo import CACHE_ID
    from petserve.adapters.clip_towers import load_towers
    from petserve.adapters.demo import ensure_demo_assets
    from petserve.serving.engine import Engine, EngineConfig
    from petserve.serving.store import LocalDirStore
    from petserve.serving.uploads import prepare_upload
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = ensure_demo_assets(progress=False)
    model = build_backbone(assets.backbone_dir)
    towers = load_towers(assets.clip_text, model)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalDirStore(Path(tmp) / "store")
        cfg = EngineConfig(num_slots=4, max_batch_rows=args.batch,
                           max_queue=max(256, 2 * args.concurrency))
        engine = Engine(model, store, cfg, towers=towers)
        head = load_cache(assets.caches[CACHE_ID].read_bytes(), engine.clip_identity,
                          towers.cfg.projection_dim)[0]
        heads = variant_heads(head, 32)
        for k, h in enumerate(heads):
            store.put(f"cache-{k:02d}", *prepare_upload(cache_bytes(h, engine.clip_identity),
                                                        model, 1 << 30, towers=towers))
        store.put("colors", *prepare_upload(assets.adapters["colors"].read_bytes(), model, 1 << 30))
        engine.start()
        try:
            with torch.inference_mode():
                rows = throughput_rows(engine, args) + grouped_rows(heads, args)
        finally:
            engine.stop()
    for r in rows:
        r["setup"]["backbone"] = "demo"
    write_results(rows, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
