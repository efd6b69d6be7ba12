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

Block ``conformer`` (PETL for AST, Cappellazzo et al.): instead of down/up projections, the
conformer convolution module ``pw2 silu(BN(dwconv_k(glu(pw1 src))))``, tensors
``adapter.<site>.conformer.<pw1|dw|bn|pw2>.*`` (pw1: d -> 2r, dw: depthwise kernel k, bn: the
BatchNorm with its running statistics, stored and used at serving, pw2: r -> d). PyTorch's default
initialisation, as the seed; ``zero_init_up`` zeroes pw2 (an exact identity). Single sharing only.
``compile(task)`` picks the task's projections, so a non-single adapter is task-conditioned.
Compacter subclasses this kind and overrides only how one projection is stored (``part_*``).
"""
from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, all_norms, layer_sites, linear_init
from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter, ConformerForm
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
    adjacent_norms: bool = Field(False, description="train only the norms of the sublayers that "
                                 "carry an adapter and the final norms (PETL for AST), not all")
    zero_init_up: bool = False
    sharing: Literal["single", "multiple", "half-shared-down", "half-shared-up"] = "single"
    tasks: tuple[str, ...] = Field(ADAPTER_TASKS, description="tasks of a non-single adapter")
    block: Literal["bottleneck", "conformer"] = "bottleneck"
    kernel_size: int = Field(31, ge=1, le=255, description="conformer depthwise kernel (odd)")

    @model_validator(mode="after")
    def _check_tasks(self):
        if self.sharing != "single":
            check_tasks(self.tasks, f"sharing {self.sharing!r}")
        if self.block == "conformer":
            if self.sharing != "single":
                raise ValueError("a conformer block is shared by every task (sharing 'single')")
            if self.kernel_size % 2 == 0:
                raise ValueError(f"conformer kernel_size must be odd (got {self.kernel_size})")
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

    # ---- the conformer block ---------------------------------------------------------------
    @classmethod
    def conformer_shapes(cls, cfg, model) -> dict[str, tuple[int, ...]]:
        d, r, k = model.cfg.lm.d_model, cls.width(cfg, model), cfg.kernel_size
        return {"pw1.weight": (2 * r, d), "pw1.bias": (2 * r,), "dw.weight": (r, k), "dw.bias": (r,),
                "bn.weight": (r,), "bn.bias": (r,), "bn.running_mean": (r,), "bn.running_var": (r,),
                "pw2.weight": (d, r), "pw2.bias": (d,)}

    @classmethod
    def init_conformer(cls, cfg, model, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Conv1d's default initialisation (fan-in: d, k for the depthwise kernel, r), BatchNorm's
        (weight 1, bias 0, running mean 0, running variance 1)."""
        d, r, k = model.cfg.lm.d_model, cls.width(cfg, model), cfg.kernel_size
        pw1_w, pw1_b = linear_init(gen, 2 * r, d)
        dw_w, dw_b = linear_init(gen, r, k)
        pw2_w, pw2_b = linear_init(gen, d, r)
        if cfg.zero_init_up:
            pw2_w, pw2_b = torch.zeros_like(pw2_w), torch.zeros_like(pw2_b)
        return {"pw1.weight": pw1_w, "pw1.bias": pw1_b, "dw.weight": dw_w, "dw.bias": dw_b,
                "bn.weight": torch.ones(r), "bn.bias": torch.zeros(r),
                "bn.running_mean": torch.zeros(r), "bn.running_var": torch.ones(r),
                "pw2.weight": pw2_w, "pw2.bias": pw2_b}

    @classmethod
    def conformer_form(cls, cfg, params, site: str) -> ConformerForm:
        p = {k: params[f"{cls.name}.{site}.conformer.{k}"] for k in
             ("pw1.weight", "pw1.bias", "dw.weight", "dw.bias", "bn.weight", "bn.bias",
              "bn.running_mean", "bn.running_var", "pw2.weight", "pw2.bias")}
        return ConformerForm(W1=p["pw1.weight"], b1=p["pw1.bias"], dw=p["dw.weight"], bdw=p["dw.bias"],
                             bn_weight=p["bn.weight"], bn_bias=p["bn.bias"],
                             bn_mean=p["bn.running_mean"], bn_var=p["bn.running_var"],
                             W2=p["pw2.weight"], b2=p["pw2.bias"], from_input=cfg.mode == "parallel")

    # ---- AdapterKind ---------------------------------------------------------------------
    @classmethod
    def module_shapes(cls, cfg, model):
        if cfg.block == "conformer":
            return {f"{cls.name}.{site}.conformer.{k}": s for site in cls.sites(cfg, model)
                    for k, s in cls.conformer_shapes(cfg, model).items()}
        return {f"{prefix}.{k}": s for part, prefix in cls._parts(cfg, model)
                for k, s in cls.part_shapes(cfg, model, part).items()}

    @classmethod
    def buffers(cls, cfg, model):
        if cfg.block != "conformer":
            return set()
        return {f"{cls.name}.{site}.conformer.bn.{stat}" for site in cls.sites(cfg, model)
                for stat in ("running_mean", "running_var")}

    @classmethod
    def trained_vectors(cls, cfg, model):
        if not cfg.train_norms:
            return []
        if not cfg.adjacent_norms:
            return all_norms(model)
        sites = {f"{site}_norm" for site in cls.sites(cfg, model)} | {"enc.final_norm", "dec.final_norm"}
        return [n for n in all_norms(model) if n.rsplit(".", 1)[0] in sites]

    @classmethod
    def init_modules(cls, cfg, model, gen):
        if cfg.block == "conformer":
            return {f"{cls.name}.{site}.conformer.{k}": v for site in cls.sites(cfg, model)
                    for k, v in cls.init_conformer(cfg, model, gen).items()}
        return {f"{prefix}.{k}": v for part, prefix in cls._parts(cfg, model)
                for k, v in cls.init_part(cfg, model, part, gen).items()}

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        """One BottleneckForm (or ConformerForm) per site; a non-single adapter uses ``task``'s
        per-task projections."""
        if cfg.block == "conformer":
            return CompiledAdapter(conformer={site: cls.conformer_form(cfg, params, site)
                                              for site in cls.sites(cfg, model)})
        if cls.is_task_conditioned(cfg):
            task = pick_task(f"{cls.name} (sharing {cfg.sharing!r})", cfg.tasks, task)
        forms = {}
        for site in cls.sites(cfg, model):
            D, bd = cls.part_linear(cfg, params, cls.prefix(site, "down", cls.owner(cfg, "down", task)))
            U, bu = cls.part_linear(cfg, params, cls.prefix(site, "up", cls.owner(cfg, "up", task)))
            forms[site] = BottleneckForm(D=D, bd=bd, U=U, bu=bu, from_input=cfg.mode == "parallel")
        return CompiledAdapter(bottleneck=forms)
