"""Benchmark the grouped adapter ops: Triton vs the torch reference vs a per-adapter masked loop.

    python -m petserve.benchmarks.bench_kernels [--smoke] [--out benchmarks/results/kernels.jsonl]

Writes one JSON line per setup: ``{"setup": {...}, "metrics": {"ms", "ms_reference", "ms_loop",
"speedup_vs_loop", "gbps", "roofline_frac", ...}, "device": ..., "commit": ...}``. The full grid
needs CUDA (CUDA-event timing); on CPU only ``--smoke`` runs: a few tiny setups through the
reference, the loop and, under TRITON_INTERPRET=1, the Triton path (wall clock; the numbers only
show the harness works). Plot with ``python -m petserve.benchmarks.plot_kernels <jsonl>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from petserve.kernels.bottleneck import act, bottleneck_residual_reference
from petserve.kernels.lowrank import add_lowrank_loop, add_lowrank_reference
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import GATE_NAMES, BottleneckStack, LowRankStack

PEAK_BYTES_PER_S = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12}  # first match wins
WIDTH = 768  # d_model of T5-base and BART-base
MAX_LOOP_WORK = 1 << 21  # adapters x tokens above which the loop baseline is skipped (minutes)


@dataclasses.dataclass(frozen=True)
class Setup:
    """One measured configuration. rank: an int, or "mixed8-64" / "mixed8-128" (per adapter)."""

    op: str
    name: str
    tokens: int
    adapters: int
    rank: int | str
    popularity: str
    d_in: int = WIDTH
    d_out: int = WIDTH
    dtype: str = "float16"
    gate: str = "none"


# ----------------------------------------------------------------------------- inputs
def request_slots(setup: Setup, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """One adapter per request; B = min(tokens, 256) requests of tokens / B tokens each."""
    rows = min(setup.tokens, 256)
    a = setup.adapters
    if setup.popularity == "identical":
        slots = torch.zeros(rows, dtype=torch.int64)
    elif setup.popularity == "distinct":  # round robin: every request a different adapter
        slots = torch.arange(rows) % a
    elif setup.popularity == "uniform":
        slots = torch.randint(a, (rows,), generator=gen)
    elif setup.popularity == "zipf":
        probs = 1.0 / torch.arange(1, a + 1, dtype=torch.float64) ** 1.1
        slots = torch.multinomial(probs, rows, replacement=True, generator=gen)
    else:
        raise ValueError(setup.popularity)
    return slots, setup.tokens // rows


def adapter_ranks(setup: Setup, gen: torch.Generator) -> list[int]:
    if isinstance(setup.rank, int):
        return [setup.rank] * setup.adapters
    top = int(setup.rank.split("-")[1])
    choices = [r for r in (8, 16, 32, 64, 128) if r <= top]
    return [choices[i] for i in torch.randint(len(choices), (setup.adapters,), generator=gen)]


def build_case(setup: Setup, device: str) -> dict:
    """Random tensors, stack and SegmentMeta for one setup."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, setup.dtype)
    row_slots, per_row = request_slots(setup, gen)
    seg = SegmentMeta.from_rows(row_slots.to(device), per_row)
    ranks = adapter_ranks(setup, gen)
    big, s = max(ranks), setup.adapters

    def t(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device, dtype)

    if setup.op == "add_lowrank":
        w = LowRankStack(t(s, big, setup.d_in, std=setup.d_in ** -0.5),
                         t(s, setup.d_out, big, std=big ** -0.5),
                         t(s), torch.tensor(ranks, dtype=torch.int32, device=device), ranks)
        return {"seg": seg, "w": w, "x": t(setup.tokens, setup.d_in),
                "y": t(setup.tokens, setup.d_out)}
    d, kind = setup.d_in, GATE_NAMES[setup.gate]
    w = BottleneckStack(t(s, big, d, std=d ** -0.5), t(s, big), t(s, d, big, std=big ** -0.5),
                        t(s, d),
                        torch.tensor(ranks, dtype=torch.int32, device=device), ranks,
                        [i % 2 == 0 for i in range(s)], [kind] * s, t(s),
                        gate_w=t(s, 2 * d, std=d ** -0.5), gate_b=t(s), gate_vec=t(s, d),
                        gate_D=t(s, 16, d, std=d ** -0.5), gate_bd=t(s, 16), gate_U=t(s, d, 16),
                        gate_bu=t(s, d), gate_ranks_host=[16] * s)
    return {"seg": seg, "w": w, "x": t(setup.tokens, d), "h": t(setup.tokens, d)}


