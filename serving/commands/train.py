"""``petserve train``: train one adapter of any kind on the frozen backbone, write it, maybe push it.

Every flag is taken as a string and validated by :class:`TrainArgs` (pydantic), so any bad argument
is one ``petserve: error: ...`` line (exit 2). Extra ``--name value`` pairs are the kind's options.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from petserve.adapters.tasks import TASK_NAMES
from petserve.serving.cli import CliError
from petserve.serving.commands.options import make_config, parse_kind_options, parse_pairs
from petserve.serving.store import ADAPTER_ID_RE

FLAGS = ("kind", "task", "data", "out", "backbone", "steps", "epochs", "batch_size", "lr",
         "warmup_ratio", "clip_grad", "weight_decay", "seed", "train_size", "eval_data", "eval_size",
         "eval_every", "num_beams", "checkpoint_dir", "push", "id", "token", "lang")
SOURCES = "demo:TASK_ID, demo-video:TASK_ID, FILE.jsonl, vqav2:QUESTIONS,ANNOTATIONS,IMAGE_DIR or " \
          "coco:CAPTIONS,IMAGE_DIR"


class TrainArgs(BaseModel):
    """The validated command line (defaults: VL-Adapter / VL-PET's recipe)."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="adapter kind (lora, adapter, vlpet, compacter, ...)")
    task: Literal[TASK_NAMES] = Field(description=", ".join(TASK_NAMES))
    data: str = Field(description=f"training data: {SOURCES}")
    out: Path = Field(description="adapter file to write (.safetensors)")
    backbone: str = Field("demo", description="demo (the embedded default), a preset or a directory")
    steps: int | None = Field(None, ge=1, description="updates (default: --epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the data (default 1)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warmup, then linear decay")
    clip_grad: float = Field(5.0, ge=0, description="max gradient norm (0: off)")
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0, description="initialisation, data order and demo data")
    train_size: int = Field(1000, ge=1, description="examples drawn from a demo source")
    eval_data: str | None = Field(None, description="held-out data (demo sources: a fresh draw)")
    eval_size: int = Field(100, ge=1, description="held-out examples drawn from a demo source")
    eval_every: int = Field(0, ge=0, description="evaluate every N updates (and at the end)")
    num_beams: int = Field(1, ge=1, description="beam width when evaluating")
    checkpoint_dir: Path | None = Field(None, description="checkpoint here (and --resume from it)")
    lang: Literal["en", "fr"] = Field("en", description="language of a demo source's questions "
                                      "and answers (en, fr)")
    denoise: bool = False
    resume: bool = False
    quiet: bool = False
    push: str | None = Field(None, description="server URL to upload the adapter to")
    id: str | None = Field(None, pattern=f"^{ADAPTER_ID_RE}$", description="adapter id")
    token: str | None = Field(None, description="API token for --push (default $PETSERVE_TOKEN)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.push and not self.id:
            raise ValueError("--push needs --id")
        if self.denoise and self.task != "text":
            raise ValueError("--denoise learns unlabelled text: give --task text")
        return self


def register(sub) -> None:
    p = sub.add_parser("train", allow_abbrev=False, help="train one adapter on the frozen backbone",
                       description="Train an adapter of any kind (extra --name value pairs are kind "
                                   f"options, e.g. --r 8 --gate large). Data sources: {SOURCES}.")
    for flag in FLAGS:
        info = TrainArgs.model_fields[flag]
        default = "" if info.is_required() or info.default is None else f" (default {info.default})"
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, default=None,
                       help=(info.description or "") + default)
    p.add_argument("--denoise", action="store_true", help="learn the data's answers / captions as "
                   "unlabelled text with the backbone's denoising objective (T5 span corruption, "
                   "BART text infilling): a language sft")
    p.add_argument("--family", choices=("vl", "audio"), default="vl", help="backbone family: vl "
                   "(VL-T5 / VL-BART, default) or audio (AST: --data demo:pitch|beeps|timbre or a "
                   "folder of label folders; serving/commands/train_audio.py)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run, accepts_extra=True)


def parse_args(args) -> TrainArgs:
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    for required in ("kind", "task", "data", "out"):
        if required not in given:
            raise CliError(f"--{required} is required")
    try:
        return TrainArgs(resume=args.resume, quiet=args.quiet, denoise=args.denoise, **given)
    except ValidationError as e:
        first = e.errors()[0]
        where = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "arguments"
        raise CliError(f"{where}: {first['msg']}") from None


def run(args, extra: list[str]) -> int:
    from petserve.adapters.kinds import KINDS
    if args.family == "audio":
        from petserve.serving.commands import train_audio
        return train_audio.run(args, extra)
    a = parse_args(args)
    if a.kind not in KINDS:
        raise CliError(f"unknown kind {a.kind!r}; known kinds: {', '.join(sorted(KINDS))}")
    kind_cls = KINDS[a.kind]
    if a.kind == "sft":
        sft = sft_options(extra)
    else:
        cfg = make_config(kind_cls, parse_kind_options(kind_cls, extra))
    train, held_out = load_sources(a)
    model = load_backbone(a.backbone, a.quiet)
    if a.denoise:
        from petserve.adapters.data.denoise import denoising_examples
        family = model.cfg.lm.family
        train = denoising_examples(train, family, a.seed)
        held_out = held_out and denoising_examples(held_out, family, a.seed + 1)
    if a.kind == "sft":
        result = _train_sft(model, sft, train, held_out, a)
    else:
        result = _train(model, kind_cls, cfg, train, held_out, a)
    from petserve.adapters.training import save_trained
    save_trained(a.out, result, model, name=a.id or a.out.stem)
    summary = {"out": str(a.out), "kind": result.kind, "task": result.task,
               "steps": result.steps_done,
               "loss": result.history.losses[-1] if result.history.losses else None,
               "eval": result.history.evals[-1] if result.history.evals else None}
    if a.push:
        summary["pushed"] = push_adapter(a.push, a.id, a.token or os.environ.get("PETSERVE_TOKEN"),
                                         a.out.read_bytes())
    print(json.dumps(summary))
    return 0


def _train_config(a: TrainArgs):
    from petserve.adapters.training import TrainConfig
    return TrainConfig(steps=a.steps, epochs=a.epochs or 1.0, batch_size=a.batch_size, lr=a.lr,
                       warmup_ratio=a.warmup_ratio, clip_grad=a.clip_grad, weight_decay=a.weight_decay,
                       seed=a.seed, eval_every=a.eval_every, num_beams=a.num_beams,
                       checkpoint_dir=a.checkpoint_dir, resume=a.resume, progress=not a.quiet)


def _train(model, kind_cls, cfg, train, held_out, a: TrainArgs):
    from petserve.adapters.training import train_adapter
    try:
        return train_adapter(model, kind_cls, cfg, train, _train_config(a), eval_examples=held_out,
                             task=a.task)
    except ValueError as e:             # DataError included: names the file and the problem
        raise CliError(str(e).splitlines()[0]) from None


class SFTArgs(BaseModel):
    """``petserve train --kind sft`` options (LT-SFT, adapters/training/lt_sft.py)."""

    model_config = ConfigDict(extra="forbid")
    share: float = Field(0.01, gt=0, le=1, description="K as a share of the chosen entries")
    count: int | None = Field(None, ge=1, description="K as a count (instead of --share)")
    per_param: bool = Field(True, description="K per parameter (false: over all of them)")
    params: str = Field("lm.*_layers.*.weight,lm.tokens.weight",
                        description="comma-separated patterns of the parameters to fine-tune")
    full_steps: int | None = Field(None, ge=1, description="phase-1 updates (default: --steps)")
    base: Path | None = Field(None, description="a language sft composed under this task sft")


def sft_options(extra: list[str]) -> SFTArgs:
    try:
        return SFTArgs(**parse_pairs(extra, "sft options"))
    except ValidationError as e:
        first = e.errors()[0]
        where = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "sft options"
        raise CliError(f"{where}: {first['msg']}") from None


def _train_sft(model, s: SFTArgs, train, held_out, a: TrainArgs):
    from petserve.adapters.training.lt_sft import LTSFTConfig, train_sft
    from petserve.serving.commands.sft_files import load_sft_file
    base = None if s.base is None else load_sft_file(s.base, model, "--base ").compile(model)
    ltc = LTSFTConfig(params=tuple(p for p in s.params.split(",") if p), share=s.share,
                      count=s.count, per_param=s.per_param, full_steps=s.full_steps)
    try:
        return train_sft(model, train, ltc, _train_config(a), base, held_out, a.task)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0]) from None


