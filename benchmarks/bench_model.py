"""Model-level cost of mixed adapters: one decoder step at batch B, backbone alone vs. B rows over
N distinct adapters (issue target (c): LoRA on q and v of every layer, 64 distinct adapters, batch 64,
T5-base width: <= 15% over the backbone-only step).

    python -m petserve.benchmarks.bench_model [--backbone t5-base] [--batch 64] [--adapters 64] [--rank 16]
                                     [--kind lora] [--smoke] [--out benchmarks/results/model.jsonl]

Writes one JSONL row per configuration: {"setup", "metrics", "device", "commit"}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.model import RowInput
from petserve.adapters.kinds import get_kind
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.benchmarks.bench_env import commit, device_name


def _timed(fn, device, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs (after 3 warm-up runs)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def _decode_step_ms(model, bank, slots, enc_len: int, history: int, iters: int) -> float:
    return _timed(decode_step_fn(model, bank, slots, enc_len, history), model.device, iters)


def decode_step_fn(model, bank, slots, enc_len: int, history: int):
    """One decoder step of ``len(slots)`` rows (row i on adapter ``slots[i]``, -1: none) after an
    encoder pass of ``enc_len`` tokens and ``history`` decoded ones, as a callable."""
    device, B = model.device, len(slots)
    rows = [RowInput(list(range(5, 5 + enc_len)), None) for _ in range(B)]
    ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, device))
    with torch.inference_mode():
        enc, valid = model.encode(rows, ctx)
        cache = model.init_cache(enc, valid, ctx)
        ids = torch.full((B, history), 7, device=device)
        model.decode(ids, torch.arange(history, device=device).expand(B, history), cache, ctx)
        tok = torch.full((B, 1), 7, device=device)
        pos = torch.full((B, 1), history, device=device)

    def step():
        with torch.inference_mode():
            c = cache.select(torch.arange(B, device=device))   # fresh copy: the step appends
            model.decode(tok, pos, c, ctx)
    return step


def prefill_fn(model, bank, slots, enc_len: int):
    """The prefill of ``len(slots)`` rows (row i on adapter ``slots[i]``, -1: none) of
    ``enc_len`` prompt tokens each: the encoder pass and the decoder's cross-attention cache, as
    a callable."""
    rows = [RowInput(list(range(5, 5 + enc_len)), None) for _ in slots]

    def step():
        with torch.inference_mode():
            ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, model.device))
            enc, valid = model.encode(rows, ctx)
            model.init_cache(enc, valid, ctx)
    return step


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_backbone(args.backbone, device=device, dtype=dtype)
    kind = get_kind(args.kind)
    options = {"r": args.rank, "train_biases": False, "train_visual_embedding": False} \
        if args.kind == "lora" else {}
    cfg = kind.resolve(kind.Config(**options), model)
    bank = SlotBank(model, args.adapters)
    for s in range(args.adapters):
        params = kind.init_params(cfg, model, seed=s)
        params = {k: v + 0.01 * torch.randn_like(v) for k, v in params.items()}
        bank.set(s, kind.compile(cfg, params, model))
    B = args.batch
    base = _decode_step_ms(model, SlotBank(model, 1), [-1] * B, args.enc_len, args.history, args.iters)
    mixed = _decode_step_ms(model, bank, [i % args.adapters for i in range(B)], args.enc_len,
                            args.history, args.iters)
    one = _decode_step_ms(model, bank, [0] * B, args.enc_len, args.history, args.iters)
    setup = {"bench": "model_decode_step", "backbone": args.backbone, "kind": args.kind,
             "rank": args.rank, "batch": B, "adapters": args.adapters, "dtype": str(dtype)}
    metrics = {"ms_backbone": base, "ms_one_adapter": one, "ms_mixed": mixed,
               "overhead_mixed": mixed / base - 1.0, "overhead_one": one / base - 1.0}
    return [{"setup": setup, "metrics": metrics, "device": device_name(), "commit": commit()}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="t5-base")
    p.add_argument("--kind", default="lora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--enc-len", type=int, default=60)
    p.add_argument("--history", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny backbone, seconds, for CI")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.batch, args.adapters, args.rank, args.iters = "tiny", 8, 4, 4, 3
    rows = run(args)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
