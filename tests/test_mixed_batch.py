"""Rows of one batch that use different adapters (and kinds, and none) equal each row run alone."""
from __future__ import annotations

import random

import pytest
import torch

from petserve.adapters.data import make_demo_examples
from petserve.adapters.generation import GenerationRequest, generate
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from tests.conftest import KIND_VARIANTS, compiled_adapter

N_ROWS = 10


def popularity(kind: str, n_adapters: int, rng: random.Random) -> list[int]:
    """Adapter index per row (-1 = none): identical / distinct / zipf / skewed, always with
    two rows that use no adapter."""
    if kind == "identical":
        picks = [0] * (N_ROWS - 2)
    elif kind == "distinct":
        picks = list(range(min(n_adapters, N_ROWS - 2)))
        picks += [rng.randrange(n_adapters) for _ in range(N_ROWS - 2 - len(picks))]
    elif kind == "zipf":
        weights = [1 / (i + 1) ** 1.5 for i in range(n_adapters)]
        picks = rng.choices(range(n_adapters), weights, k=N_ROWS - 2)
    else:  # skewed: most rows on one adapter
        picks = [0 if rng.random() < 0.8 else rng.randrange(n_adapters) for _ in range(N_ROWS - 2)]
    rows = picks + [-1, -1]
    rng.shuffle(rows)
    return rows


def _rows(model, n):
    exs = make_demo_examples("caption", n // 2, 1) + make_demo_examples("count", n - n // 2, 2)
    return [model.row_input(e.task, e.text, model.vision.image_tokens(e.load_images())) for e in exs]


def _teacher_forced_logits(model, bank, rows, slots):
    ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, model.device))
    enc, valid = model.encode(rows, ctx)
    cache = model.init_cache(enc, valid, ctx)
    dec = torch.tensor([[model.cfg.lm.decoder_start_id, 11, 24, 40, 7]] * len(rows))
    pos = torch.arange(dec.shape[1]).expand_as(dec)
    return model.decode(dec, pos, cache, ctx)


def _alone(model, compiled, row, slot_used, fn):
    bank = SlotBank(model, 1)
    if slot_used >= 0:
        bank.set(0, compiled[slot_used])
    return fn(bank, [row], [0 if slot_used >= 0 else -1])


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
@pytest.mark.parametrize("pop", ["identical", "distinct", "zipf", "skewed"])
def test_mixed_batch_equals_each_row_alone(family, pop, request):
    model = request.getfixturevalue(family)
    rng = random.Random(f"{family}-{pop}")
    compiled = [compiled_adapter(model, k, o, seed=i) for i, (k, o) in enumerate(KIND_VARIANTS)]
    order = list(range(len(compiled)))
    rng.shuffle(order)                     # which adapter is "popular" changes per case
    bank = SlotBank(model, len(compiled) + 2)
    for slot, a in enumerate(order):
        bank.set(slot, compiled[a])
    slots = popularity(pop, len(compiled), rng)
    rows = _rows(model, N_ROWS)
    with torch.no_grad():
        mixed = _teacher_forced_logits(model, bank, rows, slots)
        gens = {b: generate(model, bank, [GenerationRequest(r, s, 8, b) for r, s in zip(rows, slots)])
                for b in (1, 3)}
        for i, (row, s) in enumerate(zip(rows, slots)):
            a = order[s] if s >= 0 else -1
            solo = _alone(model, compiled, row, a,
                          lambda bk, r, sl: _teacher_forced_logits(model, bk, r, sl))
            torch.testing.assert_close(mixed[i], solo[0], atol=1e-5, rtol=1e-5)
            for beams, results in gens.items():
                alone = _alone(model, compiled, row, a, lambda bk, r, sl, beams=beams: generate(
                    model, bk, [GenerationRequest(r[0], sl[0], 8, beams)]))[0]
                assert results[i].tokens == alone.tokens, (pop, i, beams)
                assert results[i].logprob == pytest.approx(alone.logprob, abs=1e-4)


def test_adapters_change_outputs(tiny_t5):
    """Guard for the test above: every variant really changes the logits, so equality means something."""
    rows = _rows(tiny_t5, 2)
    base = _teacher_forced_logits(tiny_t5, SlotBank(tiny_t5, 1), rows, [-1, -1])
    for i, (k, o) in enumerate(KIND_VARIANTS):
        bank = SlotBank(tiny_t5, 1)
        bank.set(0, compiled_adapter(tiny_t5, k, o, seed=i))
        out = _teacher_forced_logits(tiny_t5, bank, rows, [0, 0])
        assert (out - base).abs().max() > 1e-2, (k, o)


def test_reset_slot_returns_to_backbone(tiny_t5):
    rows = _rows(tiny_t5, 2)
    bank = SlotBank(tiny_t5, 2)
    base = _teacher_forced_logits(tiny_t5, bank, rows, [-1, -1])
    bank.set(1, compiled_adapter(tiny_t5, "vlpet", {"gate": "large"}, 0))
    bank.set(0, compiled_adapter(tiny_t5, "lora", {"r": 8}, 1))
    bank.reset(1)
    bank.reset(0)
    torch.testing.assert_close(_teacher_forced_logits(tiny_t5, bank, rows, [0, 1]), base)


def test_writes_held_back_in_a_batch_equal_writes_one_by_one(tiny_t5):
    """SlotBank.batched (the scheduler's admission) writes the low-rank parts of its sets and
    resets together: a slot set twice, a slot set then emptied (also on a site no stack exists for
    yet), ranks that grow the stacks and a mix of kinds end as the same weights as the same calls
    one at a time."""
    model = tiny_t5
    adapters = [compiled_adapter(model, "lora", {"r": r}, seed=r) for r in (4, 8, 8, 16, 2)]
    adapters += [compiled_adapter(model, "vlpet", {"gate": "large"}, 7),
                 compiled_adapter(model, "lora", {"r": 8, "targets": ["dec.cross.k", "enc.ffn.wi"]}, 8),
                 compiled_adapter(model, "lora", {"r": 4, "targets": ["enc.self.o"]}, 9)]
    calls = [("set", 0, 0), ("set", 1, 1), ("set", 2, 2), ("set", 3, 5), ("set", 1, 3),
             ("reset", 2, None), ("set", 4, 4), ("set", 2, 6), ("set", 5, 1), ("reset", 5, None),
             ("set", 5, 7), ("reset", 5, None)]          # a site no slot has yet, set and emptied
    rows = _rows(model, 8)
    slots = [0, 1, 2, 3, 4, 5, -1, 1]
    one_by_one, batched = SlotBank(model, 6), SlotBank(model, 6)
    for bank in (one_by_one, batched):
        bank.set(5, adapters[2])                       # stacks and row layouts exist before
        bank.set(0, adapters[1])
        _teacher_forced_logits(model, bank, rows, slots)
    for op, slot, a in calls:
        one_by_one.set(slot, adapters[a]) if op == "set" else one_by_one.reset(slot)
    with batched.batched():
        for op, slot, a in calls:
            batched.set(slot, adapters[a]) if op == "set" else batched.reset(slot)
    with torch.no_grad():
        want = _teacher_forced_logits(model, one_by_one, rows, slots)
        torch.testing.assert_close(_teacher_forced_logits(model, batched, rows, slots), want)
        for i, s in enumerate(slots):
            a = {0: 0, 1: 3, 2: 6, 3: 5, 4: 4}.get(s, -1)
            alone = _alone(model, adapters, rows[i], a,
                           lambda bk, r, sl: _teacher_forced_logits(model, bk, r, sl))
            torch.testing.assert_close(want[i], alone[0], atol=5e-5, rtol=1e-4)
