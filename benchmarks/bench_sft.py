"""Composable sparse fine-tuning on the engine: what serving sparse deltas costs.

Rows (``{"setup", "metrics", "device", "commit"}``, one per measurement):

* ``throughput``: 32 sft adapters at 1% density (every language-model linear) with requests spread
  uniformly over them, vs one sft adapter for every request, vs the bare backbone; closed loop,
  greedy (benchmarks/bench_engine.py's driver).
* ``composite``: the time to compose 2 / 4 / 8 sft adapters into one slot's forms.
* ``memory``: bytes per adapter (its file, and its forms in a slot) vs a dense copy of the
  weights it changes.

``python -m petserve.benchmarks.bench_sft`` writes benchmarks/results/sft_cpu.jsonl and its plot;
``--smoke`` runs in seconds.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from petserve.benchmarks.bench_env import commit, device_name, save_figure, write_results
from petserve.benchmarks.workloads import Workload, make_requests, serving_backbone
from petserve.serving.server_config import EngineConfig


def sft_entries(model, density: float) -> dict[str, int]:
    from petserve.adapters.kinds.sft import targets
    return {n: max(1, int(density * math.prod(shape))) for n, (what, _, shape) in targets(model).items()
            if what == "linear"}


def sft_bytes(model, entries: dict[str, int], seed: int) -> bytes:
    from petserve.adapters.adapter_file import adapter_bytes
    from petserve.adapters.kinds import get_kind
    kind = get_kind("sft")
    cfg = kind.Config(entries=entries)
    params = kind.init_params(cfg, model, seed)
    g = torch.Generator().manual_seed(20_000 + seed)
    params = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in params.items()}
    return adapter_bytes("sft", cfg, params, model, "vqa", name=f"bench-sft-{seed}")


def fill(store, model, n: int, density: float) -> list[str]:
    from petserve.serving.uploads import prepare_upload
    entries = sft_entries(model, density)
    ids = []
    for i in range(n):
        blob, meta = prepare_upload(sft_bytes(model, entries, i), model, max_bytes=1 << 30)
        store.put(f"s{i:04d}", blob, meta)
        ids.append(f"s{i:04d}")
    return ids


def throughput_rows(model, store, args) -> list[dict]:
    from petserve.benchmarks.bench_engine import run_engine
    w = Workload(popularity="uniform", adapters=args.adapters, requests=args.requests,
                 max_new_tokens=args.max_new_tokens)
    base = make_requests(w)
    systems = {
        f"{args.adapters} sft adapters": [replace(r, adapter=f"s{int(r.adapter[1:]):04d}") for r in base],
        "one sft adapter": [replace(r, adapter="s0000") for r in base],
        "bare backbone": [replace(r, adapter=None) for r in base],
    }
    rows = []
    for system, requests in systems.items():
        out, _ = run_engine(model, store, requests, args)
        out["requests_per_s"] = out["requests"] / out["elapsed_s"]
        out["tokens_per_s"] = out["tokens"] / out["elapsed_s"]
        rows.append(row({"measure": "throughput", "system": system, "density": args.density,
                         "adapters": args.adapters, "requests": args.requests,
                         "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency,
                         "batch": args.batch}, out))
    return rows


def composite_rows(model, store, args) -> list[dict]:
    from petserve.adapters.runtime.compose import compose
    from petserve.serving.slot_pool import compile_on_cpu, parse_stored
    forms = [compile_on_cpu(parse_stored(store.read(f"s{i:04d}", 1), model), model, None)
             for i in range(max(args.members))]
    rows = []
    for n in args.members:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            compose([(f"s{i}", forms[i]) for i in range(n)], model)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(row({"measure": "composite", "members": n, "density": args.density},
                        {"compose_ms": sorted(times)[len(times) // 2]}))
    return rows


def memory_row(model, store, args) -> dict:
    from petserve.adapters.kinds.sft import targets
    from petserve.serving.slot_pool import compile_on_cpu, parse_stored
    stored = store.get("s0000")
    forms = compile_on_cpu(parse_stored(store.read("s0000", 1), model), model, None)
    in_slot = sum(f.rows.numel() * 8 + f.cols.numel() * 8 + f.vals.numel() * 4
                  for f in forms.sparse.values())
    dense = sum(math.prod(shape) * 4 for what, _, shape in targets(model).values() if what == "linear")
    return row({"measure": "memory", "density": args.density},
               {"file_bytes": stored.size, "slot_bytes": in_slot, "dense_copy_bytes": dense,
                "file_vs_dense": stored.size / dense, "slot_vs_dense": in_slot / dense})


def row(setup: dict, metrics: dict) -> dict:
    return {"setup": {"bench": "sft", **setup}, "metrics": metrics, "device": device_name(),
            "commit": commit()}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    thr = [r for r in rows if r["setup"]["measure"] == "throughput"]
    comp = [r for r in rows if r["setup"]["measure"] == "composite"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.barh([r["setup"]["system"] for r in thr], [r["metrics"]["tokens_per_s"] for r in thr])
    a.set_xlabel("tokens / s")
    a.set_title(f"sft at {thr[0]['setup']['density']:.0%} density" if thr else "")
    b.plot([r["setup"]["members"] for r in comp], [r["metrics"]["compose_ms"] for r in comp], "o-")
    b.set_xlabel("members")
    b.set_ylabel("compose ms")
    b.set_title("composite compile time")
    save_figure(fig, rows, png)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--cpu-cache-mib", type=float,
                   default=EngineConfig.model_fields["cpu_cache_mib"].default)
    p.add_argument("--members", default="2,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.adapters, args.requests, args.max_new_tokens, args.concurrency = 4, 12, 3, 8
        args.batch, args.num_slots, args.members, args.repeats = 8, 8, "2", 1
    args.members = [int(m) for m in str(args.members).split(",")]
    args.out = args.out or (Path(tempfile.gettempdir()) / "petserve-smoke-sft.jsonl" if args.smoke
                            else Path("benchmarks/results/sft_cpu.jsonl"))
    return args


def main(argv=None) -> int:
    from petserve.adapters.backbone import build_backbone
    from petserve.serving.store import LocalDirStore
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.backbone if args.backbone == "tiny" else serving_backbone(args.backbone, Path(tmp))
        model = build_backbone(spec)
        store = LocalDirStore(Path(tmp) / "store")
        fill(store, model, max(args.adapters, max(args.members)), args.density)
        rows = throughput_rows(model, store, args) + composite_rows(model, store, args) + \
            [memory_row(model, store, args)]
        for r in rows:
            r["setup"]["backbone"] = args.backbone
    write_results(rows, args.out, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
