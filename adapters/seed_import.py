"""Import checkpoints saved by the seeds' public code: VL-Adapter (ylsung/VL_adapter) and VL-PET
(HenryHZY/VL-PET), VL-T5 or VL-BART, pre-training or adapter-tuned (docs/METHODS.md §11).

Their trainer saves ``torch.save(model.state_dict())``: the whole model, the frozen backbone with
its trained norms, the visual embedding and every adapter module, with the seeds' module names.
This module reads such a file without unpickling anything but tensors, maps every key to ours (a
key it does not understand is an error naming it; nothing is dropped silently) and returns the
backbone as our ``VLModel`` plus one adapter per task, recorded with the seeds' input format
(zero boxes, their prompt strings, 20-token questions: ``adapters.tasks.SEED_INPUTS``).

The per-kind key layouts live in ``adapters/seed_keys.py``.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from petserve.adapters.backbone.config import BackboneConfig, VisionConfig, visual_norm_of
from petserve.adapters.backbone.hf_weights import lm_config_from_dict, own_name
from petserve.adapters.backbone.loading import fingerprint
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.backbone.tokenizer import load_tokenizer
from petserve.adapters.kinds.base import KindConfig
from petserve.adapters.tasks import SEED_INPUTS, SEED_PROMPTS, InputFormat

ARCHS = {"vl-t5": "t5", "vl-bart": "bart"}
REPOS = ("vl-adapter", "vl-pet")
SEED_TASKS = ("vqa", "gqa", "nlvr", "caption")     # the multitask scripts' --tasks
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json")


class SeedImportError(ValueError):
    """A checkpoint, config or option the importer cannot take; the message names the problem."""


@dataclass
class SeedAdapter:
    """One task's adapter, in our kind's terms (``params`` named as the kind declares)."""

    task: str
    kind: str
    config: KindConfig
    params: dict[str, torch.Tensor]


@dataclass
class SeedImport:
    model: VLModel
    adapters: list[SeedAdapter]
    inputs: InputFormat            # how the seeds built every task's input
    keys_total: int
    keys_consumed: int


class Keys:
    """The checkpoint's tensors; every key a mapper reads is marked consumed."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state, self.used = state, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise SeedImportError(f"checkpoint lacks key {key!r}, which the other keys imply")
        self.used.add(key)
        return self.state[key]

    def matching(self, pattern: str) -> list[tuple[str, re.Match]]:
        """Unconsumed keys that fully match ``pattern``, sorted, with their matches."""
        rx = re.compile(pattern)
        return [(k, m) for k in sorted(self.state) if k not in self.used and (m := rx.fullmatch(k))]

    def left(self) -> list[str]:
        return sorted(set(self.state) - self.used)