# ----------------------------------------------------------------------------- baselines
def bottleneck_loop(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack,
                    seg: SegmentMeta) -> torch.Tensor:
    """Baseline: every adapter over the whole batch, then a masked select (PEFT's way)."""
    out = h.clone()
    for s in seg.slots:
        r = w.ranks_host[s]
        if r == 0:
            continue
        src = x if w.from_input_host[s] else h
        hp = h + act(src @ w.D[s, :r].T + w.bd[s, :r]) @ w.U[s, :, :r].T + w.bu[s]
        mask = seg.token_slots == s
        gate = _loop_gate(w, s, x, hp, seg, mask)
        res = (hp if gate is None else gate * hp) * w.out_scale[s]
        out = torch.where(mask.unsqueeze(1), res, out)
    return out


def _loop_gate(w, s, x, hp, seg, mask):
    d, kind = hp.shape[1], w.gate_host[s]
    if kind == GATE_NAMES["none"]:
        return None
    if kind == GATE_NAMES["middleY"]:
        return 1.0 + w.gate_vec[s]
    if kind == GATE_NAMES["middleX"]:
        return torch.sigmoid((x + hp) @ w.gate_w[s, :d] + w.gate_b[s]).unsqueeze(1)
    if kind == GATE_NAMES["large"]:
        rg = w.gate_ranks_host[s]
        z = act(x @ w.gate_D[s, :rg].T + w.gate_bd[s, :rg])
        return torch.sigmoid(z @ w.gate_U[s, :, :rg].T + w.gate_bu[s])
    g = torch.sigmoid(x @ w.gate_w[s, :d] + hp @ w.gate_w[s, d:] + w.gate_b[s])
    weight = mask.to(g.dtype)
    if seg.token_valid is not None and seg.token_rows is not None:
        weight = weight * seg.token_valid.to(g.dtype)
    if seg.token_rows is None:
        return ((g * weight).sum() / weight.sum().clamp_min(1.0)).expand_as(g).unsqueeze(1)
    total = g.new_zeros(seg.num_rows).index_add(0, seg.token_rows, g * weight)
    count = g.new_zeros(seg.num_rows).index_add(0, seg.token_rows, weight).clamp_min(1.0)
    return (total / count).index_select(0, seg.token_rows).unsqueeze(1)


def op_paths(setup: Setup, case: dict, with_triton: bool) -> dict:
    """name -> zero-argument callable running that implementation on the case."""
    seg, w = case["seg"], case["w"]
    if setup.op == "add_lowrank":
        x, y = case["x"], case["y"]
        paths = {"reference": lambda: add_lowrank_reference(y, x, w, seg),
                 "loop": lambda: add_lowrank_loop(y, x, w, seg)}
        if with_triton:
            from petserve.kernels.triton_lowrank import add_lowrank_triton
            paths["triton"] = lambda: add_lowrank_triton(y, x, w, seg)
        return paths
    h, x = case["h"], case["x"]
    paths = {"reference": lambda: bottleneck_residual_reference(h, x, w, seg),
             "loop": lambda: bottleneck_loop(h, x, w, seg)}
    if with_triton:
        from petserve.kernels.triton_bottleneck import bottleneck_residual_triton
        paths["triton"] = lambda: bottleneck_residual_triton(h, x, w, seg)
    return paths


