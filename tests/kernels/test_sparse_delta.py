"""add_sparse (per-slot COO deltas on a linear): every path against a dense oracle built by hand,
``y + x @ dW[s].T`` with dW[s] densified from the slot's entries (CPU interpreter, or CUDA)."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # noqa: F401  (a hard dependency: its absence fails here)

import petserve.kernels.sparse as sparse
import petserve.kernels.triton_sparse as triton_sparse
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.sparse import (
    add_sparse,
    add_sparse_gathered,
    add_sparse_reference,
    gathered_pairs,
    prefers_gathered,
)
from petserve.kernels.stacks import SparseStack
from petserve.kernels.triton_sparse import add_sparse_triton
from tests.kernels import (
    POPULARITIES,
    compiled_gpu_only,
    device,
    generator,
    heuristic_cases,
    record_paths,
    token_slots,
)

D_IN, D_OUT = 24, 40      # d_out != d_in; 960 cells: 0.2% is 2 entries, 20% is 192
# Per slot s the density DENSITIES[(s + 1) % 5]: slots 3, 8, ... hold no delta, and active slots
# 1..A (tests.kernels.assign) include one whenever A >= 3.
DENSITIES = (0.002, 0.01, 0.05, 0.2, 0.0)
PATHS = {"reference": add_sparse_reference, "gathered": add_sparse_gathered,
         "triton": add_sparse_triton}


def sparse_stack(size: int, gen: torch.Generator, dtype=torch.float32, dev="cpu", d_in=D_IN,
                 d_out=D_OUT, densities=DENSITIES) -> SparseStack:
    """Random stack: slot s holds ``densities[(s + 1) % len]`` of the cells, sorted by (row, col)."""
    rows, cols, ptr = [], [], [0]
    for s in range(size):
        nnz = round(densities[(s + 1) % len(densities)] * d_in * d_out)
        flat = torch.randperm(d_in * d_out, generator=gen)[:nnz].sort().values
        rows.append(flat // d_in)
        cols.append(flat % d_in)
        ptr.append(ptr[-1] + nnz)
    vals = torch.randn(ptr[-1], generator=gen)
    return SparseStack(torch.cat(rows).to(dev), torch.cat(cols).to(dev), vals.to(dev, dtype),
                       torch.tensor(ptr, device=dev), ptr, d_out, d_in)


def dense_delta(w: SparseStack, vals: torch.Tensor | None = None) -> torch.Tensor:
    """(S, d_out, d_in) with dW[s, rows[e], cols[e]] = vals[e]; differentiable in ``vals``."""
    vals = w.vals if vals is None else vals
    size = len(w.ptr_host) - 1
    counts = torch.tensor([w.count(s) for s in range(size)], device=vals.device)
    slot_of = torch.repeat_interleave(torch.arange(size, device=vals.device), counts)
    zero = vals.new_zeros(size, w.d_out, w.d_in)
    return zero.index_put((slot_of, w.rows, w.cols), vals)


def oracle(y, x, w, slots, vals=None) -> torch.Tensor:
    """``y[t] + x[t] @ dW[s].T`` per token (s >= 0), in fp64 from the inputs as given."""
    work = torch.float64
    vals = (w.vals if vals is None else vals).to(work)
    dw = dense_delta(w, vals)[slots.clamp(min=0)]                     # (N, d_out, d_in)
    delta = torch.einsum("ni,noi->no", x.to(work), dw)
    return y.to(work) + torch.where((slots >= 0)[:, None], delta, 0.0)


def case(n, num_slots, popularity, dtype, dev="cpu", key=()):
    gen = generator("sparse", n, num_slots, popularity, str(dtype), *key)
    slots, size = token_slots(n, num_slots, popularity, gen)
    w = sparse_stack(size, gen, dtype, dev)
    x = torch.randn(n, D_IN, generator=gen).to(dev, dtype)
    y = torch.randn(n, D_OUT, generator=gen).to(dev, dtype)
    return SegmentMeta.from_slots(slots.to(dev)), w, x, y, slots.to(dev)


def check(out, want, dtype):
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.to(want.dtype), want, **tol)


_CPU_GRID = list(itertools.product((1, 7, 64), POPULARITIES, (torch.float32, torch.float16)))
_CPU_IDS = [f"n{n}-{p}-{str(dt)[6:]}" for n, p, dt in _CPU_GRID]


def force_densify(monkeypatch, mode: str) -> None:
    """"gather" / "densify": every slot of the reference takes that branch of slot_delta."""
    if mode != "auto":
        monkeypatch.setattr(sparse, "densify_pays", lambda *args: mode == "densify")


@pytest.mark.parametrize("path", ["reference", "reference-gather", "reference-densify", "gathered"])
@pytest.mark.parametrize("n,popularity,dtype", _CPU_GRID, ids=_CPU_IDS)
def test_cpu_paths_match_dense(monkeypatch, path, n, popularity, dtype):
    force_densify(monkeypatch, path.partition("-")[2] or "auto")
    seg, w, x, y, slots = case(n, 9, popularity, dtype)
    check(PATHS[path.partition("-")[0]](y.clone(), x, w, seg), oracle(y, x, w, slots), dtype)


def test_densify_rule():
    assert not sparse.densify_pays(1, 5898, 768, 768)             # decode, 1%: gather
    assert not sparse.densify_pays(512, 590, 768, 768)            # prefill, 0.1%: gather
    assert sparse.densify_pays(512, 5898, 768, 768)               # prefill, 1%: densify
    assert sparse.densify_pays(64, 192, D_OUT, D_IN) and not sparse.densify_pays(64, 2, D_OUT, D_IN)


# Under the interpreter every program is a numpy step: tiny shapes, a slice of the grid.
_TRITON_GRID = [(n, pop, dt) for (n, pop), dt in itertools.product(
    [(1, "identical"), (7, "distinct"), (33, "uniform"), (33, "zipf"), (33, "skewed")],
    (torch.float32, torch.float16))]


@pytest.mark.parametrize("n,popularity,dtype", _TRITON_GRID,
                         ids=[f"n{n}-{p}-{str(dt)[6:]}" for n, p, dt in _TRITON_GRID])
def test_triton_matches_dense(n, popularity, dtype):
    seg, w, x, y, slots = case(n, 9, popularity, dtype, device())
    check(add_sparse_triton(y.clone(), x, w, seg), oracle(y, x, w, slots), dtype)


@pytest.mark.parametrize("block_m,block_e", [(1, 16), (4, 32), (16, 64), (2, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_every_block_shape(block_m, block_e, dtype):
    """Several entry blocks per slot (block_e 16 < 192 entries) and tiles split mid-segment."""
    seg, w, x, y, slots = case(40, 4, "skewed", dtype, device())
    out = add_sparse_triton(y.clone(), x, w, seg, block_m=block_m, block_e=block_e)
    check(out, oracle(y, x, w, slots), dtype)


@pytest.mark.parametrize("path", list(PATHS))
def test_in_place_and_untouched_rows(path):
    """Slot -1 tokens and tokens of slots without entries keep y bit for bit; others change."""
    dev = device() if path == "triton" else "cpu"
    seg, w, x, y, slots = case(64, 9, "uniform", torch.float32, dev, key=("in-place",))
    before, ptr = y.clone(), y.data_ptr()
    out = PATHS[path](y, x, w, seg)
    assert out is y and y.data_ptr() == ptr
    nnz = torch.tensor([w.count(s) for s in range(len(w.ptr_host) - 1)], device=dev)
    skipped = (slots < 0) | (nnz[slots.clamp(min=0)] == 0)
    assert (slots < 0).any() and (skipped & (slots >= 0)).any() and (~skipped).any()
    assert torch.equal(y[skipped], before[skipped])
    assert (y[~skipped] != before[~skipped]).any(dim=1).all()


@pytest.mark.parametrize("path", list(PATHS))
def test_strided_inputs(path):
    """x and y as column slices of wider buffers (e.g. a fused qkv output)."""
    dev = device() if path == "triton" else "cpu"
    seg, w, x, y, slots = case(33, 9, "zipf", torch.float32, dev, key=("strided",))
    xbuf = torch.randn(33, 2 * D_IN, device=dev)
    xbuf[:, D_IN:] = x
    ybuf = torch.randn(33, 3 * D_OUT, device=dev)
    ybuf[:, D_OUT:2 * D_OUT] = y
    untouched = ybuf[:, 2 * D_OUT:].clone()
    PATHS[path](ybuf[:, D_OUT:2 * D_OUT], xbuf[:, D_IN:], w, seg)
    check(ybuf[:, D_OUT:2 * D_OUT], oracle(y, x, w, slots), torch.float32)
    assert torch.equal(ybuf[:, 2 * D_OUT:], untouched)


@pytest.mark.parametrize("path", list(PATHS))
def test_nothing_to_add_is_a_no_op(path):
    """Every token unassigned, or only slots without entries present."""
    dev = device() if path == "triton" else "cpu"
    w = sparse_stack(6, generator("empty"), dev=dev)             # slot 3 holds no delta
    for slots in ([-1] * 5, [3, -1, 3, 3, -1]):
        seg = SegmentMeta.from_slots(torch.tensor(slots, device=dev))
        y = torch.randn(5, D_OUT, device=dev)
        before = y.clone()
        assert PATHS[path](y, torch.randn(5, D_IN, device=dev), w, seg) is y
        assert torch.equal(y, before)


@pytest.mark.parametrize("tokens_per_row", [1, 3])
def test_gathered_several_tokens_per_row_and_kept_pairs(tokens_per_row):
    gen = generator("rows", tokens_per_row)
    seg = SegmentMeta.from_rows(torch.randint(-1, 12, (20,), generator=gen), tokens_per_row)
    w = sparse_stack(12, gen)
    x = torch.randn(seg.num_tokens, D_IN, generator=gen)
    y = torch.randn(seg.num_tokens, D_OUT, generator=gen)
    want = oracle(y, x, w, seg.token_slots)
    check(add_sparse_gathered(y.clone(), x, w, seg), want, torch.float32)
    assert gathered_pairs(w, seg) is gathered_pairs(w, seg)        # built once per step
    check(add_sparse_gathered(y.clone(), x, w, seg), want, torch.float32)
    other = sparse_stack(12, gen)                                  # another site's stack
    check(add_sparse_gathered(y.clone(), x, other, seg), oracle(y, x, other, seg.token_slots),
          torch.float32)


@pytest.mark.parametrize("mode", ["gather", "densify"])
@pytest.mark.parametrize("y_grad", [False, True], ids=["y-plain", "y-grad"])
def test_reference_gradients_match_dense(monkeypatch, y_grad, mode):
    """d/dx and d/dvals of the reference (what LT-SFT training differentiates) equal the dense
    oracle's, on both branches of slot_delta; y is left as it was and a new tensor returned."""
    force_densify(monkeypatch, mode)
    seg, w, x, y, slots = case(33, 9, "zipf", torch.float64, key=("grad",))
    vals = w.vals.clone().requires_grad_()
    w.vals = vals
    x.requires_grad_()
    y.requires_grad_(y_grad)
    before = y.detach().clone()
    out = add_sparse(y, x, w, seg)                               # records grad: the reference
    assert out is not y and torch.equal(y.detach(), before)
    upstream = torch.randn(out.shape, generator=generator("upstream"), dtype=torch.float64)
    got = torch.autograd.grad(out, [x, vals] + [y] * y_grad, upstream)
    want_out = oracle(y, x, w, slots, vals)
    want = torch.autograd.grad(want_out, [x, vals] + [y] * y_grad, upstream)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=1e-12)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-12)


