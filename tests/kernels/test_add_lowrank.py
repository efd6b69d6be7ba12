"""Triton grouped low-rank delta vs the torch reference (CPU interpreter, or CUDA when present)."""
import itertools

import pytest
import torch
import triton  # noqa: F401  (a hard dependency: its absence fails here)

from petserve.kernels.lowrank import add_lowrank_reference  # noqa: E402
from petserve.kernels.segments import SegmentMeta  # noqa: E402
from petserve.kernels.triton_lowrank import add_lowrank_triton  # noqa: E402
from tests.kernels import (  # noqa: E402
    NUM_SLOTS,
    POPULARITIES,
    RANKS,
    TOKENS,
    aot_compile_in_subprocess,
    compiled_gpu_only,
    device,
    generator,
    lowrank_stack,
    slot_ranks,
    token_slots,
    tolerance,
)

D_IN, D_OUT = 48, 80  # not multiples of the 64-wide tiles: every column mask is exercised


def run_case(n, num_slots, popularity, rank, dtype, d_in=D_IN, d_out=D_OUT, block_m=None):
    """Build a case, run both paths; return (y before, triton result, reference result, seg)."""
    gen = generator(n, num_slots, popularity, rank, str(dtype), d_in, d_out)
    slots, size = token_slots(n, num_slots, popularity, gen)
    w = lowrank_stack(slot_ranks(size, rank, gen), d_in, d_out, dtype, gen)
    seg = SegmentMeta.from_slots(slots.to(device()))
    x = torch.randn(n, d_in, generator=gen).to(device(), dtype)
    y0 = torch.randn(n, d_out, generator=gen).to(device(), dtype)
    ref = add_lowrank_reference(y0.clone(), x, w, seg)
    out = add_lowrank_triton(y0.clone(), x, w, seg, block_m=block_m)
    return y0, out, ref, seg


# Every token count x popularity x CPU dtype; rank and slot count rotate along the product so that
# each value of each appears with several shapes (the full product is too slow for the
# interpreter; test_rank_by_slots covers rank x slots in full).
_MAIN = [(n, pop, dt, RANKS[i % len(RANKS)], NUM_SLOTS[i % len(NUM_SLOTS)])
         for i, (n, pop, dt) in enumerate(itertools.product(
             TOKENS, POPULARITIES, (torch.float32, torch.float16)))]


@pytest.mark.parametrize("n,popularity,dtype,rank,num_slots", _MAIN,
                         ids=[f"n{c[0]}-{c[1]}-{str(c[2])[6:]}-r{c[3]}-s{c[4]}" for c in _MAIN])
def test_matches_reference(n, popularity, dtype, rank, num_slots):
    _, out, ref, _ = run_case(n, num_slots, popularity, rank, dtype)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("num_slots", NUM_SLOTS)
def test_rank_by_slots(rank, num_slots, dtype):
    _, out, ref, _ = run_case(130, num_slots, "zipf", rank, dtype)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_every_tile_height(block_m):
    _, out, ref, _ = run_case(130, 4, "uniform", "mixed", torch.float32, block_m=block_m)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


@pytest.mark.parametrize("d_in,d_out", [(96, 32), (32, 96)])
def test_other_widths(d_in, d_out):
    _, out, ref, _ = run_case(64, 4, "skewed", "mixed", torch.float16, d_in=d_in, d_out=d_out)
    torch.testing.assert_close(out, ref, **tolerance(torch.float16))


def test_in_place_and_unassigned_rows_untouched():
    gen = generator("in-place")
    slots, size = token_slots(64, 4, "uniform", gen)
    w = lowrank_stack(slot_ranks(size, "mixed", gen), D_IN, D_OUT, torch.float32, gen)
    seg = SegmentMeta.from_slots(slots.to(device()))
    x = torch.randn(64, D_IN, generator=gen).to(device())
    y = torch.randn(64, D_OUT, generator=gen).to(device())
    before, ptr = y.clone(), y.data_ptr()
    out = add_lowrank_triton(y, x, w, seg)
    assert out is y and y.data_ptr() == ptr
    neg = (slots == -1).to(device())
    assert neg.any() and torch.equal(y[neg], before[neg])
    assert not torch.equal(y[~neg], before[~neg])


