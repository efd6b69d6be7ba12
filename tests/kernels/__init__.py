"""Builders for the grouped-kernel tests: token -> slot assignments and random slot stacks.

Imports torch only; the Triton modules are imported by the test modules, after conftest.py has set
TRITON_INTERPRET.
"""
from __future__ import annotations

import zlib

import torch

from kernels.stacks import BottleneckStack, LowRankStack

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")
TOKENS = (1, 7, 64, 130)
RANKS = (8, 16, 64, "mixed")
NUM_SLOTS = (1, 4, 17)
MIXED_RANKS = (8, 16, 24, 32, 40, 48, 56, 64)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters, so every case is reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def assign(n: int, num_slots: int, popularity: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Draw one active slot per item; return ``(slots, stack_size)``.

    Active slots are 1..A (A = num_slots, or n for "distinct"); slots 0 and A + 1 of the
    stack never get items, so every case has slots that own no tokens.
    """
    active = max(num_slots, n) if popularity == "distinct" else num_slots
    if popularity == "identical":
        idx = torch.full((n,), int(torch.randint(active, (1,), generator=gen)))
    elif popularity == "distinct":
        idx = torch.randperm(active, generator=gen)[:n]
    elif popularity == "uniform":
        idx = torch.randint(active, (n,), generator=gen)
    elif popularity == "zipf":
        probs = 1.0 / torch.arange(1, active + 1, dtype=torch.float64) ** 1.2
        idx = torch.multinomial(probs, n, replacement=True, generator=gen)
    elif popularity == "skewed":  # 90% of the items on one hot slot, the rest uniform
        idx = torch.randint(active, (n,), generator=gen)
        idx[torch.rand(n, generator=gen) < 0.9] = 0
    else:
        raise ValueError(popularity)
    return idx + 1, active + 2


def token_slots(n: int, num_slots: int, popularity: str, gen: torch.Generator):
    """:func:`assign` per token, then ~10% of the tokens (at least one when n >= 2) get slot -1."""
    slots, size = assign(n, num_slots, popularity, gen)
    if n >= 2:
        k = max(1, round(0.1 * n))
        slots[torch.randperm(n, generator=gen)[:k]] = -1
    return slots, size


def slot_ranks(size: int, rank, gen: torch.Generator) -> list[int]:
    """Per-slot ranks: one value, or ``"mixed"`` = 8..64 drawn per slot; the first and last
    active slots (1 and size - 2, see :func:`assign`) get 64 and 8."""
    if rank != "mixed":
        return [rank] * size
    pick = torch.randint(len(MIXED_RANKS), (size,), generator=gen).tolist()
    ranks = [MIXED_RANKS[i] for i in pick]
    ranks[size - 2] = 8
    ranks[1] = 64
    return ranks


def randn(gen: torch.Generator, *shape, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def lowrank_stack(ranks: list[int], d_in: int, d_out: int, dtype, gen) -> LowRankStack:
    """Random stack with A ~ 1/sqrt(d_in), B ~ 1/sqrt(R) so deltas are O(1); R = max rank."""
    size, big = len(ranks), max(max(ranks), 1)
    dev = device()
    A = randn(gen, size, big, d_in, std=d_in ** -0.5).to(dev, dtype)
    B = randn(gen, size, d_out, big, std=big ** -0.5).to(dev, dtype)
    scale = (0.5 + torch.rand(size, generator=gen)).to(dev, dtype)
    return LowRankStack(A, B, scale, torch.tensor(ranks, dtype=torch.int32, device=dev), ranks)


def bottleneck_stack(ranks: list[int], gates: list[int], from_input: list[bool], d: int, dtype,
                     gen, gate_rank: int = 16) -> BottleneckStack:
    """Random bottleneck stack with every gate tensor present; gate ranks are 8 or ``gate_rank``."""
    size, big = len(ranks), max(max(ranks), 1)
    dev = device()

    def t(*shape, std):
        return randn(gen, *shape, std=std).to(dev, dtype)

    gate_ranks = [8 if i % 2 else gate_rank for i in range(size)]
    return BottleneckStack(
        D=t(size, big, d, std=d ** -0.5), bd=t(size, big, std=0.3), U=t(size, d, big, std=big ** -0.5),
        bu=t(size, d, std=0.3), ranks=torch.tensor(ranks, dtype=torch.int32, device=dev),
        ranks_host=ranks, from_input_host=from_input, gate_host=gates,
        out_scale=(0.5 + torch.rand(size, generator=gen)).to(dev, dtype),
        gate_w=t(size, 2 * d, std=d ** -0.5), gate_b=t(size, std=0.5), gate_vec=t(size, d, std=0.3),
        gate_D=t(size, gate_rank, d, std=d ** -0.5), gate_bd=t(size, gate_rank, std=0.3),
        gate_U=t(size, d, gate_rank, std=gate_rank ** -0.5), gate_bu=t(size, d, std=0.3),
        gate_ranks_host=gate_ranks)