def heuristic_stack(gen: torch.Generator) -> SparseStack:
    """32 slots of 1,000 entries each on a 64 x 64 weight (d 768 at ~0.2%, in pairs per token)."""
    return sparse_stack(32, gen, d_in=64, d_out=64, densities=(1000 / 4096,))


def test_dispatch_picks_gathered_for_decode_only(monkeypatch):
    monkeypatch.delenv("PETSERVE_KERNELS", raising=False)
    gen = generator("heuristic")
    w = heuristic_stack(gen)
    cases = heuristic_cases(gen)
    assert prefers_gathered(cases["decode"], w)
    assert not prefers_gathered(cases["prefill"], w)              # ~40K pairs per slot
    assert not prefers_gathered(cases["single"], w)               # one slot: no overhead to save
    taken = record_paths(monkeypatch, sparse, ("add_sparse_gathered", "add_sparse_reference"))
    for seg in cases.values():
        x = torch.randn(seg.num_tokens, 64, generator=gen)
        y = torch.randn(seg.num_tokens, 64, generator=gen)
        check(add_sparse(y.clone(), x, w, seg), oracle(y, x, w, seg.token_slots), torch.float32)
    decode = cases["decode"]
    x = torch.randn(decode.num_tokens, 64, generator=gen, requires_grad=True)
    add_sparse(torch.zeros(decode.num_tokens, 64), x, w, decode)   # training: the reference
    assert taken == ["add_sparse_gathered", "add_sparse_reference", "add_sparse_reference",
                     "add_sparse_reference"]