# ----------------------------------------------------------------------------- measuring
def time_ms(fn, cuda: bool, samples: int) -> float:
    """Median ms per call; calls are batched so each sample lasts >= ~2 ms (CUDA events on GPU:
    host launch gaps count, as they do in an eager forward)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up: Triton compiles, caches fill
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    reps = max(1, min(200, int(2e-3 / max(time.perf_counter() - t0, 1e-7))))
    out = []
    for _ in range(samples):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            sync()
            out.append(start.elapsed_time(end) / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) * 1e3 / reps)
    return statistics.median(out)


def bytes_moved(setup: Setup, case: dict) -> int:
    """Bytes the op must move at least: activations once, weights of the adapters used once."""
    seg, w = case["seg"], case["w"]
    el = getattr(torch, setup.dtype).itemsize
    used = set(seg.slots)
    n = setup.tokens
    if setup.op == "add_lowrank":  # x read, y read + written, A and B of the used slots
        return el * (n * setup.d_in + 2 * n * setup.d_out
                     + sum(w.ranks_host[s] * (setup.d_in + setup.d_out) for s in used))
    d = setup.d_in
    needs_x = setup.gate != "none" or any(w.from_input_host[s] for s in used)
    acts = n * d * (3 if needs_x else 2)  # h (and x) read, out written
    gate = {"none": 0, "small": 2 * d + 1, "middleX": d + 1, "middleY": d}.get(setup.gate)
    weights = sum(w.ranks_host[s] * (2 * d + 1) + d + 1  # D, bd, U, bu, out_scale
                  + (gate if gate is not None else w.gate_ranks_host[s] * (2 * d + 1) + d)
                  for s in used)
    return el * (acts + weights)


def peak_bandwidth(device_name: str) -> float | None:
    for key, peak in PEAK_BYTES_PER_S.items():
        if all(part in device_name for part in key.split()):
            return peak
    return None


def max_err(setup: Setup, case: dict, paths: dict) -> dict:
    """Max |impl - reference| on a fresh copy of the inputs (smoke runs check correctness too)."""
    errs = {}
    for name in ("triton", "loop"):
        if name not in paths:
            continue
        if setup.op == "add_lowrank":
            y0 = case["y"].clone()
            ref = add_lowrank_reference(y0.clone(), case["x"], case["w"], case["seg"])
            case["y"].copy_(y0)
            got = paths[name]().clone()
            case["y"].copy_(y0)
        else:
            ref, got = paths["reference"](), paths[name]()
        errs[f"max_err_{name}"] = (got.float() - ref.float()).abs().max().item()
    return errs


def measure(setup: Setup, device: str, with_triton: bool, samples: int, check: bool) -> dict:
    case = build_case(setup, device)
    paths = op_paths(setup, case, with_triton)
    cuda = device == "cuda"
    metrics = {"ms": None, "ms_reference": time_ms(paths["reference"], cuda, samples),
               "ms_loop": None}
    if "triton" in paths:
        metrics["ms"] = time_ms(paths["triton"], cuda, samples)
    if setup.adapters * setup.tokens <= MAX_LOOP_WORK:
        metrics["ms_loop"] = time_ms(paths["loop"], cuda, samples)
    ms = metrics["ms"]
    metrics["speedup_vs_loop"] = metrics["ms_loop"] / ms if ms and metrics["ms_loop"] else None
    metrics["speedup_vs_reference"] = metrics["ms_reference"] / ms if ms else None
    metrics["bytes"] = bytes_moved(setup, case)
    metrics["gbps"] = metrics["bytes"] / (ms * 1e6) if ms else None
    peak = peak_bandwidth(device_name()) if cuda else None
    metrics["roofline_frac"] = metrics["gbps"] * 1e9 / peak if peak and ms else None
    if check:
        metrics.update(max_err(setup, case, paths))
    return metrics


# ----------------------------------------------------------------------------- setups
def full_grid() -> list[Setup]:
    """Sweeps (not a full product, which would take hours): adapters x popularity at a decode
    and a prefill size, tokens x ranks, the FFN widths, and the bottleneck's gates."""
    out = []
    for op in ("add_lowrank", "bottleneck_residual"):
        for tokens in (64, 2048):
            for pop in ("identical", "uniform", "zipf", "distinct"):
                for a in (1, 4, 16, 64, 256, 1024):
                    out.append(Setup(op, f"adapters_t{tokens}", tokens, a, 16, pop))
        for tokens in (1, 16, 256, 1024, 4096, 8192):
            for rank in (8, 16, 64, 128, "mixed8-64", "mixed8-128"):
                out.append(Setup(op, "tokens_ranks", tokens, 64, rank, "uniform"))
    for d_in, d_out in ((WIDTH, 3072), (3072, WIDTH)):
        for tokens, a in ((64, 64), (8192, 128)):
            out.append(Setup("add_lowrank", "ffn_width", tokens, a, 16, "uniform", d_in, d_out))
    for gate in GATE_NAMES:
        for tokens in (64, 2048):
            out.append(Setup("bottleneck_residual", "gates", tokens, 64, 16, "uniform", gate=gate))
    return out


def target_setups() -> list[Setup]:
    """The issue's checks at T5-base width: (a) decode 64 tokens x 64 distinct adapters, rank 16,
    vs one adapter and vs the loop; (b) prefill 8192 tokens x 128 adapters, ranks 8-64 mixed."""
    return [Setup("add_lowrank", "target_a_distinct", 64, 64, 16, "distinct"),
            Setup("add_lowrank", "target_a_single", 64, 1, 16, "identical"),
            Setup("add_lowrank", "target_b_prefill", 8192, 128, "mixed8-64", "distinct")]


