"""Plot bench_serving / bench_engine JSONL files; the PNGs go beside each file.

    python -m petserve.benchmarks.plot_serving benchmarks/results/engine_cpu.jsonl \\
                                      benchmarks/results/serving_cpu.jsonl

* ``<name>.png``: throughput (requests/s) against the number of adapters, one line per
  (popularity, kinds), one panel per backbone; engine files also mark the baselines measured on
  the acceptance workload (PEFT mixed batch, Hugging Face backbone, one adapter at a time,
  merged weights, backbone alone).
* ``<name>_latency_cdf.png`` (serving files with open-loop rows): client latency CDF per offered
  rate, and the closed-loop runs' at the acceptance adapter count.

``--table`` prints instead the README's markdown table of the key figures of the given files.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BASELINES = {"peft_mixed": ("PEFT mixed batch", "s"), "hf_backbone": ("HF backbone alone", "v"),
             "per_adapter": ("one adapter at a time", "D"), "merged": ("merged (1 LoRA)", "^"),
             "backbone": ("our backbone alone", "*")}


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sweep_lines(rows: list[dict]) -> dict:
    """backbone -> (popularity, kinds) -> sorted [(adapters, requests/s)] of the sweep rows."""
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s = r["setup"]
        if s.get("system", "engine") != "engine" or s.get("mode", "closed") != "closed" \
                or s["bench"] not in ("engine", "serving"):
            continue
        label = "single (1 of N)" if s["popularity"] == "single" else s["popularity"]
        if s.get("server") == "ray":
            label += ", Ray Serve"
        key = (label, s["kinds"])
        out[s["backbone"]][key].append((s["adapters"], r["metrics"]["requests_per_s"]))
    return {b: {k: sorted(v) for k, v in lines.items()} for b, lines in out.items()}


def baseline_points(rows: list[dict]) -> dict:
    """backbone -> (system, server) -> (adapters, requests/s)."""
    out = defaultdict(dict)
    for r in rows:
        s = r["setup"]
        if s.get("system") in BASELINES:
            key = (s["system"], s.get("server", ""))
            out[s["backbone"]][key] = (s["adapters"], r["metrics"]["requests_per_s"])
    return out


def plot_throughput(rows: list[dict], png: Path) -> None:
    lines, points = sweep_lines(rows), baseline_points(rows)
    backbones = list(lines)                      # in the file's order
    fig, axes = plt.subplots(1, len(backbones), figsize=(5.5 * len(backbones), 4), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        for (pop, kinds), pts in sorted(lines[b].items()):
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=4, ls="-" if len(xs) > 1 else "",
                    label=f"{pop}, {kinds}")
        for (system, server), (x, y) in sorted(points.get(b, {}).items()):
            label, marker = BASELINES[system]
            ray = server == "ray"
            ax.plot([x], [y], marker=marker, ms=8, ls="", color="tab:red" if ray else "k",
                    alpha=0.6, label=label + (", Ray Serve" if ray else ""))
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("adapters in the workload")
        ax.set_ylabel("requests/s")
        ax.set_title(f"{rows[0]['setup']['bench']}: {b}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"throughput vs adapters: {rows[0].get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_latency_cdf(rows: list[dict], png: Path) -> bool:
    curves = []
    for r in rows:
        s, m = r["setup"], r["metrics"]
        if s["bench"] != "serving" or "latency_ms_quantiles" not in m:
            continue
        if s["mode"] == "open":
            curves.append((f"open loop {s['rate']:.0f} req/s offered", m["latency_ms_quantiles"]))
        elif s["popularity"] == "uniform" and s["kinds"] == "lora" and s["adapters"] == 32:
            curves.append((f"closed loop, {s['concurrency']} clients", m["latency_ms_quantiles"]))
    if not any(label.startswith("open") for label, _ in curves):
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, q in curves:
        ax.plot(q, [i / 100 for i in range(len(q))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, client side)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"latency CDF, 32 LoRAs uniform: {rows[0].get('device', '')}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def engine_table(rows: list[dict]) -> list[str]:
    out = ["| backbone | workload | system | req/s | x backbone / limit | tokens/s | p50 ms | "
           "p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["setup"], r["metrics"]
        if s["bench"] == "engine_acceptance":
            out.append(f"| {s['backbone']} | {s['adapters']} LoRAs uniform | **ratios** | "
                       f"vs one LoRA **{m['ratio_vs_single']:.2f}** (>= 0.8), vs PEFT "
                       f"**{m['ratio_vs_peft']:.2f}** (>= 2) | | | | |")
        elif s["system"] != "engine" or s["adapters"] in (1, 32, 1000):
            work = f"{s['adapters']} {s['kinds']}, {s['popularity']}"
            limit = f"{m['ratio_vs_backbone']:.2f} / {m['limit']:.2f}" if "limit" in m else ""
            out.append(f"| {s['backbone']} | {work} | {s['system']} | "
                       f"{_fmt(m['requests_per_s'])} | {limit} | {_fmt(m['tokens_per_s'])} | "
                       f"{_fmt(m.get('latency_ms_p50'))} | {_fmt(m.get('latency_ms_p99'))} |")
    return out


def serving_table(rows: list[dict]) -> list[str]:
    out = ["| HTTP load | workload | req/s | tokens/s | p50 ms | p99 ms | queued p50 ms | "
           "slot hit rate |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["setup"], r["metrics"]
        load = f"{s['concurrency']} clients" if s["mode"] == "closed" else \
            f"Poisson {s['rate']:.0f}/s"
        if s.get("server") == "ray":
            load += ", Ray Serve"
        bare = s.get("system") == "backbone"
        workload = "backbone alone" if bare else f"{s['adapters']} {s['kinds']}, {s['popularity']}"
        out.append(f"| {load} | {workload} | "
                   f"{_fmt(m['requests_per_s'])} | {_fmt(m['tokens_per_s'])} | "
                   f"{_fmt(m['latency_ms_p50'])} | {_fmt(m['latency_ms_p99'])} | "
                   f"{_fmt(m['queue_ms_p50'])} | {'-' if bare else _fmt(m['slot_hit_rate'], 2)} |")
    return out


def load_table(rows: list[dict]) -> list[str]:
    out = ["| cold load | file MB | p50 ms | p90 ms | max ms | read + compile + copy ms (mean) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["setup"], r["metrics"]
        phases = " + ".join(_fmt(m[f"{p}_ms_mean"]) for p in ("read", "compile", "copy"))
        out.append(f"| {s['kind']} r{s['rank']} on {s['backbone']} | {m['file_bytes'] / 1e6:.1f} | "
                   f"{_fmt(m['load_ms_p50'])} | {_fmt(m['load_ms_p90'])} | "
                   f"{_fmt(m['load_ms_max'])} | {phases} |")
    return out


def sft_table(rows: list[dict]) -> list[str]:
    """bench_sft: throughput of sft adapters, composite compile time, memory vs a dense copy."""
    out = ["| sft measure | system | figure |", "|---|---|---|"]
    for r in rows:
        s, m = r["setup"], r["metrics"]
        if s["measure"] == "throughput":
            out.append(f"| throughput, {s['density']:.0%} density, {s['backbone']} | {s['system']} | "
                       f"{_fmt(m['requests_per_s'])} req/s, {_fmt(m['tokens_per_s'])} tokens/s, "
                       f"p50 {_fmt(m['latency_ms_p50'])} ms |")
        elif s["measure"] == "composite":
            out.append(f"| composite compile | {s['members']} members | {_fmt(m['compose_ms'])} ms |")
        else:
            out.append(f"| memory per adapter | file / slot vs dense copy | "
                       f"{m['file_vs_dense']:.1%} / {m['slot_vs_dense']:.1%} of "
                       f"{m['dense_copy_bytes'] / 1e6:.1f} MB |")
    return out


def print_table(paths: list[Path]) -> None:
    """The README tables of engine, HTTP (bench_serving), cold-load (bench_load) and sft
    (bench_sft) results."""
    tables = {"cold_load": load_table, "sft": sft_table}
    for path in paths:
        rows = load_rows(path)
        bench = rows[0]["setup"].get("bench", "")
        table = engine_table if bench.startswith("engine") else tables.get(bench, serving_table)
        print(f"\n{path} ({rows[0]['device']}, commit {rows[0]['commit']}):\n")
        print("\n".join(table(rows)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="plot bench_serving / bench_engine JSONL files")
    p.add_argument("jsonl", type=Path, nargs="+")
    p.add_argument("--table", action="store_true", help="print the README table, plot nothing")
    args = p.parse_args(argv)
    if args.table:
        print_table(args.jsonl)
        return 0
    for path in args.jsonl:
        rows = load_rows(path)
        if not sweep_lines(rows):
            print(f"plot_serving: no throughput rows in {path}", file=sys.stderr)
            return 1
        plot_throughput(rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
        cdf = path.with_name(path.stem + "_latency_cdf.png")
        if plot_latency_cdf(rows, cdf):
            print(f"wrote {cdf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