def test_dispatch_forced_triton(monkeypatch):
    """PETSERVE_KERNELS=triton sends CPU tensors to the kernel (the interpreter here)."""
    monkeypatch.setenv("PETSERVE_KERNELS", "triton")
    taken = record_paths(monkeypatch, triton_sparse, ("add_sparse_triton",))
    seg, w, x, y, slots = case(7, 4, "uniform", torch.float32, device(), key=("forced",))
    check(add_sparse(y.clone(), x, w, seg), oracle(y, x, w, slots), torch.float32)
    assert taken == ["add_sparse_triton"]


def aot_compile_check(arch: int = 90) -> int:
    """Compile every launch add_sparse_triton makes (each dtype, decode and prefill tiles) to a
    cubin for ``sm_<arch>`` without a GPU (tests.kernels.aot_compile_launches); return the number
    of distinct compilations."""
    from tests.kernels import aot_compile_launches

    def drive():
        for dtype, tokens_per_row in itertools.product(
                (torch.float16, torch.bfloat16, torch.float32), (1, 40)):
            seg = SegmentMeta.from_rows(torch.arange(-1, 7), tokens_per_row)
            w = sparse_stack(8, generator("aot"), dtype)
            add_sparse_triton(torch.zeros(seg.num_tokens, D_OUT, dtype=dtype),
                              torch.zeros(seg.num_tokens, D_IN, dtype=dtype), w, seg)
    return aot_compile_launches(triton_sparse, drive, arch)


