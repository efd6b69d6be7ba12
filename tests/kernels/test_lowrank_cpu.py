"""The CPU fast path of add_lowrank (batched matmuls over per-row gathered weights) against the
per-slot reference, and the heuristic that picks between them."""
import itertools

import pytest
import torch

import petserve.kernels.lowrank as lowrank
from petserve.kernels.lowrank import (
    add_lowrank,
    add_lowrank_gathered,
    add_lowrank_reference,
    lowrank_slots_written,
    prefers_gathered,
)
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import LowRankStack
from tests.kernels import POPULARITIES, generator, heuristic_cases, record_paths, token_slots

D_IN, D_OUT = 48, 80
RANKS = (1, 4, 8, 16, "mixed", "with-zeros")


def stack(size: int, rank, gen: torch.Generator, d_in=D_IN, d_out=D_OUT) -> LowRankStack:
    """Random CPU stack. "mixed": ranks 1..16 per slot; "with-zeros": some slots of rank 0. Rows
    of A and columns of B past a slot's rank hold garbage (a previous, larger adapter's), which
    must never be read."""
    if rank == "mixed":
        ranks = torch.randint(1, 17, (size,), generator=gen).tolist()
    elif rank == "with-zeros":
        ranks = [0 if i % 3 == 1 else 3 + i % 5 for i in range(size)]
    else:
        ranks = [rank] * size
    big = max(max(ranks), 1) + 3
    A = torch.randn(size, big, d_in, generator=gen) * d_in ** -0.5
    B = torch.randn(size, d_out, big, generator=gen) * big ** -0.5
    scale = 0.5 + torch.rand(size, generator=gen)
    return LowRankStack(A, B, scale, torch.tensor(ranks, dtype=torch.int32), ranks)


def case(n, num_slots, popularity, rank, tokens_per_row=1):
    gen = generator("cpu", n, num_slots, popularity, rank, tokens_per_row)
    slots, size = token_slots(n, num_slots, popularity, gen)
    seg = SegmentMeta.from_rows(slots, tokens_per_row)
    w = stack(size, rank, gen)
    x = torch.randn(n * tokens_per_row, D_IN, generator=gen)
    y = torch.randn(n * tokens_per_row, D_OUT, generator=gen)
    return seg, w, x, y


_GRID = list(itertools.product((1, 2, 7, 33, 64), POPULARITIES, RANKS))


@pytest.mark.parametrize("n,popularity,rank", _GRID,
                         ids=[f"n{n}-{p}-r{r}" for n, p, r in _GRID])
def test_gathered_matches_reference(n, popularity, rank):
    seg, w, x, y = case(n, 9, popularity, rank)
    ref = add_lowrank_reference(y.clone(), x, w, seg)
    got = add_lowrank_gathered(y.clone(), x, w, seg)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens_per_row", [1, 5, 13])
def test_several_tokens_per_row(tokens_per_row):
    seg, w, x, y = case(24, 17, "uniform", "mixed", tokens_per_row)
    torch.testing.assert_close(add_lowrank_gathered(y.clone(), x, w, seg),
                               add_lowrank_reference(y.clone(), x, w, seg), atol=1e-5, rtol=1e-5)


def test_in_place_and_unadapted_tokens_untouched():
    seg, w, x, y = case(64, 5, "uniform", "with-zeros")
    before, ptr = y.clone(), y.data_ptr()
    out = add_lowrank_gathered(y, x, w, seg)
    assert out is y and y.data_ptr() == ptr
    ranks = torch.tensor(w.ranks_host)
    skipped = (seg.token_slots < 0) | (ranks[seg.token_slots.clamp(min=0)] == 0)
    assert skipped.any() and (~skipped).any()
    assert torch.equal(y[skipped], before[skipped])
    assert not torch.equal(y[~skipped], before[~skipped])


def test_every_token_adapted_adds_in_order():
    """Tokens laid out by slot in any order; rows stay in place."""
    gen = generator("all-adapted")
    slots = torch.tensor([3, 0, 2, 3, 1, 0, 2])
    seg, w = SegmentMeta.from_slots(slots), stack(4, 6, gen)
    x, y = torch.randn(7, D_IN, generator=gen), torch.randn(7, D_OUT, generator=gen)
    torch.testing.assert_close(add_lowrank_gathered(y.clone(), x, w, seg),
                               add_lowrank_reference(y.clone(), x, w, seg), atol=1e-5, rtol=1e-5)


def test_one_segment_meta_serves_stacks_of_different_ranks():
    """One SegmentMeta serves every site of a step; each site's stack gets its own copies."""
    seg, w, x, y = case(40, 6, "uniform", "mixed")
    other = stack(w.A.shape[0], 8, generator("other"))
    for ws in (w, other, w):
        torch.testing.assert_close(add_lowrank_gathered(y.clone(), x, ws, seg),
                                   add_lowrank_reference(y.clone(), x, ws, seg),
                                   atol=1e-5, rtol=1e-5)
    assert lowrank.gathered_weights(w, seg) is lowrank.gathered_weights(w, seg)
    assert lowrank.gathered_weights(other, seg) is not lowrank.gathered_weights(w, seg)


