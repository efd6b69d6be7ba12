"""Shared fixtures: tiny backbones built in-process and randomly perturbed adapters of every kind."""
from __future__ import annotations

import pytest
import torch

import petserve.serving.scheduler as scheduler_module
from petserve.adapters.backbone import build_backbone
from petserve.adapters.kinds import get_kind

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
    ("compacter", {}),
    ("compacter", {"n": 4, "reduction_factor": 4, "shared_phm_rule": True, "factorized_phm": True,
                   "phm_rank": 2, "mode": "parallel"}),
    ("hyperformer", {"tasks": ("caption", "vqa"), "task_dim": 16, "hidden_dim": 8}),
    ("prompt", {"length": 2, "mid_dim": 16}),
    ("prompt", {"length": 5}),
    ("adapter", {"sharing": "multiple", "tasks": ("vqa", "caption")}),
    ("adapter", {"sharing": "half-shared-up"}),
]
# Task-conditioned variants are compiled for this task (each has it in its task list).
VARIANT_TASK = "vqa"


@pytest.fixture(scope="session")
def tiny_t5():
    return build_backbone("tiny-t5")


@pytest.fixture(scope="session")
def tiny_bart():
    return build_backbone("tiny-bart")


def random_adapter(model, kind: str, options: dict, seed: int, noise: float = 0.15):
    """(config, params): the paper init plus noise, so every module visibly changes the output."""
    k = get_kind(kind)
    cfg = k.resolve(k.Config(**options), model)
    params = k.init_params(cfg, model, seed)
    g = torch.Generator().manual_seed(1000 + seed)
    return cfg, {n: v + noise * torch.randn(v.shape, generator=g).to(v) for n, v in params.items()}


def compiled_adapter(model, kind, options, seed, task: str = VARIANT_TASK):
    cfg, params = random_adapter(model, kind, options, seed)
    return get_kind(kind).compile(cfg, params, model, task)


@pytest.fixture
def endless(tiny_t5, monkeypatch):
    """End of sequence suppressed, so a job left alone decodes all its tokens: the decode steps
    taken (each step's row count) are recorded in the returned list."""
    steps, real = [], scheduler_module.decode_step

    def no_eos(model, state):
        steps.append(state.tokens.shape[0])
        logprobs = real(model, state)
        logprobs[:, model.cfg.lm.eos_id] = -float("inf")
        return logprobs
    monkeypatch.setattr(scheduler_module, "decode_step", no_eos)
    # every token is new text (the tiny tokenizer decodes many ids to nothing)
    monkeypatch.setattr(tiny_t5, "decode_text", lambda tokens: " ".join(map(str, tokens)))
    return steps