@pytest.mark.slow
def test_every_launch_compiles_for_sm90():
    """The interpreter is lenient; the GPU compiler (run here without a GPU, to a cubin) is not."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from tests.kernels.test_sparse_delta import aot_compile_check; "
            "print(aot_compile_check())")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert int(done.stdout.split()[-1]) >= 6


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("n,popularity", [(7, "distinct"), (130, "zipf"), (130, "skewed")])
def test_bf16_gpu(n, popularity):
    seg, w, x, y, slots = case(n, 17, popularity, torch.bfloat16, "cuda")
    out = add_sparse_triton(y.clone(), x, w, seg)
    torch.testing.assert_close(out.double(), oracle(y, x, w, slots), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("tokens_per_row", [1, 16])
def test_serving_size_gpu(tokens_per_row):
    """768 x 768 at 1% for 64 slots, decode and prefill tiles, fp32 against the CPU reference."""
    gen = generator("serving-size", tokens_per_row)
    seg = SegmentMeta.from_rows(torch.randint(-1, 64, (64,), generator=gen), tokens_per_row)
    w = sparse_stack(64, gen, d_in=768, d_out=768, densities=(0.01,))
    x = torch.randn(seg.num_tokens, 768, generator=gen)
    y = torch.randn(seg.num_tokens, 768, generator=gen)
    want = add_sparse_reference(y.clone(), x, w, seg)
    cuda = SparseStack(w.rows.cuda(), w.cols.cuda(), w.vals.cuda(), w.ptr.cuda(), w.ptr_host,
                       768, 768)
    seg_cuda = SegmentMeta.from_slots(seg.token_slots.cuda())
    out = add_sparse_triton(y.cuda(), x.cuda(), cuda, seg_cuda)
    torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)
