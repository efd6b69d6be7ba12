"""The papers' learning-rate schedule and data order, as pure functions of the step.

Both depend only on (step, seed, sizes), never on mutable state, so a resumed run sees exactly the
learning rates and batches of an uninterrupted one.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Number of warmup updates: ``ceil(ratio * total)`` (VL-Adapter / VL-PET: ratio 0.1)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    return math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, warmup: int, base_lr: float) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then linear decay.

    ``base * (step + 1) / warmup`` for step < warmup (so the first update is not wasted at 0),
    then ``base * (total - step) / (total - warmup)``: the peak ``base`` at ``step == warmup``,
    ``base / (total - warmup)`` at the last update.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside 0..{total_steps - 1}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * (total_steps - step) / (total_steps - warmup)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


@lru_cache(maxsize=4)
def epoch_order(epoch: int, num_examples: int, seed: int) -> torch.Tensor:
    """The shuffled example order of one epoch: a permutation fixed by (seed, epoch). Do not
    modify the returned tensor (it is cached)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=gen)


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of update ``step``: epochs of shuffled batches (the last one may be short)."""
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(epoch, num_examples, seed)
    return order[k * batch_size:(k + 1) * batch_size].tolist()
