"""The CPU fast path of bottleneck_residual (batched matmuls over per-token gathered weights, one
group per slot configuration) against the per-slot reference, and the heuristic between them."""
import itertools

import pytest
import torch

import petserve.kernels.bottleneck as bottleneck
from petserve.kernels.bottleneck import (
    bottleneck_residual,
    bottleneck_residual_gathered,
    bottleneck_residual_reference,
    bottleneck_slot_written,
    prefers_gathered,
)
from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import GATE_LARGE, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_NONE, GATE_SMALL
from tests.kernels import bottleneck_stack, generator, heuristic_cases, record_paths

D = 40
ALL_GATES = (GATE_NONE, GATE_SMALL, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_LARGE)
TOL = {"atol": 1e-5, "rtol": 1e-5}


def case(rows, tokens_per_row, num_slots, gates, ranks="mixed", with_rows=True, key=()):
    """Rows of one slot each (uniform over num_slots, some rows without adapter), padded row ends;
    slot i's gate is gates[i % len(gates)], sources alternate, ranks 1..16 or one rank."""
    gen = generator("bneck-cpu", rows, tokens_per_row, num_slots, gates, ranks, with_rows, *key)
    row_slots = torch.randint(-1, num_slots, (rows,), generator=gen)
    lengths = torch.randint(1, tokens_per_row + 1, (rows, 1), generator=gen)
    valid = (torch.arange(tokens_per_row)[None, :] < lengths).reshape(-1)
    if with_rows:
        seg = SegmentMeta.from_rows(row_slots, tokens_per_row, valid)
    else:
        seg = SegmentMeta.from_slots(row_slots.repeat_interleave(tokens_per_row))
    size = num_slots
    rank_list = (torch.randint(1, 17, (size,), generator=gen).tolist() if ranks == "mixed"
                 else [ranks] * size)
    w = bottleneck_stack(rank_list, [gates[i % len(gates)] for i in range(size)],
                         [i % 2 == 0 for i in range(size)], D, torch.float32, gen)
    n = rows * tokens_per_row
    return seg, w, torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)


_GRID = list(itertools.product((1, 2, 9, 32), (1, 3), [(g,) for g in ALL_GATES] + [ALL_GATES]))


@pytest.mark.parametrize("rows,tokens_per_row,gates", _GRID,
                         ids=[f"rows{r}-t{t}-g{'all' if len(g) > 1 else g[0]}" for r, t, g in _GRID])
def test_gathered_matches_reference(rows, tokens_per_row, gates):
    seg, w, h, x = case(rows, tokens_per_row, 7, gates)
    torch.testing.assert_close(bottleneck_residual_gathered(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg), **TOL)


@pytest.mark.parametrize("gates", [(GATE_SMALL,), ALL_GATES])
def test_small_gate_without_row_ids_averages_per_slot(gates):
    seg, w, h, x = case(12, 2, 5, gates, with_rows=False)
    torch.testing.assert_close(bottleneck_residual_gathered(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg), **TOL)


def test_one_configuration_covering_every_token():
    """One group holds every token: the result is built without index_copy, rows in order."""
    gen = generator("bneck-all")
    seg = SegmentMeta.from_rows(torch.tensor([3, 0, 2, 3, 1, 0]), 2)
    w = bottleneck_stack([6] * 4, [GATE_LARGE] * 4, [True] * 4, D, torch.float32, gen)
    w.gate_ranks_host = [8] * 4
    h, x = torch.randn(12, D, generator=gen), torch.randn(12, D, generator=gen)
    groups = bottleneck.gathered_bottleneck(w, seg)
    assert len(groups) == 1 and groups[0][1] is None
    torch.testing.assert_close(bottleneck_residual_gathered(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg), **TOL)


def test_unadapted_and_rank_zero_tokens_keep_h_and_h_is_not_written():
    seg, w, h, x = case(32, 2, 6, ALL_GATES, key=("zeros",))
    w.ranks_host = [0 if i % 3 == 1 else r for i, r in enumerate(w.ranks_host)]
    before = h.clone()
    out = bottleneck_residual_gathered(h, x, w, seg)
    ranks = torch.tensor(w.ranks_host)
    kept = (seg.token_slots < 0) | (ranks[seg.token_slots.clamp(min=0)] == 0)
    assert kept.any() and (~kept).any()
    assert torch.equal(h, before) and torch.equal(out[kept], h[kept])
    torch.testing.assert_close(out, bottleneck_residual_reference(h, x, w, seg), **TOL)


