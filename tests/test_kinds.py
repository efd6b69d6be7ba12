"""Each kind's paper initialisation and trainable set, and its config validation."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from petserve.adapters.data import make_demo_examples
from petserve.adapters.kinds import KINDS, get_kind
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta


def _logits(model, compiled):
    exs = make_demo_examples("colors", 2, 5)
    rows = [model.row_input(e.task, e.text, model.vision.image_tokens(e.load_images())) for e in exs]
    bank = SlotBank(model, 1)
    slots = [-1, -1]
    if compiled is not None:
        bank.set(0, compiled)
        slots = [0, 0]
    ctx = StepContext(bank, BatchMeta.build(slots, 1, model.device))
    enc, valid = model.encode(rows, ctx)
    cache = model.init_cache(enc, valid, ctx)
    dec = torch.tensor([[model.cfg.lm.decoder_start_id, 9, 17]] * 2)
    return model.decode(dec, torch.arange(3).expand(2, 3), cache, ctx)


def _fresh(model, kind, **options):
    k = get_kind(kind)
    cfg = k.resolve(k.Config(**options), model)
    return k.compile(cfg, k.init_params(cfg, model, seed=3), model)


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
@pytest.mark.parametrize("kind,options", [("lora", {}), ("lora", {"r": 4, "targets": ("enc.ffn.wo",)}),
                                          ("adapter", {"zero_init_up": True}),
                                          ("adapter", {"zero_init_up": True, "mode": "parallel"})])
def test_identity_initialisations_leave_backbone_unchanged(family, kind, options, request):
    model = request.getfixturevalue(family)
    torch.testing.assert_close(_logits(model, _fresh(model, kind, **options)), _logits(model, None),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,options", [("adapter", {}), ("vlpet", {"gate": "large"}),
                                          ("vlpet", {"gate": "small"})])
def test_non_identity_initialisations_do_change_output(tiny_bart, kind, options):
    """VL-Adapter's adapters use nn.Linear's default init and VL-PET's gates start near 0.5: neither
    is an identity, so the test above must not include them."""
    diff = (_logits(tiny_bart, _fresh(tiny_bart, kind, **options)) - _logits(tiny_bart, None)).abs().max()
    assert diff > 1e-3


def _groups(model, kind, **options):
    k = get_kind(kind)
    shapes = k.param_shapes(k.resolve(k.Config(**options), model), model)
    return {g: {n for n in shapes if n.startswith(g + ".")} for g in ("visual", "vec", kind)}


def test_lora_trainable_set(tiny_bart):
    g = _groups(tiny_bart, "lora")
    sites = {n.rsplit(".", 1)[0].removeprefix("lora.") for n in g["lora"]}
    want = {f"{s}.{i}.{sub}.{lin}" for s, subs in (("enc", ["self"]), ("dec", ["self", "cross"]))
            for i in range(2) for sub in subs for lin in "qv"}
    assert sites == want
    biases = {n for n in tiny_bart.lm.vector_params() if n.endswith(".bias")}
    assert any("norm" in n for n in biases) and any(".q.bias" in n for n in biases)
    assert g["vec"] == {f"vec.{n}" for n in biases}          # every bias, no norm weight
    assert len(g["visual"]) == 9


def test_lora_on_t5_trains_no_biases_because_t5_has_none(tiny_t5):
    assert _groups(tiny_t5, "lora")["vec"] == set()


def test_adapter_trainable_set(tiny_bart):
    g = _groups(tiny_bart, "adapter")
    sites = {n.split(".down")[0].split(".up")[0].removeprefix("adapter.") for n in g["adapter"]}
    assert sites == {f"enc.{i}.{s}" for i in range(2) for s in ("self", "ffn")} | \
        {f"dec.{i}.{s}" for i in range(2) for s in ("self", "cross", "ffn")}
    norms = {n for n in tiny_bart.lm.vector_params() if "norm." in n}
    assert g["vec"] == {f"vec.{n}" for n in norms}                  # every LayerNorm
    pf = _groups(tiny_bart, "adapter", placement="pfeiffer")["adapter"]
    assert {n.split(".")[3] for n in pf} == {"ffn"}


def test_vlpet_trainable_set(tiny_bart):
    g = _groups(tiny_bart, "vlpet", gate="large")
    enc_norms = {n for n in tiny_bart.lm.vector_params() if "norm." in n and n.startswith("enc.")}
    assert "enc.embed_norm.weight" in enc_norms
    assert g["vec"] == {f"vec.{n}" for n in enc_norms}              # encoder norms only
    dec = {n for n in g["vlpet"] if n.startswith("vlpet.dec.")}
    assert {n.split(".")[2:5] == [n.split(".")[2], "cross", "v"] for n in dec} == {True}
    assert any(".gate_down." in n for n in g["vlpet"])


def test_vlpet_t5_defaults(tiny_t5, tiny_bart):
    k = get_kind("vlpet")
    t5 = k.resolve(k.Config(), tiny_t5)
    bart = k.resolve(k.Config(), tiny_bart)
    assert (t5.r, t5.gate_scale, t5.zero_init_up) == (192, 0.3, True)
    assert (bart.r, bart.gate_scale, bart.zero_init_up) == (96, 1.0, False)


@pytest.mark.parametrize("kind,options,fragment", [
    ("lora", {"r": 0}, "r"),
    ("lora", {"targets": ("encoder.q",)}, "must look like"),
    ("lora", {"rank": 4}, "rank"),
    ("adapter", {"placement": "middle"}, "placement"),
    ("vlpet", {"gate": "huge"}, "gate"),
    ("vlpet", {"r": 10, "heads": 4}, "divide"),
])
def test_bad_configs_are_rejected_with_a_message(kind, options, fragment):
    with pytest.raises(ValidationError, match=fragment):
        KINDS[kind].Config(**options)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(KeyError, match="lora"):
        get_kind("ia3")
