"""Builders for the grouped-kernel tests: token -> slot assignments and random slot stacks.

Imports torch only; the Triton modules are imported by the test modules, after conftest.py has set
TRITON_INTERPRET.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import BottleneckStack, LowRankStack

POPULARITIES = ("identical", "distinct", "uniform", "zipf", "skewed")
TOKENS = (1, 7, 64, 130)
RANKS = (8, 16, 64, "mixed")
NUM_SLOTS = (1, 4, 17)
MIXED_RANKS = (8, 16, 24, 32, 40, 48, 56, 64)

# bf16 is only right with compiled kernels: skip without CUDA, and under the interpreter even
# with CUDA (e.g. `make test` on a GPU machine sets TRITON_INTERPRET=1).
compiled_gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs compiled kernels on a CUDA device")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters, so every case is reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def tolerance(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}


def assign(n: int, num_slots: int, popularity: str,
           gen: torch.Generator) -> tuple[torch.Tensor, int]:
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
        D=t(size, big, d, std=d ** -0.5), bd=t(size, big, std=0.3),
        U=t(size, d, big, std=big ** -0.5),
        bu=t(size, d, std=0.3), ranks=torch.tensor(ranks, dtype=torch.int32, device=dev),
        ranks_host=ranks, from_input_host=from_input, gate_host=gates,
        out_scale=(0.5 + torch.rand(size, generator=gen)).to(dev, dtype),
        gate_w=t(size, 2 * d, std=d ** -0.5), gate_b=t(size, std=0.5), gate_vec=t(size, d, std=0.3),
        gate_D=t(size, gate_rank, d, std=d ** -0.5), gate_bd=t(size, gate_rank, std=0.3),
        gate_U=t(size, d, gate_rank, std=gate_rank ** -0.5), gate_bu=t(size, d, std=0.3),
        gate_ranks_host=gate_ranks)


def aot_compile_check(op: str, arch: int = 90) -> int:
    """Compile every kernel launch the ``op`` wrapper makes (all dtypes, tile heights, gate mixes)
    to a cubin for ``sm_<arch>`` without a GPU; return the number of distinct compilations.

    The interpreter accepts code the GPU compiler rejects (types merged across branches,
    constexpr specialisation), so CPU-only CI runs this in a subprocess without TRITON_INTERPRET:
    the wrappers run on CPU tensors and each ``kernel[grid](...)`` is compiled instead of launched.
    """
    from petserve.kernels import triton_bottleneck, triton_lowrank

    mod = triton_lowrank if op == "add_lowrank" else triton_bottleneck
    return aot_compile_launches(mod, lambda: _drive_every_code_path(mod, op), arch)


def aot_compile_launches(mod, drive, arch: int = 90) -> int:
    """Run ``drive()`` with every ``kernel[grid](...)`` of module ``mod`` compiled for
    ``sm_<arch>`` instead of launched; the number of distinct compilations."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.int32: "i32", torch.int64: "i64"}
    done = set()

    def compile_launch(kernel, args, constexprs):
        sig = {n: "*" + types[a.dtype] if isinstance(a, torch.Tensor) else "i32"
               for n, a in zip(kernel.arg_names, args)}
        sig.update({n: "constexpr" for n in constexprs})
        key = (kernel.__name__, tuple(sig.values()), tuple(constexprs.items()))
        if key not in done:
            triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", arch, 32))
            done.add(key)

    _replace_launches(mod, compile_launch)
    drive()
    return len(done)


def _drive_every_code_path(mod, op: str) -> None:
    """Call the ``op`` wrapper of ``mod`` for each dtype; tile heights and gate mixes only change
    constexprs, so the extremes (16 rows, no gate; 64 rows, every gate) cover the code paths."""
    from petserve.kernels.segments import SegmentMeta
    from petserve.kernels.stacks import GATE_NAMES

    cases = [(16, [GATE_NAMES["none"]]), (64, list(GATE_NAMES.values()))]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        gen = generator("aot", op, str(dtype))
        slots, size = token_slots(130, 17, "uniform", gen)
        seg = SegmentMeta.from_slots(slots, torch.arange(130) // 13,
                                     torch.ones(130, dtype=torch.bool), 10)
        ranks = slot_ranks(size, "mixed", gen)
        for block_m, mix in cases if dtype == torch.float16 else cases[1:]:
            if op == "add_lowrank":
                w = lowrank_stack(ranks, 48, 80, dtype, gen)
                mod.add_lowrank_triton(torch.zeros(130, 80, dtype=dtype),
                                       torch.zeros(130, 48, dtype=dtype), w, seg, block_m)
                continue
            w = bottleneck_stack(ranks, [mix[i % len(mix)] for i in range(size)],
                                 [i % 2 == 0 for i in range(size)], 72, dtype, gen)
            h = torch.zeros(130, 72, dtype=dtype)
            mod.bottleneck_residual_triton(h, h, w, seg, block_m)


class _Launcher:
    """Stands in for a ``@triton.jit`` kernel: ``k[grid](*args, **constexprs)`` calls ``hook``."""

    def __init__(self, kernel, hook):
        self.kernel, self.hook = kernel, hook

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.hook(self.kernel, args, constexprs)


def _replace_launches(mod, hook) -> None:
    for name in [n for n in dir(mod) if n.endswith("_kernel")]:
        setattr(mod, name, _Launcher(getattr(mod, name), hook))


def aot_compile_in_subprocess(op: str) -> None:
    """Run :func:`aot_compile_check` for ``op`` in a fresh interpreter-free process; fail the test
    with the compiler's message if a launch does not compile; skip without triton's CUDA backend."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"from tests.kernels import aot_compile_check; print(aot_compile_check({op!r}))"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert int(done.stdout.split()[-1]) > 0


# ---- the CPU gathered paths (test_lowrank_cpu, test_bottleneck_cpu) ----------------------------
def heuristic_cases(gen: torch.Generator) -> dict[str, SegmentMeta]:
    """32 rows: decode (one token each, many slots: gathered), prefill (40 tokens each: the
    reference) and one slot for every row (the reference)."""
    return {"decode": SegmentMeta.from_rows(torch.randint(32, (32,), generator=gen), 1),
            "prefill": SegmentMeta.from_rows(torch.randint(32, (32,), generator=gen), 40),
            "single": SegmentMeta.from_rows(torch.zeros(32, dtype=torch.long), 1)}


def record_paths(monkeypatch, module, names: tuple[str, ...]) -> list[str]:
    """Wrap ``module``'s functions ``names`` so that each call appends its name to the list."""
    taken: list[str] = []
    for name in names:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name: taken.append(_n) or _fn(*a))
    return taken
