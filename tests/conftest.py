"""Shared fixtures: tiny backbones built in-process and randomly perturbed adapters of every kind."""
from __future__ import annotations

import pytest
import torch

from adapters.backbone import build_backbone
from adapters.kinds import get_kind

# Every kind and notable variant the foundation serves (kind, options).
KIND_VARIANTS = [
    ("lora", {"r": 8}),
    ("lora", {"r": 4, "alpha": 8, "targets": ("enc.ffn.wi", "dec.cross.v", "dec.self.o")}),
    ("adapter", {}),
    ("adapter", {"placement": "pfeiffer", "mode": "parallel", "reduction_factor": 4}),
    ("vlpet", {"gate": "small"}),
    ("vlpet", {"gate": "middleX"}),
    ("vlpet", {"gate": "middleY", "r": 8}),
    ("vlpet", {"gate": "large", "gate_rank": 12}),
]


@pytest.fixture(scope="session")
def tiny_t5():
    return build_backbone("tiny-t5")


@pytest.fixture(scope="session")
def tiny_bart():
    return build_backbone("tiny-bart")


def random_adapter(model, kind: str, options: dict, seed: int, noise: float = 0.3):
    """(config, params): the paper init plus noise, so every module visibly changes the output."""
    k = get_kind(kind)
    cfg = k.resolve(k.Config(**options), model)
    params = k.init_params(cfg, model, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    return cfg, {n: v + noise * torch.randn(v.shape, generator=g).to(v) for n, v in params.items()}


def compiled_adapter(model, kind, options, seed):
    cfg, params = random_adapter(model, kind, options, seed)
    return get_kind(kind).compile(cfg, params, model)
