"""The whole model path on the Triton kernels (what CUDA runs) against the torch reference path.

``PETSERVE_KERNELS=triton`` sends every grouped op of the backbone to its Triton kernel even on CPU
tensors (run by the interpreter here, compiled on a GPU), so these tests cover what the kernel
tests cannot: the model's calls, its segment metadata, and every adapter kind in one batch.
"""
from __future__ import annotations

import collections
import random

import pytest
import torch
import triton  # noqa: F401  (a hard dependency: its absence fails here)
from torch.utils._python_dispatch import TorchDispatchMode

import petserve.kernels.bottleneck as bottleneck  # noqa: E402
import petserve.kernels.lowrank as lowrank  # noqa: E402
import petserve.kernels.triton_bottleneck as triton_bottleneck  # noqa: E402
import petserve.kernels.triton_grouped_linear as triton_grouped_linear  # noqa: E402
import petserve.kernels.triton_lowrank as triton_lowrank  # noqa: E402
from petserve.adapters.generation import GenerationRequest, generate  # noqa: E402
from petserve.adapters.runtime.bank import SlotBank  # noqa: E402
from tests.conftest import KIND_VARIANTS, compiled_adapter  # noqa: E402
from tests.test_mixed_batch import _rows, _teacher_forced_logits, popularity  # noqa: E402

LAUNCHERS = ((triton_lowrank, "add_lowrank_triton"),
             (triton_bottleneck, "bottleneck_residual_triton"),
             (triton_grouped_linear, "grouped_linear_triton"))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it (a Python loop over adapters shows as more ops)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def mixed_bank(model, variants=KIND_VARIANTS, copies: int = 1) -> SlotBank:
    """Each variant ``copies`` times (different weights each time), in slots 0.."""
    compiled = [compiled_adapter(model, kind, options, seed=100 * c + i)
                for c in range(copies) for i, (kind, options) in enumerate(variants)]
    bank = SlotBank(model, len(compiled))
    for slot, adapter in enumerate(compiled):
        bank.set(slot, adapter)
    return bank


def count_launches(monkeypatch) -> collections.Counter:
    launches = collections.Counter()
    for module, name in LAUNCHERS:
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            launches[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return launches


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_triton_model_path_equals_reference(family, request, monkeypatch):
    """One batch with every kind variant and rows without adapter: logits and greedy tokens."""
    model = request.getfixturevalue(family)
    bank = mixed_bank(model)
    slots = popularity("distinct", len(KIND_VARIANTS), random.Random(family))
    rows = _rows(model, len(slots))
    gen_requests = [GenerationRequest(r, s, 3) for r, s in zip(rows, slots)]
    out = {}
    launches = count_launches(monkeypatch)
    with torch.no_grad():
        for mode in ("reference", "triton"):
            monkeypatch.setenv("PETSERVE_KERNELS", mode)
            out[mode] = (_teacher_forced_logits(model, bank, rows, slots),
                         [g.tokens for g in generate(model, bank, gen_requests)])
    torch.testing.assert_close(out["triton"][0], out["reference"][0], atol=1e-4, rtol=1e-4)
    assert out["triton"][1] == out["reference"][1]
    assert all(launches[name] > 0 for _, name in LAUNCHERS), launches


def test_no_python_loop_over_adapters(tiny_t5, monkeypatch):
    """2k copies of one row on k adapters (two rows each) and on 2k adapters (one row each): the
    Triton path runs exactly the same aten ops and kernel launches, while the per-slot reference
    path (a loop over slots; the CPU's gathered paths are switched off for it) runs more, so the
    comparison can fail. The tile height is pinned: it follows the mean segment size, which
    halves here, and would change the launch tables (not a loop)."""
    variants = [KIND_VARIANTS[i] for i in (0, 1, 2, 4, 7, 9, 12)]  # lora x2, adapter, vlpet x2,
    k = len(variants)                                               # compacter, prompt
    bank = mixed_bank(tiny_t5, variants, copies=2)
    rows = _rows(tiny_t5, 1) * (2 * k)
    few_slots, many_slots = [j % k for j in range(2 * k)], list(range(2 * k))

    def ops(mode: str, slots: list[int]):
        monkeypatch.setenv("PETSERVE_KERNELS", mode)
        if mode == "reference":
            for module in (lowrank, bottleneck):
                monkeypatch.setattr(module, "prefers_gathered", lambda seg, w: False)
        for module, _ in LAUNCHERS:
            monkeypatch.setattr(module, "pick_block_m", lambda seg: 64)
        launches = count_launches(monkeypatch)
        counter = OpCounter()
        with torch.no_grad(), counter:
            _teacher_forced_logits(tiny_t5, bank, rows, slots)
        monkeypatch.undo()
        return counter.ops, launches

    ops("triton", many_slots)       # builds the per-stack slot tables (once per adapter swap)
    (few, few_launches), (many, many_launches) = ops("triton", few_slots), ops("triton", many_slots)
    assert few == many
    assert few_launches == many_launches and all(few_launches[n] > 0 for _, n in LAUNCHERS)
    ref_few, ref_many = ops("reference", few_slots)[0], ops("reference", many_slots)[0]
    assert sum(ref_many.values()) > sum(ref_few.values())


@pytest.mark.parametrize("family", ["tiny-t5", "tiny-bart"])
def test_triton_model_path_in_fp16(family, monkeypatch):
    """The whole mixed batch in fp16 (what a GPU serves; bf16 is checked on CUDA only, the
    interpreter mangles it): the Triton path stays within a small multiple of the torch fp16
    path's own distance from the fp32 result."""
    from petserve.adapters.backbone import build_backbone
    models = {dtype: build_backbone(family, dtype=dtype) for dtype in (torch.float32, torch.float16)}
    compiled = [compiled_adapter(models[torch.float32], kind, options, seed=i)
                for i, (kind, options) in enumerate(KIND_VARIANTS)]
    slots = popularity("distinct", len(KIND_VARIANTS), random.Random(family))
    logits = {}
    for dtype, mode in ((torch.float32, "reference"), (torch.float16, "reference"),
                        (torch.float16, "triton")):
        model = models[dtype]
        bank = SlotBank(model, len(compiled))
        for slot, adapter in enumerate(compiled):
            bank.set(slot, adapter)
        monkeypatch.setenv("PETSERVE_KERNELS", mode)
        with torch.no_grad():
            logits[dtype, mode] = _teacher_forced_logits(
                model, bank, _rows(model, len(slots)), slots).float()
    exact = logits[torch.float32, "reference"]
    torch_err = (logits[torch.float16, "reference"] - exact).abs().max()
    triton_err = (logits[torch.float16, "triton"] - exact).abs().max()
    assert 0 < torch_err and triton_err <= 4 * torch_err + 1e-3, (triton_err, torch_err)