def test_rank_zero_slots_untouched():
    gen = generator("rank-zero")
    slots, size = token_slots(64, 4, "uniform", gen)
    ranks = slot_ranks(size, 16, gen)
    ranks[1] = ranks[3] = 0  # two slots that own tokens but have no adapter at this site
    w = lowrank_stack(ranks, D_IN, D_OUT, torch.float32, gen)
    seg = SegmentMeta.from_slots(slots.to(device()))
    x = torch.randn(64, D_IN, generator=gen).to(device())
    y = torch.randn(64, D_OUT, generator=gen).to(device())
    ref = add_lowrank_reference(y.clone(), x, w, seg)
    out = add_lowrank_triton(y.clone(), x, w, seg)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))
    skip = ((slots == 1) | (slots == 3) | (slots == -1)).to(device())
    assert torch.equal(out[skip], y[skip])


def test_all_unassigned_is_a_no_op():
    seg = SegmentMeta.from_slots(torch.full((7,), -1, device=device()))
    w = lowrank_stack([8, 8], D_IN, D_OUT, torch.float32, generator("none"))
    y = torch.randn(7, D_OUT, device=device())
    before = y.clone()
    assert add_lowrank_triton(y, torch.randn(7, D_IN, device=device()), w, seg) is y
    assert torch.equal(y, before)


def test_strided_inputs():
    """x and y as column slices of wider buffers (e.g. a fused qkv output)."""
    gen = generator("strided")
    slots, size = token_slots(40, 4, "zipf", gen)
    w = lowrank_stack(slot_ranks(size, "mixed", gen), D_IN, D_OUT, torch.float32, gen)
    seg = SegmentMeta.from_slots(slots.to(device()))
    x = torch.randn(40, 2 * D_IN, generator=gen).to(device())[:, D_IN:]
    ybuf = torch.randn(40, 3 * D_OUT, generator=gen).to(device())
    ref = add_lowrank_reference(ybuf[:, D_OUT:2 * D_OUT].clone(), x, w, seg)
    add_lowrank_triton(ybuf[:, D_OUT:2 * D_OUT], x, w, seg)
    torch.testing.assert_close(ybuf[:, D_OUT:2 * D_OUT], ref, **tolerance(torch.float32))


def test_rows_past_each_rank_are_never_read():
    """A[s, r_s:] and B[s, :, r_s:] hold NaN: any read past a slot's own rank would show."""
    gen = generator("past-rank")
    slots, size = token_slots(130, 17, "uniform", gen)
    w = lowrank_stack(slot_ranks(size, "mixed", gen), D_IN, D_OUT, torch.float32, gen)
    for s, r in enumerate(w.ranks_host):
        w.A[s, r:] = float("nan")
        w.B[s, :, r:] = float("nan")
    seg = SegmentMeta.from_slots(slots.to(device()))
    x = torch.randn(130, D_IN, generator=gen).to(device())
    y = torch.randn(130, D_OUT, generator=gen).to(device())
    out = add_lowrank_triton(y.clone(), x, w, seg)
    torch.testing.assert_close(out, add_lowrank_reference(y.clone(), x, w, seg),
                               **tolerance(torch.float32))


@pytest.mark.slow
def test_every_launch_compiles_for_sm90():
    """The interpreter is lenient; the GPU compiler (run here without a GPU, to a cubin) is not."""
    aot_compile_in_subprocess('add_lowrank')


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("n,popularity", [(7, "distinct"), (130, "zipf"), (130, "skewed")])
def test_bf16_gpu(n, popularity):
    _, out, ref, _ = run_case(n, 17, popularity, "mixed", torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)
