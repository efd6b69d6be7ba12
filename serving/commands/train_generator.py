"""``petserve train-generator``: meta-train a Generative Adapter generator on the demo task family.

    petserve train-generator --out generator.safetensors [--backbone demo] [--steps 600] [--r 8]
                             [--alpha 2r] [--norm frobenius|svd] [--pairing same|next|both]
                             [--style-mixed 0.5] [--relabel 0.0] [--seed 0] [--threads N]
                             [--score-n 60] [--score-draws 3]

Trains on every attribute x style combination but the held-out ones (adapters/training/
generator_training.py: HELD_OUT), then scores the held-out ones on fresh queries (own context of 8
demonstrations, another task's context, bare backbone; the mean of --score-draws draws) and prints
one JSON line. Errors are one line, exit 2, nothing written.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from petserve.serving.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("train-generator", help="meta-train a Generative Adapter generator",
                       description="Meta-train a generator (context -> LoRA in one pass) on the demo "
                                   "task family, holding out some combinations, and score them.")
    p.add_argument("--out", type=Path, required=True, help="generator file to write (.safetensors)")
    p.add_argument("--backbone", default="demo", help="demo (the embedded default), a preset or a "
                   "directory (default demo)")
    p.add_argument("--steps", type=int, default=600, help="meta-training updates (default 600)")
    p.add_argument("--r", type=int, default=8, help="rank of the generated LoRAs (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA scale numerator: the generated adapters scale "
                   "by alpha / r (default 2 r, as the embedded default)")
    p.add_argument("--norm", choices=("frobenius", "svd"), default="frobenius",
                   help="normalisation of S (default frobenius)")
    p.add_argument("--pairing", choices=("same", "next", "both"), default="same",
                   help="on decoder-token sites, pair each token's key with its own value (same, "
                        "the paper's), the next token's (next) or both (default same)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--style-mixed", type=float, default=0.5, help="share of meta-training tasks "
                   "whose demonstrations and queries mix the attributes of one answer style "
                   "(default 0.5, the embedded default's recipe)")
    p.add_argument("--relabel", type=float, default=0.0, help="share of relabelled tasks (an "
                   "attribute answered in random words the context shows) at the first update, "
                   "falling linearly to 0 (the embedded default's recipe: 0.6)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and task draws (default 0)")
    p.add_argument("--score-n", type=int, default=60, help="fresh queries per held-out "
                   "combination and draw (default 60)")
    p.add_argument("--score-draws", type=int, default=3, help="independent draws of a context "
                   "of 8 demonstrations and its queries that the scores average (default 3)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: every core; "
                   "the demo build trains on 1, and only the same count gives the same file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args, extra) -> int:
    import torch

    from petserve.serving.commands.train import load_backbone
    for flag in ("steps", "r", "score_n", "score_draws", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        raise CliError("--lr must be positive")
    for flag in ("style_mixed", "relabel"):
        if not 0 <= getattr(args, flag) <= 1:
            raise CliError(f"--{flag.replace('_', '-')} must be between 0 and 1")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or before)
    try:
        return _train(args, load_backbone(args.backbone, args.quiet))
    finally:
        torch.set_num_threads(before)


def _train(args, model) -> int:
    from petserve.adapters.generative import GeneratorConfig
    from petserve.adapters.training.generator_training import (
        GeneratorTrainConfig,
        generator_scores,
        task_family,
        train_generator,
    )
    """Train, save and score the generator the flags ask for, on ``model``."""
    if model.vision is None:
        raise CliError("--backbone: the demo task family needs a backbone with a vision encoder")
    if args.alpha is not None and args.alpha <= 0:
        raise CliError("--alpha must be positive")
    gcfg = GeneratorConfig(r=args.r, alpha=2.0 * args.r if args.alpha is None else args.alpha,
                           norm=args.norm, pairing=args.pairing)
    tc = GeneratorTrainConfig(steps=args.steps, lr=args.lr, style_mixed=args.style_mixed,
                              relabel=args.relabel, seed=args.seed, progress=not args.quiet)
    gen, history = train_generator(model, gcfg, tc)
    gen.save(args.out, name=args.out.stem)
    _, held = task_family(tc.held_out)
    scores = generator_scores(model, gen, held, n=args.score_n, draws=args.score_draws)
    print(json.dumps({"out": str(args.out), "steps": args.steps, "loss": history.losses[-1],
                      "held_out": [f"{a}/{s}" for a, s in held], **asdict(scores)}))
    return 0
