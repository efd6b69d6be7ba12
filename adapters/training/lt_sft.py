"""Lottery-ticket sparse fine-tuning (LT-SFT; Ansell et al., ACL 2022): what ``petserve train
--kind sft`` runs.

1. Fine-tune every entry of the chosen backbone parameters (an sft whose support is everything).
2. Keep the K entries whose values moved most, ``|theta1 - theta0|`` (K a count or a share of the
   chosen entries; chosen globally, or per parameter).
3. Reset to theta0 and fine-tune again with only those K entries free.

The result is an ``sft`` adapter (adapters/kinds/sft.py). A task SFT learns on top of a fixed
language SFT (``base``): both phases train with the base composed under it (composition is
addition, adapters/runtime/compose.py), and the file holds the task's own deltas only.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

import torch

from petserve.adapters.backbone.model import VLModel
from petserve.adapters.data.records import Example
from petserve.adapters.kinds.sft import SFTConfig, targets
from petserve.adapters.runtime.forms import CompiledAdapter
from petserve.adapters.training.batches import ExampleFeatures
from petserve.adapters.training.trainer import TrainConfig, TrainResult, train_adapter

# What an LT-SFT fine-tunes by default: every linear of the language model and the embedding.
DEFAULT_PARAMS = ("lm.*_layers.*.weight", "lm.tokens.weight")


@dataclass(frozen=True)
class LTSFTConfig:
    params: tuple[str, ...] = DEFAULT_PARAMS   # fnmatch patterns over state-dict names
    share: float = 0.01                        # K = share of the chosen entries ...
    count: int | None = None                   # ... or this many
    # K per parameter (the default) or over all of them: on the demo's tiny VL-T5 a global 1%
    # lands on a few matrices and phase 2 cannot learn the captions (loss 4.8 -> 4.7 in 100
    # updates at lr 1e-2), 1% of each matrix can (4.8 -> 0.4 in 150)
    per_param: bool = True
    full_steps: int | None = None              # phase 1 updates (default: as phase 2)


def chosen_params(model: VLModel, patterns: tuple[str, ...]) -> list[str]:
    """The parameters an SFT may change that match ``patterns`` (a ValueError if none)."""
    known = targets(model)
    names = sorted(n for n in known if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if not names:
        raise ValueError(f"no backbone parameter an sft may change matches {list(patterns)}")
    return names


def train_sft(model: VLModel, examples: list[Example], ltc: LTSFTConfig, tc: TrainConfig,
              base: CompiledAdapter | None = None, eval_examples: list[Example] | None = None,
              task: str | None = None, cache: ExampleFeatures | None = None) -> TrainResult:
    """LT-SFT on ``examples``: phase 1 over every chosen entry, top-K selection, phase 2."""
    names = chosen_params(model, ltc.params)
    shapes = {n: targets(model)[n][2] for n in names}
    cache = ExampleFeatures(model) if cache is None else cache
    full = {n: math.prod(shapes[n]) for n in names}
    init = {}
    for n in names:
        init[f"{n}.idx"] = torch.arange(full[n])
        init[f"{n}.val"] = torch.zeros(full[n])
    phase1_tc = replace(tc, steps=ltc.full_steps or tc.steps, checkpoint_dir=None, resume=False)
    first = train_adapter(model, "sft", SFTConfig(entries=full), examples, phase1_tc, task=task,
                          cache=cache, init=init, base=base)
    kept = select_entries({n: first.params[f"{n}.val"] for n in names}, ltc)
    sparse = {n: int(idx.numel()) for n, idx in kept.items()}
    second_init = {}
    for n, idx in kept.items():
        second_init[f"{n}.idx"] = idx
        second_init[f"{n}.val"] = torch.zeros(idx.numel())
    result = train_adapter(model, "sft", SFTConfig(entries=sparse), examples, tc, eval_examples,
                           task, cache, init=second_init, base=base)
    result.history.evals.insert(0, {"phase1_steps": first.steps_done,
                                    "kept": sum(sparse.values()), "of": sum(full.values())})
    return result


def select_entries(deltas: dict[str, torch.Tensor], ltc: LTSFTConfig) -> dict[str, torch.Tensor]:
    """The flat indices kept per parameter: the K largest |delta|, sorted (each parameter keeps at
    least one entry, so every chosen parameter stays in the file)."""
    if ltc.per_param:
        out = {}
        for n, d in deltas.items():
            k = _k(d.numel(), ltc)
            out[n] = torch.topk(d.abs(), k).indices.sort().values
        return out
    flat = torch.cat([d.abs() for d in deltas.values()])
    top = torch.topk(flat, _k(flat.numel(), ltc)).indices.sort().values
    out, start = {}, 0
    for n, d in deltas.items():
        mine = top[(top >= start) & (top < start + d.numel())] - start
        out[n] = mine if mine.numel() else d.abs().argmax().reshape(1)
        start += d.numel()
    return out


def _k(total: int, ltc: LTSFTConfig) -> int:
    k = ltc.count if ltc.count is not None else math.ceil(ltc.share * total)
    return max(1, min(total, k))
