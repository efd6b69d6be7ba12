"""``petserve train --family audio``: a PETL-for-AST adapter with its head on the frozen AST.

Data: ``demo:pitch|beeps|timbre`` (synthesised clips, ``--train-size`` per class) or a directory
with one subfolder per label holding wav / flac / ogg files (the labels are the folder names, in
sorted order). ``--eval-data`` (same forms; a demo source is drawn afresh) prints the accuracy.
The kind's options are the usual ``--name value`` pairs (``--block conformer --mode parallel``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from petserve.serving.cli import CliError
from petserve.serving.commands.options import make_config, parse_kind_options

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DEFAULTS = {"steps": 600, "batch_size": 32, "lr": 5e-3, "weight_decay": 0.1, "seed": 0,
            "train_size": 128, "eval_size": 25}
MAX_CLIP_SECONDS = 30.0


def _number(args, name: str, cast):
    raw = getattr(args, name)
    if raw is None:
        return DEFAULTS[name]
    try:
        value = cast(raw)
    except ValueError:
        raise CliError(f"--{name.replace('_', '-')}: not a number: {raw!r}") from None
    if value <= 0 and name not in ("seed", "weight_decay"):
        raise CliError(f"--{name.replace('_', '-')} must be positive (got {raw})")
    return value


def run(args, extra: list[str]) -> int:
    from petserve.adapters.adapter_file import save_adapter
    from petserve.adapters.kinds import KINDS
    from petserve.adapters.training.audio import (
        AudioTrainConfig,
        adapter_predictions,
        train_audio_adapter,
    )
    for required in ("kind", "data", "out"):
        if getattr(args, required) is None:
            raise CliError(f"--{required} is required")
    if args.task not in (None, "audio_classify"):
        raise CliError(f"--task: the audio family has one task, audio_classify (got {args.task!r})")
    if args.kind not in KINDS:
        raise CliError(f"unknown kind {args.kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    kind_cls = KINDS[args.kind]
    options = parse_kind_options(kind_cls, extra)
    if "labels" in options:
        raise CliError("--labels come from the data (the demo task's, or the folder names)")
    model = load_audio_backbone(args.backbone or "demo", args.quiet)
    fbanks, labels, names = load_audio_data(model, args.data, _number(args, "train_size", int),
                                            _number(args, "seed", int))
    cfg = make_config(kind_cls, {**options, "train_visual_embedding": False, "labels": names})
    tc = AudioTrainConfig(steps=_number(args, "steps", int), batch_size=_number(args, "batch_size", int),
                          lr=_number(args, "lr", float), weight_decay=_number(args, "weight_decay", float),
                          seed=_number(args, "seed", int))
    try:
        params = train_audio_adapter(model, args.kind, cfg, fbanks, labels, tc)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0]) from None
    out = Path(args.out)
    save_adapter(out, args.kind, cfg, params, model, "audio_classify", name=args.id or out.stem)
    summary = {"out": str(out), "kind": args.kind, "task": "audio_classify", "steps": tc.steps,
               "labels": list(names)}
    if args.eval_data:
        f_eval, y_eval, eval_names = load_audio_data(model, args.eval_data,
                                                     _number(args, "eval_size", int),
                                                     _number(args, "seed", int) + 1_000_003)
        if eval_names != names:
            raise CliError(f"--eval-data has labels {list(eval_names)}, the training data {list(names)}")
        pred = adapter_predictions(model, args.kind, cfg, params, f_eval)
        summary["eval"] = {"accuracy": round(sum(p == y for p, y in zip(pred, y_eval)) / len(y_eval), 4)}
    if args.push:
        from petserve.serving.commands.train import push_adapter
        if not args.id:
            raise CliError("--push needs --id")
        summary["pushed"] = push_adapter(args.push, args.id,
                                         args.token or os.environ.get("PETSERVE_TOKEN"), out.read_bytes())
    print(json.dumps(summary))
    return 0


def load_audio_backbone(spec: str, quiet: bool = False):
    """``demo``: the embedded default's tiny AST; else an audio preset or an AST directory."""
    from petserve.adapters.backbone.audio import build_audio_backbone
    try:
        if spec == "demo":
            from petserve.adapters.audio_demo import ensure_audio_assets
            return build_audio_backbone(ensure_audio_assets(progress=not quiet).backbone_dir)
        return build_audio_backbone(spec)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(f"--backbone: {str(e).splitlines()[0]}") from None


def load_audio_data(model, source: str, per_class: int, seed: int):
    """(filterbanks (N, frames, mel), label indices, label names) of a data source."""
    from petserve.adapters.data.audio import AUDIO_TASKS, AudioError, Featurizer, make_clips
    featurize = Featurizer(model.cfg)
    if source.startswith("demo:"):
        task = source[5:]
        if task not in AUDIO_TASKS:
            raise CliError(f"--data: unknown audio demo task {task!r}; tasks: {', '.join(AUDIO_TASKS)}")
        clips = make_clips(task, per_class, seed)
        return featurize(clips.clips), clips.labels, AUDIO_TASKS[task]
    root = Path(source)
    if not root.is_dir():
        raise CliError(f"--data: {source!r} is neither demo:TASK nor a directory of label folders")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if len(names) < 2:
        raise CliError(f"--data: {root} needs one subfolder per label (at least two)")
    rows, labels = [], []
    for i, name in enumerate(names):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise CliError(f"--data: {root / name} holds no {'/'.join(AUDIO_SUFFIXES)} files")
        for path in files:
            try:
                rows.append(featurize.from_bytes(path.read_bytes(), MAX_CLIP_SECONDS))
            except AudioError as e:
                raise CliError(f"--data: {path}: {e.message}") from None
            labels.append(i)
    import torch
    return torch.stack(rows), labels, names