def smoke_grid() -> list[Setup]:
    small = {"d_in": 64, "d_out": 64, "dtype": "float32"}
    return [Setup("add_lowrank", "smoke", 16, 4, 16, "uniform", **small),
            Setup("add_lowrank", "smoke", 32, 8, "mixed8-64", "zipf", **small),
            Setup("bottleneck_residual", "smoke", 16, 4, 16, "distinct", gate="large", **small),
            Setup("bottleneck_residual", "smoke", 32, 4, 8, "uniform", gate="small", **small)]


# ----------------------------------------------------------------------------- driver
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def target_summary(rows: list[dict], dtype: str = "float16") -> dict | None:
    """Target (a) as one row: distinct-adapter decode vs the single-adapter call and the loop."""
    by_name = {r["setup"]["name"]: r["metrics"] for r in rows if r["setup"]["dtype"] == dtype}
    dist, single = by_name.get("target_a_distinct"), by_name.get("target_a_single")
    if not dist or not single or not dist["ms"] or not single["ms"]:
        return None
    return {"name": "target_a_decode", "op": "add_lowrank", "tokens": 64, "adapters": 64,
            "rank": 16, "d_in": WIDTH, "d_out": WIDTH, "dtype": dtype}, {
        "ms": dist["ms"], "ms_single_adapter": single["ms"],
        "ratio_vs_single": dist["ms"] / single["ms"], "speedup_vs_loop": dist["speedup_vs_loop"]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few tiny setups (CPU-friendly, < 30 s)")
    p.add_argument("--out", default="benchmarks/results/kernels.jsonl", help="JSONL to write")
    p.add_argument("--samples", type=int, default=None, help="timing samples per path")
    p.add_argument("--dtypes", default=None, help="comma list (float16,bfloat16,float32): run "
                   "every setup in each, side by side (default: each setup's own, float16)")
    p.add_argument("--time-budget", type=float, default=None, help="seconds: start no setup "
                   "after this much time (benchmarks/gpu_run.sh keeps to its 8 minutes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_kernels: no CUDA device. The full grid needs a GPU; on CPU run "
              "`TRITON_INTERPRET=1 python -m petserve.benchmarks.bench_kernels --smoke`.", file=sys.stderr)
        return 2
    with_triton = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if not with_triton:
        print("bench_kernels: Triton path skipped (on CPU it needs TRITON_INTERPRET=1)",
              file=sys.stderr)
    setups = smoke_grid() if args.smoke else target_setups() + full_grid()
    if args.dtypes:
        setups = [dataclasses.replace(s, dtype=d) for s in setups for d in args.dtypes.split(",")]
    started = time.monotonic()
    samples = args.samples or (2 if args.smoke else 5)
    dev, name, commit = ("cuda" if cuda else "cpu"), device_name(), git_commit()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with out.open("w") as f:
        for done, setup in enumerate(setups):
            if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                print(f"bench_kernels: time budget of {args.time_budget:.0f} s spent; "
                      f"{len(setups) - done} of {len(setups)} setups not run", file=sys.stderr)
                break
            metrics = measure(setup, dev, with_triton, samples, check=args.smoke)
            rows.append({"setup": dataclasses.asdict(setup), "metrics": metrics,
                         "device": name, "commit": commit})
            f.write(json.dumps(rows[-1]) + "\n")
            f.flush()
            print(_line(rows[-1]))
        for dtype in dict.fromkeys(r["setup"]["dtype"] for r in rows):
            summary = target_summary(rows, dtype)
            if summary:
                rows.append({"setup": summary[0], "metrics": summary[1], "device": name,
                             "commit": commit})
                f.write(json.dumps(rows[-1]) + "\n")
                print(_line(rows[-1]))
    print(f"wrote {len(rows)} rows to {out}")
    return 0


def _line(row: dict) -> str:
    s, m = row["setup"], row["metrics"]
    fmt = (lambda v: "-" if v is None else f"{v:.4g}")
    keys = ("ms", "ms_reference", "ms_loop", "speedup_vs_loop", "gbps", "roofline_frac",
            "ratio_vs_single", "max_err_triton")
    return (f"{s['op']:<20} {s['name']:<18} t={s['tokens']:<5} a={s['adapters']:<5} "
            f"r={s['rank']!s:<10} {s.get('popularity', ''):<9} "
            + " ".join(f"{k}={fmt(m[k])}" for k in keys if k in m))


if __name__ == "__main__":
    sys.exit(main())
