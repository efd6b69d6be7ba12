"""``petserve import-seed``: a VL-Adapter / VL-PET checkpoint -> a backbone directory and adapters.

    petserve import-seed CHECKPOINT.pth --repo vl-pet --arch vl-t5 --config T5_DIR --out DIR \\
        [--tokenizer DIR] [--encoder_gating_scaling_factor 0.3 ...]

Extra ``--name value`` pairs are the seed CLI's method options that the checkpoint's keys cannot
tell (adapters/seed_keys.py ``OPTIONS``). Writes DIR/backbone and DIR/adapters/<task>.safetensors,
then prints one JSON line ``{"backbone", "adapters": [{"path", "task", "kind",
"trainable_parameters"}], "keys_total", "keys_consumed"}``. Any problem is one error line, exit 2,
and nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

from petserve.serving.cli import CliError
from petserve.serving.commands.options import parse_pairs


def register(sub) -> None:
    p = sub.add_parser(
        "import-seed", allow_abbrev=False,
        help="import a VL-Adapter / VL-PET checkpoint (backbone + one adapter per task)",
        description="Read a checkpoint saved by VL-Adapter's or VL-PET's public code (torch.save of "
                    "the model's state dict) and write DIR/backbone plus DIR/adapters/<task>.safetensors. "
                    "Extra --name value pairs are the seed CLI's method options the keys cannot tell "
                    "(e.g. --encoder_gating_scaling_factor 0.3 for the released VL-PET T5 scripts).")
    p.add_argument("checkpoint", type=Path, help="the .pth file (DDP's module. prefix is fine)")
    p.add_argument("--repo", required=True, choices=("vl-adapter", "vl-pet"), help="which code saved it")
    p.add_argument("--arch", required=True, choices=("vl-t5", "vl-bart"))
    p.add_argument("--config", type=Path, default=None,
                   help="the language model's Hugging Face config.json, or its directory")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (default: the --config directory)")
    p.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    p.set_defaults(run=run, accepts_extra=True)


def run(args, extra: list[str]) -> int:
    from petserve.adapters.seed_import import (
        ARCHS,
        SeedImportError,
        import_checkpoint,
        read_checkpoint,
        read_hf_config,
        write_import,
    )
    options = parse_pairs(extra, "seed options")        # names checked by import_checkpoint
    try:
        hf_config, config_dir = read_hf_config(args.config, ARCHS[args.arch])
        state = read_checkpoint(args.checkpoint)
        result = import_checkpoint(state, args.arch, args.repo, hf_config,
                                   args.tokenizer or config_dir, options, name=args.out.name)
        written = write_import(result, args.out)
    except SeedImportError as e:
        raise CliError(str(e)) from None
    print(json.dumps({"backbone": str(written.backbone), "adapters": written.adapters,
                      "keys_total": result.keys_total, "keys_consumed": result.keys_consumed}))
    return 0
