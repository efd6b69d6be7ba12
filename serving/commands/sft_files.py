"""``petserve import-sft`` / ``export-sft``: composable-sft's ``pytorch_diff.bin`` <-> an sft adapter.

    petserve import-sft pytorch_diff.bin --backbone DIR --out lang-fr.safetensors [--task caption]
    petserve export-sft lang-fr.safetensors --backbone DIR --out pytorch_diff.bin

Both check the file against the backbone (names, shapes, indices); a round trip is exact
(adapters/sft_format.py). Errors are one line, exit 2, nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

from petserve.adapters.tasks import TASK_NAMES
from petserve.serving.cli import CliError


def register(sub) -> None:
    p = sub.add_parser("import-sft", help="composable-sft's pytorch_diff.bin -> an sft adapter file",
                       description="Read a pytorch_diff.bin saved by composable-sft (diffs + abs) and "
                                   "write it as a petserve sft adapter for --backbone.")
    p.add_argument("diff", type=Path, help="the pytorch_diff.bin file")
    p.add_argument("--backbone", required=True, help="backbone preset or directory it belongs to")
    p.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--task", default="vqa", choices=TASK_NAMES, help="task recorded (default vqa)")
    p.add_argument("--name", default="", help="adapter name recorded in the file")
    p.set_defaults(run=run_import)
    q = sub.add_parser("export-sft", help="an sft adapter file -> composable-sft's pytorch_diff.bin",
                       description="Write a petserve sft adapter in composable-sft's format.")
    q.add_argument("adapter", type=Path, help="the sft adapter file (.safetensors)")
    q.add_argument("--backbone", required=True, help="backbone preset or directory it belongs to")
    q.add_argument("--out", type=Path, required=True, help="pytorch_diff.bin to write")
    q.set_defaults(run=run_export)


def _backbone(spec: str):
    from petserve.adapters.backbone import build_backbone
    try:
        return build_backbone(spec)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(f"--backbone: {e}") from None


def run_import(args, extra) -> int:
    from petserve.adapters.adapter_file import AdapterFileError, adapter_bytes, load_adapter
    from petserve.adapters.atomic_file import write_atomically
    from petserve.adapters.sft_format import SFTFormatError, from_seed, load_seed_sft
    model = _backbone(args.backbone)
    try:
        cfg, params = from_seed(load_seed_sft(args.diff), model)
        data = adapter_bytes("sft", cfg, params, model, args.task, name=args.name)
        af = load_adapter(data, model)             # every check a server would make
    except (SFTFormatError, AdapterFileError, ValueError) as e:
        raise CliError(str(e)) from None
    write_atomically(Path(args.out), lambda f: f.write(data))
    print(json.dumps({"path": str(args.out), "kind": "sft", "entries": len(cfg.entries),
                      "trainable_parameters": af.meta.trainable_parameters}))
    return 0


def load_sft_file(path: Path, model, flag: str):
    """The sft adapter file at ``path``, checked against ``model``; CliError naming ``flag``."""
    from petserve.adapters.adapter_file import AdapterFileError, load_adapter
    try:
        af = load_adapter(path, model)
    except (AdapterFileError, OSError) as e:
        raise CliError(f"{flag}{path}: {e}") from None
    if af.kind != "sft":
        raise CliError(f"{flag}{path} is a {af.kind} adapter, not an sft adapter")
    return af


def run_export(args, extra) -> int:
    import torch

    from petserve.adapters.atomic_file import write_atomically
    from petserve.adapters.sft_format import to_seed
    model = _backbone(args.backbone)
    af = load_sft_file(args.adapter, model, "")
    obj = to_seed(af.config, af.params, model)
    write_atomically(Path(args.out), lambda f: torch.save(obj, f))
    print(json.dumps({"path": str(args.out), "diffs": len(obj["diffs"]), "abs": len(obj["abs"])}))
    return 0
