"""What every benchmark row records about where and from what it ran."""
from __future__ import annotations

import platform
import subprocess

import torch


def device_name() -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} x{torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(rows: list[dict], out, plot) -> None:
    """Write ``rows`` as JSON lines to ``out``, ``plot(rows, png)`` beside it, and print them."""
    import json
    from pathlib import Path
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, out.with_suffix(".png"))
    for r in rows:
        print(json.dumps({**r["setup"], **r["metrics"]}))
    print(f"wrote {out}")


def save_figure(fig, rows: list[dict], png) -> None:
    """Title ``fig`` with the rows' device, lay it out, save it to ``png`` and close it."""
    import matplotlib.pyplot as plt
    fig.suptitle(rows[0]["device"] if rows else "")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
