"""Training for the audio family: the tiny AST's pre-training and PETL-for-AST adapters.

An adapter trains its kind's tensors and its head with cross-entropy on the pooled tokens, the
backbone frozen; a conformer block's BatchNorm normalises with batch statistics and keeps running
ones (stored in the adapter, used at serving), as the seed's ``train()`` mode. The linear probe
(the floor the demo reports) trains a head alone on the frozen backbone's pooled features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from petserve.adapters.backbone.audio import AudioModel, init_audio_weights
from petserve.adapters.data.audio import Featurizer, make_pretraining_clip
from petserve.adapters.kinds import get_kind
from petserve.adapters.kinds.base import KindConfig, Params
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import SingleAdapterWeights


@dataclass(frozen=True)
class AudioTrainConfig:
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-3            # the seed's lr_adapter / lr_LoRA (prompt: 1e-2)
    weight_decay: float = 0.1   # the seed's
    seed: int = 0


def adapter_context(model: AudioModel, kind: str, cfg: KindConfig, params: Params, B: int,
                    batch_stats: bool = False) -> StepContext:
    compiled = get_kind(kind).compile(cfg, params, model)
    weights = SingleAdapterWeights(compiled, model.lm.vector_params(), {}, batch_stats=batch_stats)
    return StepContext(weights, BatchMeta.build([0] * B, 1, model.device))


def train_audio_adapter(model: AudioModel, kind: str, cfg: KindConfig, fbanks: torch.Tensor,
                        labels: list[int], tc: AudioTrainConfig) -> Params:
    """The trained tensors of one adapter (``cfg.labels`` its classes) on (N, frames, mel)."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the backbone must be frozen while adapters train")
    kind_cls = get_kind(kind)
    buffers = kind_cls.buffers(cfg, model)
    params = {k: v.detach().clone().requires_grad_(k not in buffers)
              for k, v in kind_cls.init_params(cfg, model, seed=tc.seed).items()}
    trained = [v for v in params.values() if v.requires_grad]
    opt = torch.optim.AdamW(trained, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, tc.lr, total_steps=tc.steps, pct_start=0.1)
    y = torch.tensor(labels, device=model.device)
    g = torch.Generator().manual_seed(tc.seed)
    for _ in range(tc.steps):
        idx = torch.randint(0, fbanks.shape[0], (tc.batch_size,), generator=g)
        ctx = adapter_context(model, kind, cfg, params, tc.batch_size, batch_stats=True)
        logits = model.classify(fbanks[idx].to(model.device), ctx)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in params.items()}


@torch.no_grad()
def adapter_predictions(model: AudioModel, kind: str, cfg: KindConfig, params: Params,
                        fbanks: torch.Tensor, batch: int = 64) -> list[int]:
    out = []
    for i in range(0, fbanks.shape[0], batch):
        x = fbanks[i:i + batch].to(model.device)
        out += model.classify(x, adapter_context(model, kind, cfg, params, x.shape[0])).argmax(-1).tolist()
    return out


@torch.no_grad()
def pooled_features(model: AudioModel, fbanks: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([model.pooled(fbanks[i:i + batch].to(model.device),
                                   StepContext.backbone_only(min(batch, fbanks.shape[0] - i), model.device))
                      for i in range(0, fbanks.shape[0], batch)])


def linear_probe(model: AudioModel, train: torch.Tensor, labels: list[int], test: torch.Tensor,
                 steps: int = 500, lr: float = 1e-2) -> list[int]:
    """Predictions on ``test`` of a linear head trained (full batch, AdamW) on the frozen
    backbone's pooled features of ``train``."""
    f_train, f_test = pooled_features(model, train), pooled_features(model, test)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    head = torch.nn.Linear(f_train.shape[1], max(labels) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    y = torch.tensor(labels)
    for _ in range(steps):
        loss = F.cross_entropy(head((f_train - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head((f_test - mean) / std).argmax(-1).tolist()


def pretrain_audio_backbone(model: AudioModel, steps: int, seed: int, batch_size: int = 32,
                            lr: float = 1e-3, pool: int = 2048) -> list[float]:
    """Pre-train every weight of ``model`` (fresh) on the sweep-direction x loudness-envelope
    objective (adapters.data.audio.make_pretraining_clip), two linear heads on the pooled
    tokens, then drop the heads. Returns the loss curve (every 50 steps)."""
    torch.manual_seed(seed)
    init_audio_weights(model)
    rng = np.random.default_rng(seed)
    drawn = [make_pretraining_clip(rng) for _ in range(pool)]
    fbanks = Featurizer(model.cfg)([c for c, _, _ in drawn])
    sweep = torch.tensor([s for _, s, _ in drawn])
    env = torch.tensor([e for _, _, e in drawn])
    d = model.cfg.lm.d_model
    heads = torch.nn.ModuleList([torch.nn.Linear(d, 3), torch.nn.Linear(d, 3)])
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps):
        idx = torch.randint(0, pool, (batch_size,), generator=g)
        f = model.pooled(fbanks[idx], StepContext.backbone_only(batch_size, "cpu"))
        loss = F.cross_entropy(heads[0](f), sweep[idx]) + F.cross_entropy(heads[1](f), env[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            curve.append(round(loss.item(), 4))
    model.requires_grad_(False).eval()
    return curve
