"""The audio family's embedded default: a tiny AST and three PETL-for-AST adapters, and their score.

``python -m petserve.adapters.audio_demo --check`` scores the shipped (or rebuilt) adapters on
freshly synthesised clips (docs/METHODS.md, "Audio") beside the floor, a linear probe on the bare
backbone trained on the same clips; it exits 1 when an adapter is under its target. ``--out DIR``
rebuilds everything there (a few minutes on one CPU thread; bit-for-bit reproducible).

Assets live in ``adapters/demo_assets/audio/``: the backbone as a Hugging Face ASTModel directory
(``backbone/``, so it loads like any real AST checkpoint), one adapter file per task and a manifest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from petserve.adapters.demo import (
    SHIPPED_DIR,
    build_atomically,
    default_cache_dir,
    single_thread,
    valid_or_built,
)

AUDIO_DIR = SHIPPED_DIR / "audio"
MANIFEST = "manifest.json"
AUDIO_ASSET_FORMAT = 1
AUDIO_TARGET = 0.9
AUDIO_HELD_OUT_SEED = 9_100_001        # --check / tests only: no training stream uses it


@dataclass(frozen=True)
class AudioBaseRecipe:
    preset: str = "tiny-ast"
    steps: int = 400
    seed: int = 0


@dataclass(frozen=True)
class AudioRecipe:
    """One demo adapter: task, kind and options (a different configuration per task)."""

    task: str
    kind: str
    options: dict = field(default_factory=dict)
    steps: int = 600
    lr: float = 5e-3
    per_class: int = 128
    seed: int = 0


AUDIO_BASE = AudioBaseRecipe()
AUDIO_RECIPES = (
    # the seed's best configuration: parallel Pfeiffer conformer (its depthwise convolution
    # along the token sequence suits counting beeps in time)
    AudioRecipe("beeps", "adapter", {"block": "conformer", "placement": "pfeiffer",
                                     "mode": "parallel", "reduction_factor": 4, "kernel_size": 31,
                                     "adjacent_norms": True},
                seed=601),
    # the seed's LoRA baseline: q and v, no biases
    AudioRecipe("pitch", "lora", {"r": 8, "alpha": 8, "targets": ["enc.self.q", "enc.self.v"],
                                  "train_biases": False}, seed=602),
    # a sequential Houlsby bottleneck
    AudioRecipe("timbre", "adapter", {"placement": "houlsby", "mode": "sequential",
                                      "reduction_factor": 2, "adjacent_norms": True},
                steps=1000, seed=603),
)


@dataclass
class AudioAssets:
    backbone_dir: Path
    adapters: dict[str, Path]          # task id -> adapter file


def audio_recipe_digest() -> str:
    spec = {"format": AUDIO_ASSET_FORMAT, "base": asdict(AUDIO_BASE),
            "adapters": [asdict(r) for r in AUDIO_RECIPES]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ensure_audio_assets(cache_dir: Path | None = None, progress: bool = True) -> AudioAssets:
    """Valid shipped assets, else valid cached ones, else a fresh build into the cache dir."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir().with_name("audio")
    return valid_or_built((AUDIO_DIR, cache_dir), valid_audio_assets, build_audio_assets,
                          "audio demo", progress)


def valid_audio_assets(directory: Path) -> AudioAssets | None:
    """The assets in ``directory`` when its manifest matches this builder and every adapter loads
    on the backbone (fingerprints checked); None otherwise."""
    from petserve.adapters.adapter_file import AdapterFileError, load_adapter
    from petserve.adapters.backbone.audio import build_audio_backbone
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
        if manifest.get("recipe") != audio_recipe_digest():
            return None
        assets = _assets_of(Path(directory), manifest)
        model = build_audio_backbone(assets.backbone_dir)
        if model.fingerprint != manifest["fingerprint"]:
            return None
        for path in assets.adapters.values():
            load_adapter(path, model)
    except (OSError, ValueError, KeyError, AdapterFileError):
        return None
    return assets


def _assets_of(directory: Path, manifest: dict) -> AudioAssets:
    return AudioAssets(directory / manifest["backbone"],
                       {task: directory / name for task, name in manifest["adapters"].items()})


def build_audio_assets(out_dir: Path, progress: bool = True, reuse_valid: bool = False) -> AudioAssets:
    return build_atomically(Path(out_dir), lambda work: _build_into(work, progress),
                            valid_audio_assets, _assets_of, reuse_valid)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"petserve audio: {message}", file=sys.stderr, flush=True)


