"""Plot a bench_kernels JSONL: ms vs number of adapters, one panel per (op, popularity).

    python -m petserve.benchmarks.plot_kernels benchmarks/results/kernels.jsonl   # -> kernels.png beside it

Uses the ``adapters_t*`` sweeps when the file has them (else every row, e.g. a smoke run); one
line per implementation (triton / reference / loop) and token count.
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

# metrics key -> (label, colour); the token count picks the line style.
IMPLS = {"ms": ("triton", "C0"), "ms_reference": ("reference", "C1"), "ms_loop": ("loop", "C2")}
STYLES = ("-", "--", ":", "-.")


def load_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "popularity" in r["setup"]]  # drop summary rows
    sweep = [r for r in rows if r["setup"]["name"].startswith("adapters_t")]
    return sweep or rows


def series(rows: list[dict]) -> dict:
    """(op, popularity) -> (impl label, tokens) -> sorted [(adapters, ms)]."""
    out = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s, m = r["setup"], r["metrics"]
        for key, (label, _) in IMPLS.items():
            if m.get(key) is not None:
                line = out[(s["op"], s["popularity"])][(label, s["tokens"])]
                line.append((s["adapters"], m[key]))
    return {panel: {k: sorted(v) for k, v in lines.items()} for panel, lines in out.items()}


def plot(rows: list[dict], png: Path) -> None:
    data = series(rows)
    ops = sorted({op for op, _ in data})
    pops = sorted({pop for _, pop in data})
    fig, axes = plt.subplots(len(ops), len(pops), figsize=(4 * len(pops), 3.2 * len(ops)),
                             squeeze=False)
    colours = dict(IMPLS.values())
    token_counts = sorted({r["setup"]["tokens"] for r in rows})
    for i, op in enumerate(ops):
        for j, pop in enumerate(pops):
            ax = axes[i][j]
            for (label, tokens), pts in sorted(data.get((op, pop), {}).items()):
                xs, ys = zip(*pts)
                style = STYLES[token_counts.index(tokens) % len(STYLES)]
                ax.plot(xs, ys, style, color=colours[label], marker="o", ms=3,
                        label=f"{label} t={tokens}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} / {pop}", fontsize=9)
            ax.set_xlabel("adapters")
            ax.set_ylabel("ms")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    device = rows[0].get("device", "") if rows else ""
    fig.suptitle(f"grouped adapter ops: {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="plot a bench_kernels JSONL")
    p.add_argument("jsonl", type=Path)
    p.add_argument("--png", type=Path, default=None, help="default: the JSONL's path with .png")
    args = p.parse_args(argv)
    rows = load_rows(args.jsonl)
    if not rows:
        print(f"plot_kernels: no plottable rows in {args.jsonl}", file=sys.stderr)
        return 1
    png = args.png or args.jsonl.with_suffix(".png")
    plot(rows, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
