"""Where one decode step's and one prefill's time goes: the backbone alone, 1 LoRA, 32 LoRAs,
32 mixed kinds.

    python -m petserve.benchmarks.profile_step [--backbone tiny|t5-small|DIR] [--batch 32]
                                               [--threads 1]
                                               [--phase decode|prefill|both]

For each setup: the pass's median wall time, and torch.profiler's ops by self CPU time, grouped
(matmuls, the adapters' gathers and index copies, elementwise, allocation and views, the rest),
as the markdown tables docs/PERFORMANCE.md shows. The passes are benchmarks/bench_model's: a
decode step over a prefilled cache, and a prefill (encoder + cross-attention cache) of the same
rows.
"""
from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from petserve.adapters.backbone import build_backbone
from petserve.adapters.kinds import get_kind
from petserve.adapters.runtime.bank import SlotBank
from petserve.benchmarks.bench_model import _timed, decode_step_fn, prefill_fn
from petserve.benchmarks.workloads import BACKBONES, LORA, MIXED, hf_t5_checkpoint

GROUPS = {   # op name fragment -> group, first match wins
    "addmm": "matmul", "mm": "matmul", "bmm": "matmul", "matmul": "matmul", "linear": "matmul",
    "baddbmm": "matmul", "index": "gather / index", "gather": "gather / index",
    "scatter": "gather / index", "take": "gather / index", "embedding": "gather / index",
    "nonzero": "gather / index", "select": "views / allocation", "empty": "views / allocation",
    "view": "views / allocation", "reshape": "views / allocation", "copy": "copies",
    "cat": "copies", "stack": "copies", "clone": "copies", "contiguous": "copies",
    "to": "copies", "softmax": "elementwise", "mul": "elementwise", "add": "elementwise",
    "rsqrt": "elementwise", "pow": "elementwise", "mean": "elementwise", "relu": "elementwise",
    "gelu": "elementwise", "sigmoid": "elementwise", "tanh": "elementwise", "where": "elementwise",
    "masked": "elementwise", "sum": "elementwise", "div": "elementwise", "sub": "elementwise",
}


def group_of(op: str) -> str:
    name = op.removeprefix("aten::")
    for fragment, group in GROUPS.items():
        if fragment in name:
            return group
    return "other"


def bank_for(model, setup: str, batch: int) -> tuple[SlotBank, list[int]]:
    if setup == "bare":
        return SlotBank(model, 1), [-1] * batch
    kinds = [LORA] if setup != "32 mixed" else list(MIXED)
    n = 1 if setup == "1 LoRA" else 32
    bank = SlotBank(model, n)
    for s in range(n):
        name, options = kinds[s % len(kinds)]
        kind = get_kind(name)
        cfg = kind.resolve(kind.Config(**options), model)
        params = kind.init_params(cfg, model, seed=s)
        bank.set(s, kind.compile(cfg, {k: v + 0.01 * torch.randn_like(v) for k, v in
                                       params.items()}, model))
    return bank, [i % n for i in range(batch)]


def profile_setup(model, setup: str, phase: str, args) -> dict:
    bank, slots = bank_for(model, setup, args.batch)
    step = decode_step_fn(model, bank, slots, args.enc_len, args.history) if phase == "decode" \
        else prefill_fn(model, bank, slots, args.enc_len)
    ms = _timed(step, model.device, args.iters)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.iters):
            step()
    groups: dict[str, float] = defaultdict(float)
    calls = 0
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            groups[group_of(event.key)] += event.self_cpu_time_total / args.iters / 1e3
            calls += event.count
    return {"setup": setup, "ms": ms, "groups": dict(groups), "ops_per_step": calls / args.iters}


def table(backbone: str, phase: str, rows: list[dict]) -> str:
    names = ["matmul", "gather / index", "copies", "elementwise", "views / allocation", "other"]
    out = [f"| {backbone} {phase} | ms | aten ops | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        out.append(f"| {r['setup']} | {r['ms']:.2f} | {r['ops_per_step']:.0f} | "
                   + " | ".join(f"{r['groups'].get(n, 0.0):.2f}" for n in names) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--enc-len", type=int, default=12)
    p.add_argument("--history", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--phase", choices=("decode", "prefill", "both"), default="both")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        model = build_backbone(args.backbone)
    except FileNotFoundError:
        if args.backbone not in BACKBONES:
            raise
        model = build_backbone(hf_t5_checkpoint(args.backbone, Path(tempfile.mkdtemp())))
    for phase in ("decode", "prefill") if args.phase == "both" else (args.phase,):
        rows = [profile_setup(model, s, phase, args)
                for s in ("bare", "1 LoRA", "32 LoRAs", "32 mixed")]
        print(table(args.backbone, phase, rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