def test_weights_kept_per_step_and_stack_until_the_stack_changes():
    seg, w, h, x = case(32, 1, 9, ALL_GATES, key=("kept",))
    first = bottleneck.gathered_bottleneck(w, seg)
    assert bottleneck.gathered_bottleneck(w, seg) is first
    w.D = w.D * 2.0                                              # the bank grew the stack
    assert bottleneck.gathered_bottleneck(w, seg) is not first
    torch.testing.assert_close(bottleneck_residual_gathered(h, x, w, seg),
                               bottleneck_residual_reference(h, x, w, seg), **TOL)


def test_heuristic_picks_gathered_for_rows_over_many_slots_and_reference_for_one_slot():
    """The gathered path copies weights per row of a prefill (its tokens share the row's slot),
    so a prefill of rows spread over many adapters takes it like a decode step."""
    gen = generator("bneck-heuristic")
    w = bottleneck_stack([48] * 40, [GATE_SMALL] * 40, [False] * 40, 512, torch.float32, gen)
    picks = {name: prefers_gathered(seg, w) for name, seg in heuristic_cases(gen).items()}
    assert picks == {"decode": True, "prefill": True, "single": False}


@pytest.mark.parametrize("tokens_per_row", [1, 24])
def test_dispatch_on_cpu(monkeypatch, tokens_per_row):
    """bottleneck_residual on CPU takes the path the heuristic names and equals the reference;
    a call that autograd records takes the reference."""
    monkeypatch.setenv("PETSERVE_KERNELS", "auto")
    taken = record_paths(monkeypatch, bottleneck,
                         ("bottleneck_residual_gathered", "bottleneck_residual_reference"))
    gen = generator("bneck-dispatch", tokens_per_row)
    w = bottleneck_stack([16] * 40, [GATE_MIDDLE_X] * 40, [True] * 40, 256, torch.float32, gen)
    seg = SegmentMeta.from_rows(torch.randint(32, (32,), generator=gen), tokens_per_row)
    h = torch.randn(32 * tokens_per_row, 256, generator=gen)
    x = torch.randn(32 * tokens_per_row, 256, generator=gen)
    expected = bottleneck_residual_reference(h, x, w, seg)
    taken.clear()
    torch.testing.assert_close(bottleneck_residual(h, x, w, seg), expected, **TOL)
    want = "gathered" if prefers_gathered(seg, w) else "reference"
    assert taken == [f"bottleneck_residual_{want}"] and want == "gathered"   # 32 rows, ~20 slots
    taken.clear()
    w.D.requires_grad_(True)
    bottleneck_residual(h, x, w, seg).sum().backward()
    assert taken == ["bottleneck_residual_reference"] and w.D.grad.abs().sum() > 0


def test_configurations_follow_slot_writes():
    """A slot rewritten with another rank, source or gate and announced with
    bottleneck_slot_written(w, slot) is
    grouped by its new configuration on the next step."""
    seg, w, h, x = case(32, 1, 7, ALL_GATES, ranks=8)
    bottleneck_residual_gathered(h, x, w, seg)
    for slot, (rank, gate, from_input) in enumerate([(3, GATE_NONE, True), (0, GATE_SMALL, False),
                                                     (5, GATE_MIDDLE_Y, False)]):
        w.ranks[slot], w.ranks_host[slot] = rank, rank
        w.gate_host[slot], w.from_input_host[slot] = gate, from_input
        bottleneck_slot_written(w, slot)
        step = SegmentMeta.from_rows(seg.row_slots, 1)
        assert bottleneck.slot_configs(w)[0][slot] == ((rank, from_input, gate, 0) if rank else None)
        torch.testing.assert_close(bottleneck_residual_gathered(h, x, w, step),
                                   bottleneck_residual_reference(h, x, w, step), **TOL)
