"""Hyperformer (Karimi Mahabadi et al., ACL 2021; VL-Adapter's setting), kind ``hyperformer``.

A hypernetwork makes the weights of Houlsby bottleneck adapters (the sites of kind ``adapter``) from a
task embedding z_t and a layer-id embedding l_i, one stream (encoder / decoder) at a time:

    e_i = LN(W2 relu(W1 [z_t ; l_i] + b1) + b2)          [z_t ; l_i]: (2*task_dim,) -> hidden -> proj
    D   = reshape(G_d e_i + c_d, (r, d)),   b_d = Gb_d e_i + cb_d  (r,)
    U   = reshape(G_u e_i + c_u, (d, r)),   b_u = Gb_u e_i + cb_u  (d,)
    h  <- h + U act(D h + b_d) + b_u

VL-Adapter (``--use_hyperformer --unique_hyper_net``): task_dim 512, hidden 128, proj 8, r = d/8;
one generator pair (G, Gb for D and for U) per sublayer kind (encoder: self, ffn; decoder: self,
cross, ffn) shared by the stream's layers; separate hypernetworks (W1, W2, LN, layer embeddings) for
encoder and decoder; the task embeddings shared by both. Also trains every LayerNorm and the visual
embedding: 5.79% of VL-BART-base for its four tasks.

The adapter file holds the hypernetwork and the embeddings of ``tasks``; ``compile(task)``
materialises every layer's (D, b_d, U, b_u) for that task, so serving sees bottleneck adapters.
Initialisation as the Hyperformer code: generator and W1/W2 weights N(0, 0.01) with zero biases,
task and layer embeddings N(0, 1), LN weight 1 and bias 0.

Tensors: ``hyperformer.task.<task>`` (task_dim,); per stream ``hyperformer.<stream>.layer`` (L,
task_dim), ``.fc1.*`` (hidden, 2 task_dim), ``.fc2.*`` (proj, hidden), ``.norm.*`` (proj,); per stream
and sublayer ``hyperformer.<stream>.<sub>.<down|up>.weight_gen.*`` (r*d, proj) and ``.bias_gen.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from petserve.adapters.kinds.base import AdapterKind, KindConfig, all_norms
from petserve.adapters.kinds.bottleneck import Bottleneck, check_tasks, pick_task
from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter
from petserve.adapters.tasks import ADAPTER_TASKS

SUBLAYERS = {"enc": ("self", "ffn"), "dec": ("self", "cross", "ffn")}
LN_EPS = 1e-6          # the Hyperformer code's LayerNorm on the projected embedding


class HyperformerConfig(KindConfig):
    tasks: tuple[str, ...] = Field(ADAPTER_TASKS, description="tasks the hypernetwork has embeddings for")
    task_dim: int = Field(512, ge=1, description="width of task and layer-id embeddings")
    hidden_dim: int = Field(128, ge=1, description="hidden width of the task hypernetwork")
    proj_dim: int = Field(8, ge=1, description="width of the layer code e fed to the generators")
    reduction_factor: int = Field(8, ge=1, description="d_model / bottleneck width")
    dim: int | None = Field(None, ge=1, description="bottleneck width (overrides reduction_factor)")
    train_norms: bool = True

    @model_validator(mode="after")
    def _check_tasks(self):
        check_tasks(self.tasks, "hyperformer")
        return self


class Hyperformer(AdapterKind):
    name = "hyperformer"
    Config = HyperformerConfig
    description = "Hyperformer: a task-conditioned hypernetwork generates every bottleneck adapter"
    task_conditioned = True

    @classmethod
    def width(cls, cfg: HyperformerConfig, model) -> int:
        return Bottleneck.width(cfg, model)       # same reduction_factor / dim rule as ``adapter``

    @classmethod
    def _layers(cls, model, stream: str) -> int:
        return model.cfg.lm.enc_layers if stream == "enc" else model.cfg.lm.dec_layers

    @classmethod
    def _linears(cls, cfg, model) -> dict[str, tuple[int, int]]:
        """Every linear of the hypernetwork: name -> (d_out, d_in)."""
        d, r, p = model.cfg.lm.d_model, cls.width(cfg, model), cfg.proj_dim
        out = {}
        for stream, subs in SUBLAYERS.items():
            out[f"{stream}.fc1"] = (cfg.hidden_dim, 2 * cfg.task_dim)
            out[f"{stream}.fc2"] = (p, cfg.hidden_dim)
            for sub in subs:
                gen = f"{stream}.{sub}"
                out.update({f"{gen}.down.weight_gen": (r * d, p), f"{gen}.down.bias_gen": (r, p),
                            f"{gen}.up.weight_gen": (d * r, p), f"{gen}.up.bias_gen": (d, p)})
        return out

    @classmethod
    def module_shapes(cls, cfg, model):
        shapes = {f"hyperformer.task.{t}": (cfg.task_dim,) for t in cfg.tasks}
        for stream in SUBLAYERS:
            shapes[f"hyperformer.{stream}.layer"] = (cls._layers(model, stream), cfg.task_dim)
            shapes.update({f"hyperformer.{stream}.norm.weight": (cfg.proj_dim,),
                           f"hyperformer.{stream}.norm.bias": (cfg.proj_dim,)})
        for name, (d_out, d_in) in cls._linears(cfg, model).items():
            shapes.update({f"hyperformer.{name}.weight": (d_out, d_in), f"hyperformer.{name}.bias": (d_out,)})
        return shapes

    @classmethod
    def trained_vectors(cls, cfg, model):
        return all_norms(model) if cfg.train_norms else []

    @classmethod
    def init_modules(cls, cfg, model, gen):
        params = {}
        for name, shape in cls.module_shapes(cfg, model).items():
            if name.endswith(".layer") or ".task." in name:
                params[name] = torch.randn(shape, generator=gen)
            elif name.endswith(".norm.weight"):
                params[name] = torch.ones(shape)
            elif name.endswith(".weight"):
                params[name] = torch.randn(shape, generator=gen) * 0.01
            else:
                params[name] = torch.zeros(shape)
        return params

    @classmethod
    def layer_codes(cls, cfg, params, stream: str, z: torch.Tensor) -> torch.Tensor:
        """e for every layer of ``stream``: (L, proj_dim) from z (task_dim,)."""
        p = lambda n: params[f"hyperformer.{stream}.{n}"]  # noqa: E731
        layers = p("layer")                                               # (L, task_dim)
        x = torch.cat([z.expand(layers.shape[0], -1), layers], dim=-1)   # (L, 2 task_dim)
        h = F.relu(F.linear(x, p("fc1.weight"), p("fc1.bias")))
        e = F.linear(h, p("fc2.weight"), p("fc2.bias"))
        return F.layer_norm(e, (cfg.proj_dim,), p("norm.weight"), p("norm.bias"), LN_EPS)

    @classmethod
    def generate(cls, params, prefix: str, e: torch.Tensor, shape: tuple[int, int]):
        """(W (L, *shape), b (L, shape[0])) made by the generators under ``prefix`` from e (L, proj)."""
        p = lambda n: params[f"{prefix}.{n}"]  # noqa: E731
        w = F.linear(e, p("weight_gen.weight"), p("weight_gen.bias")).view(-1, *shape)
        return w, F.linear(e, p("bias_gen.weight"), p("bias_gen.bias"))

    @classmethod
    def compile_modules(cls, cfg, params, model, task=None):
        """Materialise every layer's bottleneck for ``task`` (one batched pass per generator)."""
        z = params[f"hyperformer.task.{pick_task('hyperformer adapter', cfg.tasks, task)}"]
        d, r = model.cfg.lm.d_model, cls.width(cfg, model)
        forms = {}
        for stream, subs in SUBLAYERS.items():
            e = cls.layer_codes(cfg, params, stream, z)
            for sub in subs:
                D, bd = cls.generate(params, f"hyperformer.{stream}.{sub}.down", e, (r, d))
                U, bu = cls.generate(params, f"hyperformer.{stream}.{sub}.up", e, (d, r))
                for i in range(e.shape[0]):
                    forms[f"{stream}.{i}.{sub}"] = BottleneckForm(D=D[i], bd=bd[i], U=U[i], bu=bu[i])
        return CompiledAdapter(bottleneck=forms)