def _build_into(work: Path, progress: bool) -> dict:
    from petserve.adapters.adapter_file import reproducible_created, save_adapter
    from petserve.adapters.backbone.audio import (
        AudioModel,
        audio_preset,
        build_audio_backbone,
        save_audio_backbone,
    )
    from petserve.adapters.training.audio import pretrain_audio_backbone
    started = time.time()
    with single_thread():
        base = AudioModel(audio_preset(AUDIO_BASE.preset))
        curve = pretrain_audio_backbone(base, AUDIO_BASE.steps, AUDIO_BASE.seed)
        _log(progress, f"backbone pre-trained (loss {curve[0]} -> {curve[-1]})")
        save_audio_backbone(base, work / "backbone")
        model = build_audio_backbone(work / "backbone")        # as served
        files = {}
        for recipe in AUDIO_RECIPES:
            cfg, params = train_recipe(model, recipe)
            files[recipe.task] = save_adapter(work / f"{recipe.task}.safetensors", recipe.kind, cfg,
                                              params, model, "audio_classify",
                                              name=f"demo-{recipe.task}",
                                              created=reproducible_created()).name
            _log(progress, f"{recipe.task} trained ({recipe.kind})")
    manifest = {"recipe": audio_recipe_digest(), "fingerprint": model.fingerprint,
                "backbone": "backbone", "adapters": files,
                "build_seconds": round(time.time() - started, 1)}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def recipe_config(model, recipe: AudioRecipe):
    from petserve.adapters.data.audio import AUDIO_TASKS
    from petserve.adapters.kinds import get_kind
    return get_kind(recipe.kind).Config(**recipe.options, train_visual_embedding=False,
                                        labels=AUDIO_TASKS[recipe.task])


def train_recipe(model, recipe: AudioRecipe):
    """(config, trained params) of one demo adapter."""
    from petserve.adapters.data.audio import Featurizer, make_clips
    from petserve.adapters.training.audio import AudioTrainConfig, train_audio_adapter
    cfg = recipe_config(model, recipe)
    clips = make_clips(recipe.task, recipe.per_class, recipe.seed)
    params = train_audio_adapter(model, recipe.kind, cfg, Featurizer(model.cfg)(clips.clips),
                                 clips.labels, AudioTrainConfig(recipe.steps, lr=recipe.lr,
                                                                seed=recipe.seed))
    return cfg, params


@dataclass
class AudioScore:
    task: str
    kind: str
    accuracy: float
    probe: float                  # the floor: a linear probe on the bare backbone


def audio_scores(assets: AudioAssets, per_class: int = 25,
                 seed: int = AUDIO_HELD_OUT_SEED) -> list[AudioScore]:
    """Each shipped adapter's accuracy on fresh clips, beside the bare backbone's linear probe
    (trained on the recipe's training clips)."""
    from petserve.adapters.adapter_file import load_adapter
    from petserve.adapters.backbone.audio import build_audio_backbone
    from petserve.adapters.data.audio import Featurizer, make_clips
    from petserve.adapters.training.audio import adapter_predictions, linear_probe
    model = build_audio_backbone(assets.backbone_dir)
    featurize = Featurizer(model.cfg)
    out = []
    with single_thread():
        for recipe in AUDIO_RECIPES:
            af = load_adapter(assets.adapters[recipe.task], model)
            test = make_clips(recipe.task, per_class, seed + len(out))
            f_test = featurize(test.clips)
            pred = adapter_predictions(model, af.kind, af.config, af.params, f_test)
            train = make_clips(recipe.task, recipe.per_class, recipe.seed)
            probe = linear_probe(model, featurize(train.clips), train.labels, f_test)
            y = np.array(test.labels)
            out.append(AudioScore(recipe.task, f"{af.kind} {_describe(af.config)}",
                                  float((np.array(pred) == y).mean()),
                                  float((np.array(probe) == y).mean())))
    return out


def _describe(cfg) -> str:
    d = cfg.model_dump()
    if "block" in d:
        return f"{d['placement']} {d['mode']} {d['block']}"
    if "r" in d:
        return f"r={d['r']} on {','.join(t.split('.')[-1] for t in d['targets'])}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m petserve.adapters.audio_demo", description=(
        "Build or score the audio demo assets (a tiny AST and the pitch, beeps and timbre adapters)."))
    parser.add_argument("--out", type=Path, help="rebuild into this directory")
    parser.add_argument("--check", action="store_true", help="score the assets on fresh clips "
                        f"(exit 1 when an adapter is under {AUDIO_TARGET})")
    parser.add_argument("--n", type=int, default=25, help="fresh clips per class for --check")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    assets = build_audio_assets(args.out, progress=not args.quiet) if args.out else \
        ensure_audio_assets(progress=not args.quiet)
    print(f"audio assets: {assets.backbone_dir.parent}")
    if not args.check:
        return 0
    short = []
    print(f"{'task':8} {'adapter':40} {'accuracy':>8} {'probe':>6}")
    for s in audio_scores(assets, args.n):
        print(f"{s.task:8} {s.kind:40} {s.accuracy:8.3f} {s.probe:6.3f}")
        if s.accuracy < AUDIO_TARGET:
            short.append(f"{s.task} {s.accuracy:.3f} < {AUDIO_TARGET}")
    if short:
        print("under target: " + "; ".join(short))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