def test_row_layout_follows_slot_writes():
    """Slots rewritten in place (a new adapter, a smaller or zero rank) and announced with
    lowrank_slots_written(w, slots), one at a time or several at once, are what the next step
    reads; a slot wider than the layout rebuilds it."""
    seg, w, x, y = case(32, 9, "distinct", 8)
    add_lowrank_gathered(y.clone(), x, w, seg)
    gen = generator("rewrite")
    for slots, rank in (([2], 8), ([3], 5), ([4], 0), ([6, 7, 1], 3), ([0, 8], 8), ([5], 11)):
        for slot in slots:
            w.A[slot, :rank] = torch.randn(rank, D_IN, generator=gen)
            w.B[slot, :, :rank] = torch.randn(D_OUT, rank, generator=gen)
            w.scale[slot] = 0.25 + 0.05 * slot
            w.ranks[slot], w.ranks_host[slot] = rank, rank
        lowrank_slots_written(w, slots)
        step = SegmentMeta.from_rows(seg.token_slots, 1)          # the next step
        torch.testing.assert_close(add_lowrank_gathered(y.clone(), x, w, step),
                                   add_lowrank_reference(y.clone(), x, w, step),
                                   atol=1e-5, rtol=1e-5)
    assert lowrank.row_layout(w).width == 11


def test_heuristic_picks_gathered_for_rows_over_many_slots_and_reference_for_one_slot():
    """The gathered path copies weights per row, so a prefill of rows spread over many adapters
    takes it like a decode step; one slot for every row takes the reference (no copies)."""
    gen = generator("heuristic")
    w = stack(40, 8, gen, d_in=512, d_out=512)
    picks = {name: prefers_gathered(seg, w) for name, seg in heuristic_cases(gen).items()}
    assert picks == {"decode": True, "prefill": True, "single": False}
    wide = stack(40, 128, gen, d_in=512, d_out=512)          # 128K elements per row: not worth it
    few = SegmentMeta.from_rows(torch.tensor([0, 1] * 16), 1)
    assert not prefers_gathered(few, wide)


@pytest.mark.parametrize("tokens_per_row", [1, 40])
@pytest.mark.parametrize("rows", ["spread", "one-slot", "one-slot-and-bare"])
def test_dispatch_on_cpu_matches_reference(monkeypatch, tokens_per_row, rows):
    """add_lowrank on CPU tensors takes the path named for the batch and equals the reference."""
    monkeypatch.setenv("PETSERVE_KERNELS", "auto")
    names = ("add_lowrank_gathered", "add_lowrank_reference", "add_lowrank_one")
    taken = record_paths(monkeypatch, lowrank, names)
    gen = generator("dispatch", tokens_per_row, rows)
    w = stack(40, 8, gen, d_in=D_IN, d_out=D_OUT)
    slots = {"spread": torch.randint(32, (32,), generator=gen),
             "one-slot": torch.full((32,), 7),
             "one-slot-and-bare": torch.tensor([7, -1] * 16)}[rows]
    seg = SegmentMeta.from_rows(slots, tokens_per_row)
    x = torch.randn(32 * tokens_per_row, D_IN, generator=gen)
    y = torch.randn(32 * tokens_per_row, D_OUT, generator=gen)
    expected = add_lowrank_reference(y.clone(), x, w, seg)
    taken.clear()
    torch.testing.assert_close(add_lowrank(y, x, w, seg), expected, atol=1e-5, rtol=1e-5)
    want = "add_lowrank_one" if rows == "one-slot" else \
        "add_lowrank_gathered" if prefers_gathered(seg, w) else "add_lowrank_reference"
    assert taken == [want]


def test_autograd_takes_the_reference():
    """Training records autograd through the reference, never the gathered path."""
    seg, w, x, y = case(32, 9, "distinct", 4)
    assert prefers_gathered(seg, w)
    w.A.requires_grad_(True)
    out = add_lowrank(y.clone(), x, w, seg)
    out.sum().backward()
    assert w.A.grad is not None and w.A.grad.abs().sum() > 0


def test_gathered_weights_kept_per_step_and_stack_until_the_stack_changes():
    seg, w, x, y = case(32, 9, "distinct", "mixed")
    first = lowrank.gathered_weights(w, seg)
    assert lowrank.gathered_weights(w, seg) is first              # the next site / step: reused
    w.A = w.A * 2.0                                               # the bank grew the stack
    assert lowrank.gathered_weights(w, seg) is not first
    torch.testing.assert_close(add_lowrank_gathered(y.clone(), x, w, seg),
                               add_lowrank_reference(y.clone(), x, w, seg), atol=1e-5, rtol=1e-5)


def test_large_gathers_are_not_kept(monkeypatch):
    seg, w, _, _ = case(32, 9, "distinct", 8)
    monkeypatch.setattr(lowrank, "GATHER_CACHE_ELEMENTS", 0)
    assert lowrank.gathered_weights(w, seg) is not lowrank.gathered_weights(w, seg)


@pytest.mark.parametrize("all_adapted", [True, False])
def test_strided_output(all_adapted):
    """y may be a column slice of a wider buffer; only its own columns change."""
    seg, w, x, _ = case(32, 9, "uniform", 8)
    if all_adapted:
        seg = SegmentMeta.from_slots(seg.token_slots.clamp(min=2))
    buf = torch.randn(32, D_OUT + 5, generator=generator("strided"))
    before = buf.clone()
    ref = add_lowrank_reference(buf[:, :D_OUT].clone(), x, w, seg)
    add_lowrank_gathered(buf[:, :D_OUT], x, w, seg)
    torch.testing.assert_close(buf[:, :D_OUT], ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(buf[:, D_OUT:], before[:, D_OUT:])