def load_backbone(spec: str, quiet: bool = False):
    """``demo``: the embedded default (tiny VL-T5 pre-trained on shapes); else a preset or dir."""
    from petserve.adapters.backbone import build_backbone
    try:
        if spec == "demo":
            from petserve.adapters.demo import ensure_demo_assets
            return build_backbone(ensure_demo_assets(progress=not quiet).backbone_dir)
        return build_backbone(spec)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(f"--backbone: {str(e).splitlines()[0]}") from None


def load_sources(a: TrainArgs):
    """(training examples, held-out examples or None) from --data / --eval-data."""
    train = load_source(a.data, a.train_size, a.seed, "--data", a.lang)
    if a.eval_data:
        return train, load_source(a.eval_data, a.eval_size, a.seed + 1_000_003, "--eval-data",
                                  a.lang)
    if a.data.startswith(("demo:", "demo-video:")):   # a fresh draw: never seen in training
        return train, load_source(a.data, a.eval_size, a.seed + 1_000_003, "--data", a.lang)
    if a.eval_every:
        raise CliError("--eval-every needs --eval-data for a file data source")
    return train, None


def load_source(spec: str, size: int, seed: int, flag: str, lang: str = "en") -> list:
    """Examples of a data source (see SOURCES; ``lang``: a demo source's language); any problem ->
    CliError naming it."""
    from petserve.adapters import data
    scheme, _, rest = spec.partition(":")
    if lang != "en" and scheme != "demo":
        raise CliError(f"--lang {lang}: only a demo: source has another language")
    try:
        if scheme == "demo":
            return data.make_demo_examples(rest, size, seed, lang)
        if scheme == "demo-video":
            return data.make_demo_video_examples(rest, size, seed)
        if scheme == "vqav2":
            return data.load_vqav2(*_parts(rest, 3, spec, flag))
        if scheme == "coco":
            return data.load_coco_captions(*_parts(rest, 2, spec, flag))
        if spec.endswith(".jsonl") or Path(spec).is_file():
            return data.load_jsonl(spec)
    except ValueError as e:             # DataError and unknown demo task ids
        raise CliError(f"{flag}: {str(e).splitlines()[0]}") from None
    raise CliError(f"{flag}: unknown data source {spec!r}; use {SOURCES}")


def _parts(rest: str, n: int, spec: str, flag: str) -> list[str]:
    parts = rest.split(",")
    if len(parts) != n or not all(parts):
        raise CliError(f"{flag}: {spec!r} needs {n} comma-separated paths")
    return parts


def push_adapter(url: str, adapter_id: str, token: str | None, data: bytes) -> dict:
    """PUT the adapter file to ``{url}/v1/adapters/{id}`` with a bearer token; the server's reply."""
    import httpx
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    target = f"{url.rstrip('/')}/v1/adapters/{adapter_id}"
    try:
        reply = httpx.put(target, content=data, headers=headers, timeout=120)
    except httpx.HTTPError as e:
        raise CliError(f"--push: cannot reach {target}: {e}") from None
    if reply.status_code >= 400:
        raise CliError(f"--push: {target} answered {reply.status_code}: {_error_message(reply)}")
    try:
        return reply.json()
    except ValueError:
        return {"status": reply.status_code}


def _error_message(reply) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return reply.text[:200].replace("\n", " ")
