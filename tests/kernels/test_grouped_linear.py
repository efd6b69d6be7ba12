"""Triton grouped dense linear vs the torch reference (CPU interpreter, or CUDA when present)."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (a hard dependency: its absence fails here)

from petserve.kernels.grouped_linear import grouped_linear, grouped_linear_reference  # noqa: E402
from petserve.kernels.segments import SegmentMeta  # noqa: E402
from petserve.kernels.stacks import LinearStack  # noqa: E402
from petserve.kernels.triton_grouped_linear import grouped_linear_triton  # noqa: E402
from tests.kernels import (  # noqa: E402
    NUM_SLOTS,
    POPULARITIES,
    TOKENS,
    compiled_gpu_only,
    device,
    generator,
    token_slots,
    tolerance,
)

D_IN, D_OUT = 40, 72  # not multiples of the 64-wide tiles: every row / column mask is exercised


def linear_stack(size, d_in, d_out, dtype, gen) -> LinearStack:
    """Random stack whose outputs are O(1); slot 0 and the last slot own no tokens (see
    ``tests.kernels.assign``) and hold NaN, so any read of them shows in the result."""
    W = torch.randn(size, d_out, d_in, generator=gen) * max(d_in, 1) ** -0.5
    b = torch.randn(size, d_out, generator=gen) * 0.5
    W[0], W[-1], b[0], b[-1] = float("nan"), float("nan"), float("nan"), float("nan")
    return LinearStack(W.to(device(), dtype), b.to(device(), dtype))


def make_case(n, num_slots, popularity, dtype, d_in=D_IN, d_out=D_OUT):
    gen = generator("grouped_linear", n, num_slots, popularity, str(dtype), d_in, d_out)
    slots, size = token_slots(n, num_slots, popularity, gen)
    w = linear_stack(size, d_in, d_out, dtype, gen)
    x = torch.randn(n, d_in, generator=gen).to(device(), dtype)
    return x, w, SegmentMeta.from_slots(slots.to(device())), slots


def check(x, w, seg, dtype, block_m=None):
    out = grouped_linear_triton(x, w, seg, block_m=block_m)
    ref = grouped_linear_reference(x, w, seg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    return out


# Every token count x popularity x CPU dtype; the slot count rotates along the product.
_MAIN = [(n, pop, dt, NUM_SLOTS[i % len(NUM_SLOTS)])
         for i, (n, pop, dt) in enumerate(itertools.product(
             TOKENS, POPULARITIES, (torch.float32, torch.float16)))]


@pytest.mark.parametrize("n,popularity,dtype,num_slots", _MAIN,
                         ids=[f"n{c[0]}-{c[1]}-{str(c[2])[6:]}-s{c[3]}" for c in _MAIN])
def test_matches_reference(n, popularity, dtype, num_slots):
    x, w, seg, slots = make_case(n, num_slots, popularity, dtype)
    out = check(x, w, seg, dtype)
    neg = (slots == -1).to(device())
    assert bool((out[neg] == 0).all())  # slot -1: exact zeros, not just close


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_every_tile_height(block_m):
    x, w, seg, _ = make_case(130, 4, "uniform", torch.float32)
    check(x, w, seg, torch.float32, block_m=block_m)


@pytest.mark.parametrize("d_in,d_out,dtype", [(5, 72, torch.float32), (5, 24, torch.float16),
                                              (2048, 40, torch.float32), (2048, 40, torch.float16),
                                              (96, 130, torch.float16), (16, 16, torch.float32)],
                         ids=["box-fp32", "box-fp16", "clip-fp32", "clip-fp16", "wide", "exact"])
def test_other_widths(d_in, d_out, dtype):
    """Box embedding (d_in 5 < one K tile), RN101 features (a 32-step K-loop), exact tiles."""
    x, w, seg, _ = make_case(33, 4, "zipf", dtype, d_in=d_in, d_out=d_out)
    check(x, w, seg, dtype)


def test_all_unassigned_gives_zeros():
    x, w, seg, _ = make_case(7, 4, "uniform", torch.float32)
    seg = SegmentMeta.from_slots(torch.full((7,), -1, device=device()))
    out = grouped_linear_triton(x, w, seg)
    assert out.shape == (7, D_OUT) and torch.equal(out, torch.zeros_like(out))


def test_no_tokens():
    x = torch.zeros(0, D_IN, device=device())
    w = linear_stack(3, D_IN, D_OUT, torch.float32, generator("empty"))
    out = grouped_linear_triton(x, w, SegmentMeta.from_slots(torch.zeros(0, dtype=torch.int64,
                                                                        device=device())))
    assert out.shape == (0, D_OUT)


def test_strided_inputs():
    """x a column slice of a wider buffer, W and b non-contiguous views of their stacks."""
    x, w, seg, _ = make_case(40, 4, "skewed", torch.float32)
    xs = torch.cat([torch.randn_like(x), x], 1)[:, D_IN:]
    Wt = w.W.transpose(1, 2).contiguous().transpose(1, 2)       # (S, d_out, d_in), K-major
    bs = torch.stack([w.b, w.b], 2)[..., 1]
    assert not (xs.is_contiguous() or Wt.is_contiguous() or bs.is_contiguous())
    check(xs, LinearStack(Wt, bs), seg, torch.float32)


def test_rejects_bad_arguments():
    x, w, seg, _ = make_case(7, 4, "uniform", torch.float32)
    with pytest.raises(TypeError):
        grouped_linear_triton(x.half(), w, seg)
    with pytest.raises(ValueError):
        grouped_linear_triton(x[:, :-1], w, seg)
    with pytest.raises(ValueError):
        grouped_linear_triton(x[:-1], w, seg)
    with pytest.raises(IndexError):
        grouped_linear_triton(x, LinearStack(w.W[:2], w.b[:2]), seg)


def test_dispatch(monkeypatch):
    """PETSERVE_KERNELS=triton takes the kernel; a differentiable call takes the reference."""
    x, w, seg, _ = make_case(64, 4, "uniform", torch.float32)
    calls = []
    import petserve.kernels.triton_grouped_linear as mod
    monkeypatch.setattr(mod, "grouped_linear_triton",
                        lambda *a: calls.append(1) or grouped_linear_triton(*a))
    monkeypatch.setenv("PETSERVE_KERNELS", "triton")
    torch.testing.assert_close(grouped_linear(x, w, seg), grouped_linear_reference(x, w, seg),
                               **tolerance(torch.float32))
    assert calls == [1]
    W = w.W.clone().requires_grad_(True)
    y = grouped_linear(x, LinearStack(W, w.b), seg)
    assert calls == [1] and y.grad_fn is not None
    monkeypatch.setenv("PETSERVE_KERNELS", "reference")
    grouped_linear(x, w, seg)
    assert calls == [1]


_AOT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from petserve.kernels.triton_grouped_linear import _grouped_linear_kernel as k
n = 0
for dt in ("fp16", "bf16", "fp32"):
    for bm in (16, 64):
        sig = {a: "*" + dt for a in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}
        sig.update({a: "*i64" if a == "order_ptr" else "*i32" if a.endswith("ptr") else "i32"
                    for a in k.arg_names if a not in sig})
        const = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64,
                     DOT_PRECISION="ieee" if dt == "fp32" else "tf32")
        sig.update({a: "constexpr" for a in const})
        triton.compile(ASTSource(k, sig, const), target=GPUTarget("cuda", 90, 32))
        n += 1
print(n)
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """The interpreter is lenient; the GPU compiler (run here without a GPU, to a cubin) is not."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _AOT], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-1] == "6"


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("n,popularity,d_in", [(7, "distinct", 2048), (130, "zipf", 2048),
                                               (130, "skewed", 5)])
def test_bf16_gpu(n, popularity, d_in):
    x, w, seg, _ = make_case(n, 17, popularity, torch.bfloat16, d_in=d_in, d_out=768)
    out = grouped_linear_triton(x, w, seg)
    torch.testing.assert_close(out.float(), grouped_linear_reference(x, w, seg).float(),
                               atol=3e-2, rtol=3e-2)
