"""Triton bottleneck residual (+ VL-PET gates) vs the torch reference."""
import itertools

import pytest
import torch
import triton  # noqa: F401  (a hard dependency: its absence fails here)

from petserve.kernels.bottleneck import bottleneck_residual_reference  # noqa: E402
from petserve.kernels.segments import SegmentMeta  # noqa: E402
from petserve.kernels.stacks import (  # noqa: E402
    GATE_LARGE,
    GATE_MIDDLE_X,
    GATE_MIDDLE_Y,
    GATE_NAMES,
    GATE_NONE,
    GATE_SMALL,
)
from petserve.kernels.triton_bottleneck import bottleneck_residual_triton  # noqa: E402
from tests.kernels import (  # noqa: E402
    NUM_SLOTS,
    POPULARITIES,
    RANKS,
    aot_compile_in_subprocess,
    assign,
    bottleneck_stack,
    compiled_gpu_only,
    device,
    generator,
    slot_ranks,
    tolerance,
)

D = 72  # not a multiple of the 64-wide tiles
ROWS_BY_TOKENS = {1: (1, 1), 7: (1, 7), 64: (8, 8), 130: (10, 13)}  # tokens -> (rows, row length)
ALL_GATES = (GATE_NONE, GATE_SMALL, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_LARGE)


def batch_meta(n, num_slots, popularity, gen, with_rows=True):
    """Rows of one slot each (popularity over rows), padded row ends, ~10% tokens of slot -1.

    Returns (seg, token_slots on the host, stack size). With 8+ rows, row 0 is all padding.
    """
    rows, length = ROWS_BY_TOKENS[n]
    row_slots, size = assign(rows, num_slots, popularity, gen)
    valid = torch.arange(length)[None, :] < torch.randint(1, length + 1, (rows, 1), generator=gen)
    if rows >= 8:
        valid[0] = False
    slots = row_slots.repeat_interleave(length)
    if n >= 2:
        slots[torch.randperm(n, generator=gen)[:max(1, round(0.1 * n))]] = -1
    token_rows = torch.arange(rows).repeat_interleave(length)
    dev = device()
    if not with_rows:
        return SegmentMeta.from_slots(slots.to(dev)), slots, size
    seg = SegmentMeta.from_slots(slots.to(dev), token_rows.to(dev), valid.reshape(-1).to(dev), rows)
    return seg, slots, size


def run_case(n, num_slots, popularity, rank, dtype, gates, sources, block_m=None, with_rows=True):
    """gates / sources: per-slot callables ``i -> kind`` and ``i -> from_input``."""
    pattern = [(gates(i), sources(i)) for i in range(10)]  # callables' reprs are not stable
    gen = generator(n, num_slots, popularity, rank, str(dtype), pattern, with_rows)
    seg, slots, size = batch_meta(n, num_slots, popularity, gen, with_rows)
    w = bottleneck_stack(slot_ranks(size, rank, gen), [gates(i) for i in range(size)],
                         [sources(i) for i in range(size)], D, dtype, gen)
    h = torch.randn(n, D, generator=gen).to(device(), dtype)
    x = torch.randn(n, D, generator=gen).to(device(), dtype)
    ref = bottleneck_residual_reference(h, x, w, seg)
    out = bottleneck_residual_triton(h, x, w, seg, block_m=block_m)
    return h, out, ref, slots


def every_gate(i):
    return ALL_GATES[i % len(ALL_GATES)]


def alternate_source(i):
    return i % 2 == 0


# One gate kind for the whole stack: kind x source x CPU dtype; shapes rotate along the product.
_SHAPES = list(itertools.product(ROWS_BY_TOKENS, POPULARITIES))
_PER_GATE = [(g, par, dt, *_SHAPES[(7 * i) % len(_SHAPES)], RANKS[i % len(RANKS)])
             for i, (g, par, dt) in enumerate(itertools.product(
                 GATE_NAMES, (False, True), (torch.float32, torch.float16)))]


@pytest.mark.parametrize(
    "gate,parallel,dtype,n,popularity,rank", _PER_GATE,
    ids=[f"{c[0]}-{'par' if c[1] else 'seq'}-{str(c[2])[6:]}-n{c[3]}-{c[4]}-r{c[5]}"
         for c in _PER_GATE])
def test_each_gate(gate, parallel, dtype, n, popularity, rank):
    kind = GATE_NAMES[gate]
    _, out, ref, _ = run_case(n, 4, popularity, rank, dtype, lambda i: kind, lambda i: parallel)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


# Every gate kind and both sources side by side in one stack: tokens x popularity in full.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("n", list(ROWS_BY_TOKENS))
def test_mixed_gates(n, popularity, dtype):
    _, out, ref, _ = run_case(n, 17, popularity, "mixed", dtype, every_gate, alternate_source)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("num_slots", NUM_SLOTS)
def test_rank_by_slots(rank, num_slots):
    _, out, ref, _ = run_case(130, num_slots, "zipf", rank, torch.float16, every_gate,
                              alternate_source)
    torch.testing.assert_close(out, ref, **tolerance(torch.float16))


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_every_tile_height(block_m):
    _, out, ref, _ = run_case(130, 4, "uniform", "mixed", torch.float32, every_gate,
                              alternate_source, block_m=block_m)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


