"""Cold load of an adapter: from its file in the store to a device slot ready to serve.

    python -m petserve.benchmarks.bench_load [--backbone t5-base] [--kind lora] [--rank 16] [--loads 32]
                                    [--smoke] [--out benchmarks/results/load_cpu.jsonl]

Issue target (GPU, T5-base width): a rank-16 LoRA loads from disk into a device slot in < 20 ms.
Each load goes through the serving path (``SlotPool.acquire``: store read, parse and validate,
compile, copy into the slot bank) for an adapter in neither the CPU cache nor a slot. Before each
load the file's pages are dropped from the OS page cache (``posix_fadvise(DONTNEED)``, no root
needed), so the read comes from the disk. Rows: ``{"setup", "metrics", "device", "commit"}`` with
p50 / p90 / max of the whole load and the mean of each phase; a PNG of the per-load phases beside
the JSONL.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from petserve.benchmarks.bench_env import commit, device_name
from petserve.benchmarks.workloads import random_adapter_bytes

PHASES = ("read_ms", "compile_ms", "copy_ms")


def drop_page_cache(path: Path) -> bool:
    """Evict ``path``'s clean pages from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def options(kind: str, rank: int) -> dict:
    if kind == "lora":       # the case: LoRA on q and v only, no biases
        return {"r": rank, "alpha": 2 * rank, "train_biases": False,
                "train_visual_embedding": False}
    return {"train_visual_embedding": False}


def measure(model, store, ids: list[str], evict: bool) -> list[dict]:
    """One cold load per id, through a 2-slot pool that caches one parsed file on the CPU: each
    id is read from the store and written into a slot another adapter held."""
    from petserve.serving.slot_pool import SlotPool
    pool = SlotPool(model, store, num_slots=2, cpu_cache_bytes=1, cpu_cache_adapters=1)
    cuda = model.device.type == "cuda"
    loads, evicted = [], True
    for aid in ids:
        if evict:
            evicted &= drop_page_cache(store.path(aid))
        before = pool.counters()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        slot = pool.acquire(aid, store.get(aid).version, "vqa")
        if cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
        pool.release(slot)
        after = pool.counters()
        assert after["store_reads"] == before["store_reads"] + 1, "not a cold load"
        loads.append({"total_ms": total, "page_cache_dropped": evict and evicted,
                      **{p: after[f"{p}_sum"] - before[f"{p}_sum"] for p in PHASES}})
    return loads


def run(args) -> dict:
    from petserve.adapters.backbone import build_backbone
    from petserve.serving.store import LocalDirStore
    from petserve.serving.uploads import prepare_upload
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_backbone(args.backbone, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="petserve-load-", dir=args.store_parent) as tmp:
        store = LocalDirStore(Path(tmp))
        ids = [f"load{i:04d}" for i in range(args.loads + args.warmup)]
        for i, aid in enumerate(ids):
            blob, meta = prepare_upload(random_adapter_bytes(
                model, args.kind, options(args.kind, args.rank), seed=i), model, 1 << 30)
            store.put(aid, blob, meta)
        size = store.path(ids[0]).stat().st_size
        measure(model, store, ids[:args.warmup], args.evict)          # first-call costs
        loads = measure(model, store, ids[args.warmup:], args.evict)
    totals = sorted(x["total_ms"] for x in loads)
    metrics = {"load_ms_p50": statistics.median(totals),
               "load_ms_p90": totals[min(len(totals) - 1, int(0.9 * len(totals)))],
               "load_ms_max": totals[-1], "file_bytes": size,
               "page_cache_dropped": all(x["page_cache_dropped"] for x in loads),
               **{f"{p}_mean": statistics.mean(x[p] for x in loads) for p in PHASES},
               "loads": loads, "target_ms": 20.0}
    metrics["pass_p50"] = metrics["load_ms_p50"] < 20.0
    setup = {"bench": "cold_load", "backbone": args.backbone, "kind": args.kind, "rank": args.rank,
             "loads": args.loads, "dtype": str(dtype), "threads": torch.get_num_threads()}
    return {"setup": setup, "metrics": metrics, "device": device_name(), "commit": commit()}


def plot(row: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loads = row["metrics"]["loads"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(loads)
    for phase in PHASES:
        values = [x[phase] for x in loads]
        ax.bar(range(len(loads)), values, bottom=bottom, label=phase.removesuffix("_ms"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.axhline(row["metrics"]["target_ms"], color="red", linestyle="--", label="target")
    s = row["setup"]
    ax.set(xlabel="load", ylabel="ms", title=f"cold load: {s['kind']} r{s['rank']} on "
           f"{s['backbone']} ({row['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="t5-base")
    p.add_argument("--kind", default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--loads", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--no-evict", dest="evict", action="store_false",
                   help="keep the files in the page cache")
    p.add_argument("--store-parent", default=None, help="where the temporary store lives")
    p.add_argument("--smoke", action="store_true", help="tiny backbone, a few loads: seconds")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.loads, args.warmup = "tiny", 4, 1
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-load.jsonl"
                            if args.smoke else Path("benchmarks/results/load_cpu.jsonl"))
    if not torch.cuda.is_available() and args.threads:
        torch.set_num_threads(args.threads)
    row = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row) + "\n")
    plot(row, args.out.with_suffix(".png"))
    m = row["metrics"]
    print(f"{row['setup']['kind']} r{args.rank} on {args.backbone} ({row['device']}): cold load p50 "
          f"{m['load_ms_p50']:.1f} ms, p90 {m['load_ms_p90']:.1f}, max {m['load_ms_max']:.1f} "
          f"(read {m['read_ms_mean']:.1f} + compile {m['compile_ms_mean']:.1f} + copy "
          f"{m['copy_ms_mean']:.1f}); {m['file_bytes']} bytes; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
