"""Train one adapter of any registered kind on the frozen backbone (the papers' recipe).

AdamW over exactly the tensors ``kind.init_params`` returns (decay on matrices only), linear warmup
(ratio 0.1) then linear decay, gradient-norm clipping at 5.0 (VL-PET's scripts). Each update compiles
the adapter's runtime forms from its leaf tensors (so Compacter / Hyperformer / prompt kinds train
through their own materialisation) and runs the backbone's teacher-forced loss with the adapter in
slot 0. Everything random (initialisation, data order) derives from ``TrainConfig.seed``, so the
same seed on the same machine gives bit-identical tensors, resumed or not.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from petserve.adapters.adapter_file import adapter_bytes, parse_header, reproducible_created
from petserve.adapters.atomic_file import write_atomically
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.data.records import Example
from petserve.adapters.kinds import get_kind
from petserve.adapters.kinds.base import AdapterKind, KindConfig, Params
from petserve.adapters.runtime.compose import compose
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.forms import CompiledAdapter
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import SingleAdapterWeights
from petserve.adapters.training.batches import BatchBuilder, ExampleFeatures
from petserve.adapters.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from petserve.adapters.training.evaluation import evaluate
from petserve.adapters.training.schedule import batch_indices, lr_at, steps_per_epoch, warmup_steps


@dataclass
class TrainConfig:
    steps: int | None = None            # total updates; None: ``epochs`` worth of batches
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    clip_grad: float = 5.0              # max gradient norm; 0 disables clipping
    weight_decay: float = 0.01
    adam_eps: float = 1e-6              # VL-Adapter's scripts
    seed: int = 0
    eval_every: int = 0                 # 0: evaluate once, at the end (when eval data is given)
    eval_batch_size: int = 64
    num_beams: int = 1
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0           # 0: at every evaluation and at the end
    resume: bool = False
    until_step: int | None = None       # stop (checkpointed) after this update: time-sliced runs
    progress: bool = True

    def total_steps(self, num_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch(num_examples, self.batch_size)))


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)     # {"step": updates done, metric: value}


@dataclass
class TrainResult:
    kind: str
    config: KindConfig                  # resolved against the backbone
    task: str
    params: Params                      # detached, on the model's device
    history: TrainHistory               # of this invocation (a resumed run starts mid-way)
    steps_done: int = 0                 # updates behind ``params``, resumed ones included


def train_adapter(model: VLModel, kind: str | type[AdapterKind], cfg: KindConfig | None,
                  examples: list[Example], tc: TrainConfig | None = None,
                  eval_examples: list[Example] | None = None, task: str | None = None,
                  cache: ExampleFeatures | None = None, init: Params | None = None,
                  base: CompiledAdapter | None = None) -> TrainResult:
    """Train an adapter of ``kind`` on ``examples`` (all of one task) and return its tensors.

    ``cfg`` None: the kind's defaults. ``cache`` may be shared between runs on the same backbone.
    ``init``: the starting tensors (default: the kind's initialisation); integer tensors (sft
    indices) stay fixed. ``base``: a fixed adapter composed under the one trained (a language
    SFT under a task SFT). Raises ValueError for an unfrozen backbone, mixed tasks, or a
    checkpoint of another run.
    """
    tc = tc or TrainConfig()
    kind_cls = get_kind(kind) if isinstance(kind, str) else kind
    cfg = kind_cls.resolve(cfg if cfg is not None else kind_cls.Config(), model)
    task = single_task(examples, task)
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the backbone must be frozen (requires_grad False) while adapters train")
    cache = ExampleFeatures(model) if cache is None else cache
    run = _Run(model, kind_cls, cfg, task, tc, BatchBuilder(model, examples, cache, task), init, base)
    start = run.resume_or_start()
    end = min(run.total, tc.until_step or run.total)
    bar = tqdm(total=run.total, initial=start, disable=not tc.progress, desc=f"{kind_cls.name}/{task}",
               dynamic_ncols=True)
    for step in range(start, end):
        loss, lr = run.update(step)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update()
        if eval_examples and run.eval_due():
            metrics = run.evaluate(eval_examples, cache)
            if tc.progress:
                bar.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                          file=sys.stderr)
        if run.checkpoint_due(end):
            run.save()
    bar.close()
    params = {k: v.detach() for k, v in run.params.items()}
    return TrainResult(kind_cls.name, cfg, task, params, run.history, run.step)


def single_task(examples: list[Example], task: str | None) -> str:
    """The one task of ``examples`` (checked against ``task`` when given)."""
    if not examples:
        raise ValueError("no training examples")
    tasks = sorted({ex.task for ex in examples})
    if len(tasks) > 1:
        raise ValueError(f"training examples mix tasks {tasks}; an adapter trains on one task")
    if task is not None and task != tasks[0]:
        raise ValueError(f"the data holds {tasks[0]} examples, but the task is {task}")
    return tasks[0]


class _Run:
    """The mutable state of one training run: leaf tensors, AdamW, the step and its history."""

    def __init__(self, model, kind_cls, cfg, task, tc: TrainConfig, builder: BatchBuilder,
                 init: Params | None = None, base: CompiledAdapter | None = None):
        self.model, self.kind_cls, self.cfg, self.task, self.tc = model, kind_cls, cfg, task, tc
        self.builder, self.n, self.base = builder, len(builder.examples), base
        self.total = tc.total_steps(self.n)
        self.warmup = warmup_steps(self.total, tc.warmup_ratio)
        init = kind_cls.init_params(cfg, model, tc.seed) if init is None else init
        self.params = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                       for k, v in init.items()}
        self.opt = make_optimizer(self.params, tc)
        self.history = TrainHistory()
        self.step = 0

    def weights(self, detached: bool = False) -> SingleAdapterWeights:
        params = {k: v.detach() for k, v in self.params.items()} if detached else self.params
        return adapter_weights(self.model, self.kind_cls, self.cfg, params, self.task, self.base)

    def update(self, step: int) -> tuple[float, float]:
        """One AdamW update on the batch of ``step``; returns (loss, learning rate)."""
        lr = lr_at(step, self.total, self.warmup, self.tc.lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        rows, targets = self.builder.batch(batch_indices(step, self.n, self.tc.batch_size, self.tc.seed))
        loss = adapter_loss(self.model, self.weights(), rows, targets,
                            dropout=getattr(self.cfg, "dropout", 0.0))
        loss.backward()
        if self.tc.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([v for v in self.params.values() if v.requires_grad],
                                           self.tc.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step = step + 1
        value = float(loss.detach())
        self.history.steps.append(self.step), self.history.losses.append(value)
        self.history.lrs.append(lr)
        return value, lr

    def eval_due(self) -> bool:
        every = self.tc.eval_every
        return self.step == self.total or bool(every and self.step % every == 0)

    def evaluate(self, examples: list[Example], cache: ExampleFeatures) -> dict[str, float]:
        """Metrics of the current tensors on held-out ``examples``, recorded in the history."""
        metrics = evaluate(self.model, self.weights(detached=True), examples, self.task, cache,
                           batch_size=self.tc.eval_batch_size, num_beams=self.tc.num_beams)
        self.history.evals.append({"step": self.step, **metrics})
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------
    def identity(self) -> dict:
        tc = self.tc
        return {"kind": self.kind_cls.name, "config": self.cfg.model_dump_json(), "task": self.task,
                "backbone": self.model.fingerprint, "examples": self.n, "steps": self.total,
                "batch_size": tc.batch_size, "lr": tc.lr, "warmup_ratio": tc.warmup_ratio,
                "clip_grad": tc.clip_grad, "weight_decay": tc.weight_decay, "seed": tc.seed}

    def resume_or_start(self) -> int:
        if not (self.tc.resume and self.tc.checkpoint_dir):
            return 0
        state = load_checkpoint(self.tc.checkpoint_dir, self.identity())
        if state is None:
            return 0
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state.params[k])
        self.opt.load_state_dict(state.optimizer)
        torch.set_rng_state(state.torch_rng)
        self.step = state.step
        return state.step

    def checkpoint_due(self, end: int) -> bool:
        if self.tc.checkpoint_dir is None:
            return False
        every = self.tc.checkpoint_every or self.tc.eval_every
        return self.step == end or bool(every and self.step % every == 0)

    def save(self) -> Path:
        return save_checkpoint(self.tc.checkpoint_dir, TrainState(
            self.step, self.params, self.opt.state_dict(), self.identity(), torch.get_rng_state()))


def adapter_weights(model: VLModel, kind_cls: type[AdapterKind], cfg: KindConfig, params: Params,
                    task: str, base: CompiledAdapter | None = None) -> SingleAdapterWeights:
    """One adapter in slot 0, differentiable in ``params`` (the backbone's values stay frozen),
    composed over the fixed ``base`` adapter when one is given."""
    compiled = kind_cls.compile(cfg, params, model, task)
    if base is not None:
        compiled = compose([("base", base), ("trained", compiled)], model)
    return SingleAdapterWeights(compiled,
                                {n: p.detach() for n, p in model.lm.vector_params().items()},
                                {k: v.detach() for k, v in model.visual_embed.state_dict().items()})


def adapter_loss(model: VLModel, weights: SingleAdapterWeights, rows: list, targets: list,
                 dropout: float = 0.0) -> torch.Tensor:
    """Teacher-forced mean token cross-entropy of ``targets`` with every row on slot 0;
    ``dropout``: the kind's training dropout on the low-rank input (LoRA's, 0.1 by default)."""
    ctx = StepContext(weights, BatchMeta.build([0] * len(rows), 1, model.device), dropout)
    return model.loss(rows, targets, ctx)


def make_optimizer(params: Params, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms or vectors)."""
    names = sorted(k for k, v in params.items() if v.is_floating_point())   # sft indices stay
    decay = [params[k] for k in names if params[k].dim() >= 2]
    no_decay = [params[k] for k in names if params[k].dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, eps=tc.adam_eps)


def trained_adapter_bytes(result: TrainResult, model: VLModel, name: str = "") -> bytes:
    """The adapter file of a training result, byte-for-byte reproducible: its ``created`` stamp is
    ``$SOURCE_DATE_EPOCH`` (the reproducible-builds convention) or 0, never the wall clock (the
    adapter store records upload times itself)."""
    from safetensors.torch import load, save
    data = adapter_bytes(result.kind, result.config, result.params, model, result.task, name=name)
    header, _ = parse_header(data)
    meta = json.loads(header["__metadata__"]["petserve"])
    meta["created"] = reproducible_created()
    return save(load(data), metadata={"petserve": json.dumps(meta, separators=(",", ":"))})


def save_trained(path: Path, result: TrainResult, model: VLModel, name: str = "") -> Path:
    """Write :func:`trained_adapter_bytes` to ``path`` atomically (temp file, fsync, rename)."""
    data = trained_adapter_bytes(result, model, name)
    return write_atomically(path, lambda f: f.write(data))