def test_small_gate_without_rows():
    """No token_rows: the small gate averages over the slot's whole segment."""
    _, out, ref, _ = run_case(64, 4, "uniform", 16, torch.float32, lambda i: GATE_SMALL,
                              alternate_source, with_rows=False)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


def test_small_gate_rows_mixing_slots():
    """A row whose tokens use several slots: the mean is per (slot, row), as in the reference."""
    gen = generator("mixing")
    n, rows = 60, 5
    slots = torch.randint(-1, 4, (n,), generator=gen)
    valid = torch.rand(n, generator=gen) > 0.3
    token_rows = torch.randint(rows, (n,), generator=gen)
    dev = device()
    seg = SegmentMeta.from_slots(slots.to(dev), token_rows.to(dev), valid.to(dev), rows)
    w = bottleneck_stack([16, 8, 32, 24], [GATE_SMALL] * 4, [True, False] * 2, D,
                         torch.float32, gen)
    h, x = (torch.randn(n, D, generator=gen).to(dev) for _ in range(2))
    torch.testing.assert_close(bottleneck_residual_triton(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg),
                               **tolerance(torch.float32))


def test_unassigned_and_rank_zero_rows_are_h_bit_for_bit():
    gen = generator("untouched")
    seg, slots, size = batch_meta(130, 4, "uniform", gen)
    ranks = slot_ranks(size, "mixed", gen)
    ranks[2] = 0
    w = bottleneck_stack(ranks, [every_gate(i) for i in range(size)],
                         [alternate_source(i) for i in range(size)], D, torch.float32, gen)
    h, x = (torch.randn(130, D, generator=gen).to(device()) for _ in range(2))
    out = bottleneck_residual_triton(h, x, w, seg)
    keep = ((slots == -1) | (slots == 2)).to(device())
    assert out.data_ptr() != h.data_ptr()
    assert keep.any() and torch.equal(out[keep], h[keep])
    torch.testing.assert_close(out, bottleneck_residual_reference(h, x, w, seg),
                               **tolerance(torch.float32))


def test_all_unassigned_returns_a_copy_of_h():
    seg = SegmentMeta.from_slots(torch.full((7,), -1, device=device()))
    w = bottleneck_stack([8, 8], [GATE_NONE, GATE_SMALL], [True, False], D, torch.float32,
                         generator("none"))
    h = torch.randn(7, D, device=device())
    out = bottleneck_residual_triton(h, torch.randn(7, D, device=device()), w, seg)
    assert out.data_ptr() != h.data_ptr() and torch.equal(out, h)


def test_gate_tensors_absent_when_unused():
    """Stacks without gates leave the gate tensors None; the kernels must not need them."""
    gen = generator("no-gate-tensors")
    seg, _, size = batch_meta(64, 4, "uniform", gen)
    w = bottleneck_stack(slot_ranks(size, "mixed", gen), [GATE_MIDDLE_Y if i % 2 else GATE_NONE
                                                         for i in range(size)],
                         [alternate_source(i) for i in range(size)], D, torch.float32, gen)
    w.gate_w = w.gate_b = w.gate_D = w.gate_bd = w.gate_U = w.gate_bu = None
    w.gate_ranks_host = None
    h, x = (torch.randn(64, D, generator=gen).to(device()) for _ in range(2))
    torch.testing.assert_close(bottleneck_residual_triton(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg),
                               **tolerance(torch.float32))


def test_rows_past_each_rank_are_never_read():
    """D, U (and the large gate's) entries past each slot's own rank hold NaN."""
    gen = generator("past-rank")
    seg, _, size = batch_meta(130, 17, "uniform", gen)
    w = bottleneck_stack(slot_ranks(size, "mixed", gen), [every_gate(i) for i in range(size)],
                         [alternate_source(i) for i in range(size)], D, torch.float32, gen)
    for s, (r, rg) in enumerate(zip(w.ranks_host, w.gate_ranks_host)):
        w.D[s, r:], w.bd[s, r:], w.U[s, :, r:] = float("nan"), float("nan"), float("nan")
        w.gate_D[s, rg:], w.gate_bd[s, rg:], w.gate_U[s, :, rg:] = (float("nan"),) * 3
    h, x = (torch.randn(130, D, generator=gen).to(device()) for _ in range(2))
    torch.testing.assert_close(bottleneck_residual_triton(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg),
                               **tolerance(torch.float32))


@pytest.mark.slow
def test_every_launch_compiles_for_sm90():
    """The interpreter is lenient; the GPU compiler (run here without a GPU, to a cubin) is not."""
    aot_compile_in_subprocess('bottleneck_residual')


@pytest.mark.gpu
@compiled_gpu_only
@pytest.mark.parametrize("n,popularity", [(7, "identical"), (64, "distinct"), (130, "zipf")])
def test_bf16_gpu(n, popularity):
    _, out, ref, _ = run_case(n, 17, popularity, "mixed", torch.bfloat16, every_gate,
                              alternate_source)
    torch.testing.assert_close(out.float(), ref.float(), atol=5e-2, rtol=5e-2)
