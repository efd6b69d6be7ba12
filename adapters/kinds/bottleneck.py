"""Bottleneck adapters (Houlsby et al.; Pfeiffer et al.; VL-Adapter's setting), kind ``adapter``.

``h <- h + U act(D h + b_d) + b_u`` on a sublayer's output, before dropout / residual / LayerNorm.
Houlsby: after self-attention and FFN in the encoder, after self-attention, cross-attention and FFN
in the decoder. Pfeiffer: after the FFN only. Parallel: the adapter reads the sublayer's input,
``y = x + F(x) + A(x)``. Reduction factor 8 (768 -> 96). Also trains every LayerNorm and the visual
embedding. Initialisation: ``nn.Linear``'s default, as VL-Adapter's code (so not an identity);
``zero_init_up`` makes a fresh adapter an exact identity.

Sharing across tasks (VL-Adapter), config ``sharing`` + ``tasks``:

    single            one (D, U) per site for every task (the default; 4.18% on bart-base)
    multiple          one (D, U) per site and task                       (4 tasks: 12.2%)
    half-shared-down  D shared by all tasks, one U per task
    half-shared-up    U shared by all tasks, one D per task              (4 tasks: 8.36%)

LayerNorms and the visual embedding stay shared. Tensor names: a shared projection is
``adapter.<site>.<down|up>.<weight|bias>``, a per-task one ``adapter.<site>.<task>.<down|up>...``.
``compile(task)`` picks the task's projections, so a non-single adapter is task-conditioned.
Compacter subclasses this kind and overrides only how one projection is stored (``part_*``).
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, all_norms, layer_sites, linear_init
from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter
from petserve.adapters.tasks import ADAPTER_TASKS

PARTS = ("down", "up")
SHARED_PARTS = {"single": PARTS, "multiple": (), "half-shared-down": ("down",), "half-shared-up": ("up",)}
_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def check_tasks(tasks: tuple[str, ...], what: str) -> None:
    """A task list a task-conditioned adapter can name its tensors after (non-empty, unique, no dots)."""
    if not tasks:
        raise ValueError(f"{what} needs a non-empty task list (e.g. tasks=vqa,gqa,nlvr,caption)")
    bad = [t for t in tasks if not _TASK_NAME.match(t)]
    if bad:
        raise ValueError(f"task names may use only letters, digits, '_' and '-': {bad}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task list has duplicates: {list(tasks)}")


def pick_task(what: str, tasks: tuple[str, ...], task: str | None) -> str:
    """``task`` if the adapter was trained for it, else a ValueError that lists what it has."""
    if task is None:
        raise ValueError(f"{what} is task-conditioned: compile it for one of its tasks "
                         f"({', '.join(tasks)})")
    if task not in tasks:
        raise ValueError(f"{what} has no task {task!r}; it was trained for {', '.join(tasks)}")
    return task


class BottleneckConfig(KindConfig):
    reduction_factor: int = Field(8, ge=1, description="d_model / bottleneck width")
    dim: int | None = Field(None, ge=1, description="bottleneck width (overrides reduction_factor)")
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    mode: Literal["sequential", "parallel"] = "sequential"
    train_norms: bool = True
    zero_init_up: bool = False
    sharing: Literal["single", "multiple", "half-shared-down", "half-shared-up"] = "single"
    tasks: tuple[str, ...] = Field(ADAPTER_TASKS, description="tasks of a non-single adapter")

    @model_validator(mode="after")
    def _check_tasks(self):
        if self.sharing != "single":
            check_tasks(self.tasks, f"sharing {self.sharing!r}")
        return self


class Bottleneck(AdapterKind):
    name = "adapter"
    Config = BottleneckConfig
    description = "bottleneck adapter (Houlsby / Pfeiffer placement, sequential or parallel)"

    @classmethod
    def is_task_conditioned(cls, cfg: BottleneckConfig) -> bool:
        return cfg.sharing != "single"

    @classmethod
    def width(cls, cfg: BottleneckConfig, model) -> int:
        d = model.cfg.lm.d_model
        if cfg.dim is None and d % cfg.reduction_factor:
            raise ValueError(f"reduction_factor {cfg.reduction_factor} does not divide d_model {d}")
        return cfg.dim or d // cfg.reduction_factor

    @classmethod
    def sites(cls, cfg: BottleneckConfig, model) -> list[str]:
        if cfg.placement == "pfeiffer":
            return layer_sites(model, "enc", ("ffn",)) + layer_sites(model, "dec", ("ffn",))
        return (layer_sites(model, "enc", ("self", "ffn"))
                + layer_sites(model, "dec", ("self", "cross", "ffn")))

    # ---- one projection ("part"): what Compacter overrides -------------------------------
    @classmethod
    def part_shapes(cls, cfg, model, part: str) -> dict[str, tuple[int, ...]]:
        """Tensors of one projection by suffix: down D (r, d) + b_d (r,), up U (d, r) + b_u (d,)."""
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        return {"weight": (r, d), "bias": (r,)} if part == "down" else {"weight": (d, r), "bias": (d,)}

    @classmethod
    def init_part(cls, cfg, model, part: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        w, b = linear_init(gen, r, d) if part == "down" else linear_init(gen, d, r)
        if part == "up" and cfg.zero_init_up:
            w, b = torch.zeros_like(w), torch.zeros_like(b)
        return {"weight": w, "bias": b}

    @classmethod
    def part_linear(cls, cfg, params, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (d_out, d_in), bias (d_out,)) of the projection stored under ``prefix``."""
        return params[f"{prefix}.weight"], params[f"{prefix}.bias"]

    # ---- sharing across tasks ------------------------------------------------------------
    @classmethod
    def owners(cls, cfg, part: str) -> list[str | None]:
        """Who holds a part: [None] = one copy shared by every task, else one copy per task."""
        return [None] if part in SHARED_PARTS[cfg.sharing] else list(cfg.tasks)

    @classmethod
    def owner(cls, cfg, part: str, task: str | None) -> str | None:
        """Whose copy of ``part`` serves ``task``: None = the shared copy."""
        return None if part in SHARED_PARTS[cfg.sharing] else task

    @classmethod
    def prefix(cls, site: str, part: str, task: str | None) -> str:
        return f"{cls.name}.{site}.{part}" if task is None else f"{cls.name}.{site}.{task}.{part}"

    @classmethod
    def _parts(cls, cfg, model):
        """(part, prefix) of every stored projection, in a fixed order (init draws in it)."""
        return [(part, cls.prefix(site, part, owner)) for site in cls.sites(cfg, model)
                for part in PARTS for owner in cls.owners(cfg, part)]

    # ---- AdapterKind ---------------------------------------------------------------------
    @classmethod
    def module_shapes(cls, cfg, model):
        return {f"{prefix}.{k}": s for part, prefix in cls._parts(cfg, model)
                for k, s in cls.part_shapes(cfg, model, part).items()}

    @classmethod
    def trained_vectors(cls, cfg, model):
        return all_norms(model) if cfg.train_norms else []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        return {f"{prefix}.{k}": v for part, prefix in cls._parts(cfg, model)
                for k, v in cls.init_part(cfg, model, part, gen).items()}

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        """One BottleneckForm per site; a non-single adapter uses ``task``'s per-task projections."""
        if cls.is_task_conditioned(cfg):
            task = pick_task(f"{cls.name} (sharing {cfg.sharing!r})", cfg.tasks, task)
        forms = {}
        for site in cls.sites(cfg, model):
            D, bd = cls.part_linear(cfg, params, cls.prefix(site, "down", cls.owner(cfg, "down", task)))
            U, bu = cls.part_linear(cfg, params, cls.prefix(site, "up", cls.owner(cfg, "up", task)))
            forms[site] = BottleneckForm(D=D, bd=bd, U=U, bu=bu, from_input=cfg.mode == "parallel")
        return CompiledAdapter(bottleneck=forms)
