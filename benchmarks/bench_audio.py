"""The audio family on its engine: PETL-for-AST adapters mixed in one encoder pass.

Rows (``{"setup", "metrics", "device", "commit"}``):

* ``throughput``: a closed loop of /v1/audio/classify requests on the AudioEngine (each a fresh
  1 s wav: decoding, resampling and the filterbank included) on 1 adapter, or on the 3 demo
  adapters (conformer, LoRA, bottleneck: three configurations, three heads) mixed;
* ``step``: one encoder pass of ``--batch`` rows on the bare backbone, on 1 adapter and on the 3
  mixed (``AudioModel.classify``), the cost of mixing without the audio decoding.

Runs on the embedded default's tiny AST and demo adapters.
``python -m petserve.benchmarks.bench_audio`` writes benchmarks/results/audio_cpu.jsonl and its
plot; ``--smoke`` runs in seconds.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from petserve.benchmarks.bench_env import commit, device_name, save_figure, write_results

WORKLOADS = {"1 adapter": ("pitch",), "3 adapters mixed": ("pitch", "beeps", "timbre")}


def throughput_rows(engine, args) -> list[dict]:
    from petserve.adapters.data.audio import make_clips, wav_bytes
    from petserve.benchmarks.bench_engine import drive
    from petserve.serving.audio_engine import AudioRequest
    rows, rng = [], np.random.default_rng(0)
    for name, adapters in WORKLOADS.items():
        reqs = []
        for i in range(args.requests):
            task = adapters[i % len(adapters)]
            clips = make_clips(task, 1, 1000 + i).clips
            clip = clips[int(rng.integers(len(clips)))]
            reqs.append(AudioRequest(task, wav_bytes(clip)))
        drive(engine, reqs[:args.concurrency], args.concurrency)          # warm the slots
        results, elapsed = drive(engine, reqs, args.concurrency)
        lat = np.array([r.timings_ms["total"] for r in results])
        rows.append(row({"measure": "throughput", "workload": name, "requests": len(reqs),
                         "concurrency": args.concurrency},
                        {"requests_per_s": len(reqs) / elapsed,
                         "latency_ms_p50": float(np.percentile(lat, 50)),
                         "latency_ms_p90": float(np.percentile(lat, 90))}))
    return rows


def step_rows(engine, args) -> list[dict]:
    from petserve.adapters.runtime.context import StepContext
    from petserve.adapters.runtime.meta import BatchMeta
    model, pool = engine.model, engine.pool
    fbank = torch.randn(args.batch, model.cfg.max_length, model.cfg.num_mel_bins)
    slots = {name: [pool.acquire(a, engine.store.get(a).version, "audio_classify") for a in adapters]
             for name, adapters in WORKLOADS.items()}

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        return (time.perf_counter() - t0) * 1e3 / args.repeats
    with torch.inference_mode():
        out = {"backbone_ms": timed(lambda: model.pooled(
            fbank, StepContext.backbone_only(args.batch, model.device)))}
        for name, held in slots.items():
            rows_slots = [held[i % len(held)] for i in range(args.batch)]
            meta = BatchMeta.build(rows_slots, pool.num_slots, model.device)
            out[f"{name.split()[0]}_adapters_ms"] = timed(
                lambda m=meta: model.classify(fbank, StepContext(pool.bank, m)))
    for held in slots.values():
        for s in held:
            pool.release(s)
    return [row({"measure": "step", "rows": args.batch}, out)]


def row(setup: dict, metrics: dict) -> dict:
    return {"setup": {"bench": "audio", **setup}, "metrics": metrics, "device": device_name(),
            "commit": commit()}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tp = [r for r in rows if r["setup"]["measure"] == "throughput"]
    st = [r for r in rows if r["setup"]["measure"] == "step"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
    a.barh([r["setup"]["workload"] for r in tp], [r["metrics"]["requests_per_s"] for r in tp])
    a.set_xlabel("audio classify requests / s")
    a.set_title("AudioEngine throughput")
    if st:
        m = st[0]["metrics"]
        b.barh(list(m), list(m.values()))
        b.set_xlabel(f"ms per encoder pass of {st[0]['setup']['rows']} rows")
        b.set_title("mixing adapters in one pass")
    save_figure(fig, rows, png)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.batch, args.repeats = 6, 3, 4, 1
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-audio.jsonl"
                            if args.smoke else Path("benchmarks/results/audio_cpu.jsonl"))
    return args


def main(argv=None) -> int:
    from petserve.adapters.audio_demo import ensure_audio_assets
    from petserve.adapters.backbone.audio import build_audio_backbone
    from petserve.serving.audio_engine import AudioEngine
    from petserve.serving.engine import EngineConfig
    from petserve.serving.store import LocalDirStore
    from petserve.serving.uploads import prepare_upload
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = ensure_audio_assets(progress=False)
    model = build_audio_backbone(assets.backbone_dir)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalDirStore(Path(tmp) / "store")
        for task, path in assets.adapters.items():
            store.put(task, *prepare_upload(path.read_bytes(), model, 2**28, audio=model))
        engine = AudioEngine(model, store, EngineConfig(num_slots=4, max_batch_rows=args.batch, max_beams=1,
                                                        max_queue=max(256, 2 * args.concurrency)))
        engine.start()
        try:
            rows = throughput_rows(engine, args) + step_rows(engine, args)
        finally:
            engine.stop()
    write_results(rows, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
