"""What every adapter kind provides, and the trainable extras the papers share.

A kind is one file: a pydantic config whose defaults are its paper's settings, the names and shapes of
its tensors (what an adapter file must contain), its paper initialisation, and ``compile`` into the
canonical runtime forms. Registering it is one line in ``adapters/kinds/__init__.py``.

Tensor names in an adapter file: ``visual.<key>`` (the visual embedding), ``vec.<name>`` (a backbone
norm weight/bias or linear bias the kind trains), ``head.weight`` / ``head.bias`` (a classification
head over ``labels``, the audio family's adapters) and ``<kind>.<site>.<tensor>`` for its own modules.
A kind may store tensors that are not trained (``buffers``: a BatchNorm's running statistics).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from petserve.adapters.backbone.model import VLModel
from petserve.adapters.runtime.forms import CompiledAdapter, HeadForm

Shapes = dict[str, tuple[int, ...]]
Params = dict[str, torch.Tensor]


class KindConfig(BaseModel):
    """Options shared by every kind. Unknown options are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    train_visual_embedding: bool = True
    labels: tuple[str, ...] = Field((), description="classes of a classification head on the "
                                    "pooled encoder output (audio family); none: no head")

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v):
        if len(set(v)) != len(v) or any(not label.strip() for label in v):
            raise ValueError(f"head labels must be distinct and non-empty: {list(v)}")
        return v


class AdapterKind(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[KindConfig]]
    description: ClassVar[str] = ""
    # True when the runtime forms depend on the task (Hyperformer, task-shared adapters): the
    # serving slot pool then keys a slot by (adapter, version, task).
    task_conditioned: ClassVar[bool] = False

    @classmethod
    def is_task_conditioned(cls, cfg: KindConfig) -> bool:
        """Whether *this config's* runtime forms depend on the task (the bottleneck adapter is only
        when shared across tasks in ``multiple`` / ``half-shared-*`` mode). Default: the class flag."""
        return cls.task_conditioned

    @classmethod
    def resolve(cls, cfg: KindConfig, model: VLModel) -> KindConfig:
        """Fill defaults that depend on the backbone (e.g. VL-PET's T5 settings)."""
        return cfg

    @classmethod
    @abstractmethod
    def module_shapes(cls, cfg: KindConfig, model: VLModel) -> Shapes:
        """Shapes of the kind's own tensors (not the visual embedding or backbone vectors)."""

    @classmethod
    @abstractmethod
    def trained_vectors(cls, cfg: KindConfig, model: VLModel) -> list[str]:
        """Names of the backbone vectors (norms, biases) this kind trains."""

    @classmethod
    @abstractmethod
    def init_modules(cls, cfg: KindConfig, model: VLModel, gen: torch.Generator) -> Params:
        """The paper's initialisation of the kind's own tensors."""

    @classmethod
    def buffers(cls, cfg: KindConfig, model: VLModel) -> set[str]:
        """Names of stored tensors that are not trained by gradient (running statistics)."""
        return set()

    @classmethod
    def check_params(cls, cfg: KindConfig, params: Params, model: VLModel) -> None:
        """Raise ValueError when a file's tensors have the right names and shapes but are still
        wrong (dtypes, index order). Every kind but ``sft`` stores floating-point tensors only."""
        ints = [k for k, v in params.items() if not v.is_floating_point()]
        if ints:
            raise ValueError(f"tensor {ints[0]!r} has dtype {params[ints[0]].dtype}; {cls.name} "
                             "tensors are floating point")

    @classmethod
    @abstractmethod
    def compile_modules(cls, cfg: KindConfig, params: Params, model: VLModel,
                        task: str | None = None) -> CompiledAdapter:
        """Runtime forms of the kind's own tensors (must keep autograd: training calls it).
        ``task`` selects the task of task-conditioned kinds; others ignore it."""

    # ---- shared by all kinds -------------------------------------------------------------
    @classmethod
    def param_shapes(cls, cfg: KindConfig, model: VLModel) -> Shapes:
        """Every tensor an adapter file of this kind and config holds, with its shape."""
        shapes = dict(cls.module_shapes(cfg, model))
        vectors = model.lm.vector_params()
        for name in cls.trained_vectors(cfg, model):
            shapes[f"vec.{name}"] = tuple(vectors[name].shape)
        if cfg.train_visual_embedding:
            shapes.update({f"visual.{k}": tuple(v.shape) for k, v in model.visual_embed.state_dict().items()})
        if cfg.labels:
            shapes.update({"head.weight": (len(cfg.labels), model.cfg.lm.d_model),
                           "head.bias": (len(cfg.labels),)})
        return shapes

    @classmethod
    def init_params(cls, cfg: KindConfig, model: VLModel, seed: int = 0) -> Params:
        """A freshly initialised adapter: the kind's modules plus copies of the backbone's values
        for the vectors and visual embedding it trains (so those start where the backbone is)."""
        gen = torch.Generator().manual_seed(seed)
        params = {k: v.to(model.dtype) if v.is_floating_point() else v
                  for k, v in cls.init_modules(cfg, model, gen).items()}
        vectors = model.lm.vector_params()
        for name in cls.trained_vectors(cfg, model):
            params[f"vec.{name}"] = vectors[name].detach().clone()
        if cfg.train_visual_embedding:
            params.update({f"visual.{k}": v.detach().clone()
                           for k, v in model.visual_embed.state_dict().items()})
        if cfg.labels:
            w, b = linear_init(gen, len(cfg.labels), model.cfg.lm.d_model)
            params["head.weight"], params["head.bias"] = w.to(model.dtype), b.to(model.dtype)
        return {k: v.to(model.device) for k, v in params.items()}

    @classmethod
    def compile(cls, cfg: KindConfig, params: Params, model: VLModel,
                task: str | None = None) -> CompiledAdapter:
        """All runtime forms of one adapter (for ``task`` if the kind is task-conditioned)."""
        compiled = cls.compile_modules(cfg, params, model, task)
        compiled.vectors.update({k[4:]: v for k, v in params.items() if k.startswith("vec.")})
        if cfg.train_visual_embedding:
            # None when the backbone has no visual embedding (the audio family)
            compiled.visual = {k: params[f"visual.{k}"] for k in model.visual_embed.state_dict()} or None
        if cfg.labels:
            compiled.head = HeadForm(params["head.weight"], params["head.bias"])
        return compiled


def all_norms(model: VLModel, stream: str | None = None) -> list[str]:
    """Names of every norm weight/bias (of one stream, "enc" or "dec", if given)."""
    names = [n for n in model.lm.vector_params() if "norm." in n]
    return [n for n in names if stream is None or n.startswith(f"{stream}.")]


def all_biases(model: VLModel) -> list[str]:
    """Every bias, LayerNorm biases included (VL-Adapter trains each parameter named "bias")."""
    return [n for n in model.lm.vector_params() if n.endswith(".bias")]


def linear_init(gen: torch.Generator, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation, drawn from ``gen`` (what the papers' code used)."""
    bound = d_in ** -0.5
    w = (torch.rand(d_out, d_in, generator=gen) * 2 - 1) * bound
    b = (torch.rand(d_out, generator=gen) * 2 - 1) * bound
    return w, b


def layer_sites(model: VLModel, stream: str, sublayers: tuple[str, ...]) -> list[str]:
    """Sublayer sites such as ``enc.0.self`` for every layer of a stream."""
    n = model.cfg.lm.enc_layers if stream == "enc" else model.cfg.lm.dec_layers
    return [f"{stream}.{i}.{s}" for i in range(n) for s in sublayers]