# ---- reading --------------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``torch.save``), DDP's ``module.`` prefix removed. Only tensors
    are unpickled (``weights_only=True``): a file holding other objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise SeedImportError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SeedImportError(f"{path}: refused: the file holds objects other than tensors, and "
                              f"only a torch.save'd state dict is read ({first[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SeedImportError(f"{path}: not a readable torch checkpoint (truncated or corrupt: "
                              f"{first[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise SeedImportError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SeedImportError(f"{path}: entry {bad[0]!r} is not a named tensor; not a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_hf_config(path: Path | None, arch: str) -> tuple[dict, Path | None]:
    """(config dict, directory it came from) from a config.json file or a directory holding one."""
    if path is None:
        raise SeedImportError(f"--config is required: the Hugging Face config of the checkpoint's "
                              f"language model ({'t5-base' if arch == 't5' else 'facebook/bart-base'}"
                              "'s config.json, or its directory)")
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise SeedImportError(f"--config {path}: no config.json there")
    try:
        cfg = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SeedImportError(f"--config {file}: not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") != arch:
        got = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise SeedImportError(f"--config {file}: model_type {got!r}, but --arch needs a {arch} config")
    return cfg, file.parent


def detect_arch(state: dict[str, torch.Tensor]) -> str | None:
    if "shared.weight" in state and any(k.startswith("encoder.block.") for k in state):
        return "t5"
    if "model.shared.weight" in state and any(k.startswith("model.encoder.layers.") for k in state):
        return "bart"
    return None


# ---- the whole import -----------------------------------------------------------------------
def import_checkpoint(state: dict[str, torch.Tensor], arch: str, repo: str, hf_config: dict,
                      tokenizer_dir: Path | None, options: dict | None = None,
                      name: str = "seed") -> SeedImport:
    """Map a seed state dict (``arch`` "vl-t5" | "vl-bart", ``repo`` "vl-adapter" | "vl-pet")
    onto our backbone and adapters. ``options``: the seed CLI's method options the keys cannot
    tell (``adapters.seed_keys.OPTIONS``)."""
    from petserve.adapters.seed_keys import OPTIONS, fill_shared, import_adapters, layout_of
    if arch not in ARCHS:
        raise SeedImportError(f"--arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if repo not in REPOS:
        raise SeedImportError(f"--repo must be one of {', '.join(REPOS)}, not {repo!r}")
    family = ARCHS[arch]
    found = detect_arch(state)
    if found != family:
        what = {"t5": "a VL-T5", "bart": "a VL-BART", None: "neither a VL-T5 nor a VL-BART"}[found]
        raise SeedImportError(f"the checkpoint is {what} checkpoint, but --arch is {arch}")
    unknown = sorted(set(options or {}) - set(OPTIONS))
    if unknown:
        raise SeedImportError(f"unknown seed option --{unknown[0]}; known: "
                              + ", ".join(f"--{o}" for o in OPTIONS))
    opts = {k: v(options[k]) if k in (options or {}) else None for k, v in OPTIONS.items()}
    keys = Keys(state)
    layout = layout_of(family)
    model = _build_model(keys, layout, family, hf_config, tokenizer_dir, name)
    adapters = import_adapters(keys, layout, model, repo, opts)
    _load_backbone(keys, layout, model)
    fill_shared(adapters, model)
    left = keys.left()
    if left:
        raise SeedImportError(f"checkpoint key {left[0]!r} is not understood "
                              f"({len(left)} such key{'s' if len(left) > 1 else ''}); nothing was written")
    model.requires_grad_(False)
    model.eval()
    model.fingerprint = fingerprint(model)
    inputs = SEED_INPUTS
    if opts["use_tasks_prompts"] is False:            # the scripts' prompts, or none at all
        inputs = SEED_INPUTS.model_copy(update={"prompts": {t: "" for t in SEED_PROMPTS}})
    return SeedImport(model, adapters, inputs, len(state), len(keys.used))


def _build_model(keys: Keys, layout, family: str, hf_config: dict, tokenizer_dir: Path | None,
                 name: str) -> VLModel:
    """Our VLModel shaped like the checkpoint: the config's language model with the checkpoint's
    (resized) vocabulary, precomputed features of the visual embedding's width."""
    shared = keys.state[layout.shared]
    cfg = dict(hf_config, vocab_size=shared.shape[0])
    if cfg.get("d_model") != shared.shape[1]:
        raise SeedImportError(f"--config has d_model {cfg.get('d_model')}, the checkpoint's "
                              f"embedding is {shared.shape[1]} wide: the wrong config")
    try:
        lm = lm_config_from_dict(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise SeedImportError(f"--config: not a usable {family} config ({e})") from None
    feat = layout.visual + ".feat_embedding.0.weight"
    if feat not in keys:
        raise SeedImportError(f"the checkpoint has no visual embedding ({feat!r}): not a VL-T5 / "
                              "VL-BART checkpoint")
    img = keys.state.get(layout.visual + ".img_order_embedding.weight")
    vcfg = BackboneConfig(
        name=name, lm=lm, vision=VisionConfig(kind="features", feat_dim=keys.state[feat].shape[1]),
        n_images=2 if img is None else img.shape[0], extra_vis_tokens=0,
        visual_norm=visual_norm_of(family), object_order=img is not None)
    return VLModel(vcfg, _tokenizer(tokenizer_dir, family, lm.vocab_size))


def _tokenizer(directory: Path | None, family: str, vocab_size: int):
    if directory is None or not any((Path(directory) / f).exists() for f in TOKENIZER_FILES):
        raise SeedImportError(f"no tokenizer in {directory or 'the --config directory'}: pass "
                              f"--tokenizer DIR (a save_pretrained tokenizer directory, e.g. "
                              f"{'t5-base' if family == 't5' else 'facebook/bart-base'}'s)")
    tok = load_tokenizer(Path(directory), family)
    if len(tok) > vocab_size:
        raise SeedImportError(f"the tokenizer in {directory} has {len(tok)} tokens, more than the "
                              f"checkpoint's {vocab_size} embedding rows: the wrong tokenizer")
    return tok


def _load_backbone(keys: Keys, layout, model: VLModel) -> None:
    """The visual embedding and the language model from the keys no adapter took."""
    model.visual_embed.load_state_dict(layout.visual_state(keys, model), strict=True)
    lm_state = {}
    for key, _ in keys.matching(r".*"):
        if key.startswith(layout.visual + "."):
            continue                                   # left for the unknown-key error
        try:
            ours = own_name(key, model.cfg.lm.family)
        except KeyError:
            continue
        t = keys.take(key)
        if ours is not None:
            lm_state[ours] = t
    head = lm_state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, lm_state.get("tokens.weight", head)):
        raise SeedImportError("the checkpoint's lm_head differs from its shared embedding; the "
                              "seeds tie them (tie_word_embeddings), this one does not")
    if model.cfg.lm.family == "bart":
        lm_state.setdefault("final_logits_bias", torch.zeros(1, model.cfg.lm.vocab_size))
    missing, unexpected = model.lm.load_state_dict(lm_state, strict=False)
    if missing or unexpected:
        raise SeedImportError(f"the checkpoint does not match the --config language model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


# ---- writing --------------------------------------------------------------------------------
@dataclass
class Written:
    backbone: Path
    adapters: list[dict] = field(default_factory=list)


def write_import(result: SeedImport, out: Path) -> Written:
    """DIR/backbone (``petserve serve --backbone``) and DIR/adapters/<task>.safetensors, written
    into a temporary sibling directory renamed into place at the end: on any error nothing is left."""
    import shutil
    import tempfile

    from petserve.adapters.adapter_file import save_adapter
    from petserve.adapters.backbone.loading import save_backbone
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SeedImportError(f"--out {out} exists and is not empty; nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_backbone(result.model, tmp / "backbone")
        (tmp / "adapters").mkdir()
        written = Written(out / "backbone")
        for a in result.adapters:
            path = save_adapter(tmp / "adapters" / f"{a.task}.safetensors", a.kind, a.config, a.params,
                                result.model, a.task, name=f"seed-{a.kind}-{a.task}",
                                inputs=result.inputs)
            written.adapters.append({"path": str(out / "adapters" / path.name), "task": a.task,
                                     "kind": a.kind,
                                     "trainable_parameters": sum(v.numel() for v in a.params.values())})
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
