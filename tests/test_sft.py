"""Composable sparse fine-tuning: the ``sft`` kind, adapters composed per request, import / export
of composable-sft's file format, and bad input.

The oracle is the dense model built by hand: ``theta0 + d1 + d2`` (+ a LoRA merged into its
weights), run with no adapter at all."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from petserve.adapters.adapter_file import AdapterFileError, adapter_bytes, load_adapter
from petserve.adapters.backbone.visual import feature_tokens
from petserve.adapters.kinds import get_kind
from petserve.adapters.kinds.sft import DENSE, SFTConfig, targets
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.compose import CompositionError, compose
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.sft_format import from_seed, to_seed
from petserve.serving.api import create_app
from petserve.serving.cli import main as cli
from petserve.serving.engine_io import InferenceRequest
from tests.conftest import random_adapter
from tests.test_api import TOKEN, make_backend

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOUCHED = ("lm.enc_layers.0.self_attn.q.weight", "lm.dec_layers.1.ffn.wo.weight",
           "lm.dec_layers.0.cross_attn.v.weight", "lm.tokens.weight",
           "lm.enc_layers.1.ffn_norm.weight", "visual_embed.feat.weight")


def random_sft(model, seed: int, density: float = 0.05, names=TOUCHED, dense: tuple = ()):
    """(config, params): random entries on ``names`` at ``density``, ``dense`` replaced whole."""
    g = torch.Generator().manual_seed(seed)
    known, entries, params = targets(model), {}, {}
    for name in names:
        numel = math.prod(known[name][2])
        k = max(1, int(numel * density))
        params[f"{name}.idx"] = torch.randperm(numel, generator=g)[:k].sort().values
        params[f"{name}.val"] = torch.randn(k, generator=g) * 0.2
        entries[name] = k
    for name in dense:
        base = model.get_parameter(name).detach()
        params[f"{name}.dense"] = base + 0.3 * torch.randn(base.shape, generator=g)
        entries[name] = DENSE
    return SFTConfig(entries=entries), params


def dense_model(model, sfts=(), loras=()):
    """A copy of the backbone with the SFTs' deltas added and the LoRAs merged into its weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for cfg, params in sfts:
            for name, k in cfg.entries.items():
                p = out.get_parameter(name)
                if k == DENSE:
                    p.copy_(params[f"{name}.dense"])
                else:
                    p.view(-1).index_add_(0, params[f"{name}.idx"], params[f"{name}.val"])
        for cfg, params in loras:
            kind = get_kind("lora")
            for site, lin in kind.sites(cfg, out).items():
                scale = cfg.alpha / cfg.r
                lin.weight += scale * params[f"lora.{site}.B"] @ params[f"lora.{site}.A"]
            # a LoRA's trained vectors and visual embedding are changes from theta0, added too
            vectors, base_vectors = out.lm.vector_params(), model.lm.vector_params()
            visual, base_visual = out.visual_embed.state_dict(), model.visual_embed.state_dict()
            for name, v in params.items():
                if name.startswith("vec."):
                    vectors[name[4:]].add_(v - base_vectors[name[4:]])
                elif name.startswith("visual."):
                    visual[name[7:]].add_(v - base_visual[name[7:]])
    return out


def rows(model, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = model.cfg.vision.feat_dim
    return [model.row_input("vqa", "what color is the big shape ?",
                            feature_tokens(torch.randn(5, f, generator=g))) for _ in range(n)]


def logits(model, bank, slots, batch):
    ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, "cpu"))
    enc, valid = model.encode(batch, ctx)
    cache = model.init_cache(enc, valid, ctx)
    dec = torch.tensor([[model.cfg.lm.decoder_start_id, 7, 9, 11]] * len(batch))
    return model.decode(dec, torch.arange(4).expand_as(dec), cache, ctx)


def compiled(model, kind, cfg, params, task="vqa"):
    return load_adapter(adapter_bytes(kind, cfg, params, model, task), model).compile(model, task)


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_a_composite_equals_the_dense_model_built_by_hand(request, family):
    model = request.getfixturevalue(family)
    a, b = random_sft(model, 1), random_sft(model, 2, dense=("visual_embed.box.weight",))
    # a LoRA of moderate size: merged into fp32 weights (the oracle) vs applied unmerged, a large
    # random one differs by fp32 rounding alone beyond the 1e-5 asked (9e-5 at noise 0.15)
    lora = random_adapter(model, "lora", {"r": 4}, seed=3, noise=0.05)
    batch = rows(model, 2)
    with torch.no_grad():
        want = logits(dense_model(model, [a, b], [lora]), SlotBank(model, 1), [-1, -1], batch)
        bank = SlotBank(model, 2)
        bank.set(0, compose([("a", compiled(model, "sft", *a)), ("b", compiled(model, "sft", *b)),
                             ("l", compiled(model, "lora", *lora))], model))
        got = logits(model, bank, [0, 0], batch)
        bare = logits(model, bank, [-1, -1], batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (bare - want).abs().max() > 1e-2


def test_a_composite_is_the_sum_file_and_does_not_depend_on_order(tiny_t5):
    model = tiny_t5
    a, b = random_sft(model, 4), random_sft(model, 5)
    summed = {}
    for name in TOUCHED:                              # one file holding a + b
        numel = math.prod(targets(model)[name][2])
        d = torch.zeros(numel)
        for _, p in (a, b):
            d.index_add_(0, p[f"{name}.idx"], p[f"{name}.val"])
        idx = d.nonzero().squeeze(1)
        summed[f"{name}.idx"], summed[f"{name}.val"] = idx, d[idx]
    ab = SFTConfig(entries={n: int(summed[f"{n}.idx"].numel()) for n in TOUCHED})
    batch = rows(model, 2, seed=1)
    bank = SlotBank(model, 3)
    ca, cb = compiled(model, "sft", *a), compiled(model, "sft", *b)
    bank.set(0, compose([("a", ca), ("b", cb)], model))
    bank.set(1, compose([("b", cb), ("a", ca)], model))
    bank.set(2, compiled(model, "sft", ab, summed))
    with torch.no_grad():
        out = [logits(model, bank, [s, s], batch) for s in range(3)]
    torch.testing.assert_close(out[0], out[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], out[2], atol=1e-5, rtol=1e-5)


def test_composites_singles_and_the_bare_backbone_mix_in_one_batch(tiny_t5):
    model = tiny_t5
    a, b = random_sft(model, 6), random_sft(model, 7, density=0.01)
    lora = random_adapter(model, "lora", {"r": 4}, seed=8)
    bank = SlotBank(model, 4)
    ca, cb, cl = compiled(model, "sft", *a), compiled(model, "sft", *b), compiled(model, "lora", *lora)
    bank.set(0, ca)
    bank.set(1, compose([("a", ca), ("l", cl)], model))
    bank.set(2, compose([("b", cb), ("a", ca)], model))
    bank.set(3, cl)
    slots = [1, -1, 0, 2, 3, 1, 2]
    batch = rows(model, len(slots), seed=2)
    with torch.no_grad():
        mixed = logits(model, bank, slots, batch)
        for i, s in enumerate(slots):
            alone = logits(model, bank, [s], batch[i:i + 1])
            # alone a row may take another kernel path (per-slot vs gathered): sums in another order
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=5e-5, rtol=1e-5)


def test_modules_that_do_not_add_up_name_the_pair(tiny_t5):
    model = tiny_t5
    p1 = compiled(model, "vlpet", *random_adapter(model, "vlpet", {"gate": "small"}, seed=1))
    p2 = compiled(model, "vlpet", *random_adapter(model, "vlpet", {"gate": "large"}, seed=2))
    with pytest.raises(CompositionError, match="'first' and 'second' both bring a module on enc.0.self"):
        compose([("first", p1), ("second", p2)], model)
    q1 = compiled(model, "prompt", *random_adapter(model, "prompt", {"length": 2, "mid_dim": 8}, seed=3))
    q2 = compiled(model, "prompt", *random_adapter(model, "prompt", {"length": 3, "mid_dim": 8}, seed=4))
    with pytest.raises(CompositionError, match="prompt vectors"):
        compose([("p", q1), ("q", q2)], model)
    sft = compiled(model, "sft", *random_sft(model, 5))
    compose([("sft", sft), ("vlpet", p1), ("prompt", q1)], model)       # one of each: fine


# ---- the file format -----------------------------------------------------------------------
def test_bad_sft_files_are_refused_naming_the_problem(tiny_t5):
    model = tiny_t5
    cfg, params = random_sft(model, 9, names=("lm.enc_layers.0.self_attn.q.weight",))
    name = "lm.enc_layers.0.self_attn.q.weight"
    cases = {
        "sorted and unique": lambda p: p[f"{name}.idx"].copy_(p[f"{name}.idx"].flip(0)),
        "outside": lambda p: p[f"{name}.idx"].__setitem__(-1, 10**9),
    }
    for message, spoil in cases.items():
        p = {k: v.clone() for k, v in params.items()}
        spoil(p)
        with pytest.raises(AdapterFileError, match=message) as e:
            load_adapter(adapter_bytes("sft", cfg, p, model, "vqa"), model)
        assert e.value.status == 422
    dup = {k: v.clone() for k, v in params.items()}
    dup[f"{name}.idx"][1] = dup[f"{name}.idx"][0]
    with pytest.raises(AdapterFileError, match="sorted and unique"):
        load_adapter(adapter_bytes("sft", cfg, dup, model, "vqa"), model)
    with pytest.raises(AdapterFileError, match="no such parameter"):
        load_adapter(raw_file(model, cfg, params, entries={"lm.nope.weight": 1},
                              tensors={"lm.nope.weight.idx": torch.tensor([0]),
                                       "lm.nope.weight.val": torch.tensor([1.0])}), model)
    half = {k: (v.to(torch.float16) if k.endswith(".val") else v) for k, v in params.items()}
    with pytest.raises(AdapterFileError, match="float32"):
        load_adapter(raw_file(model, cfg, params, tensors=half), model)
    lora_cfg, lora = random_adapter(model, "lora", {"r": 2}, 0)
    ints = {k: v.to(torch.int64) for k, v in lora.items()}
    with pytest.raises(AdapterFileError, match="floating point"):
        load_adapter(raw_file(model, lora_cfg, lora, kind="lora", tensors=ints), model)


def raw_file(model, cfg, params, kind="sft", entries=None, tensors=None) -> bytes:
    """A file written past adapter_bytes' checks: a good file's metadata with other tensors."""
    import json

    from safetensors.torch import save

    from petserve.adapters.adapter_file import parse_header
    header, _ = parse_header(adapter_bytes(kind, cfg, params, model, "vqa"))
    meta = json.loads(header["__metadata__"]["petserve"])
    if entries is not None:
        meta["config"]["entries"] = entries
    return save(tensors, metadata={"petserve": json.dumps(meta)})


def seed_style_encode(dense: torch.Tensor) -> dict:
    """composable-sft's encode_sparse_tensor, re-derived: first dimension fastest, steps."""
    size = tuple(dense.shape)
    coords = dense.nonzero().T.numpy()
    multipliers = np.cumprod([1] + list(size)[:-1], dtype=np.int64)
    flat = multipliers @ coords
    order = np.argsort(flat)
    flat = flat[order]
    values = dense[tuple(torch.from_numpy(coords))][torch.from_numpy(order)]
    return {"size": torch.Size(size), "index_steps": [int(flat[0])] + np.diff(flat).tolist(),
            "values": values}


def test_their_file_imports_and_exports_exactly(tiny_t5, tmp_path, capsys):
    model = tiny_t5
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(64, 64)
    q.view(-1)[torch.randperm(4096, generator=g)[:80]] = torch.randn(80, generator=g)
    emb = torch.zeros(tuple(model.lm.tokens.weight.shape))
    emb[5, :7] = torch.randn(7, generator=g)
    theirs = {"diffs": {"encoder.block.0.layer.0.SelfAttention.q.weight": seed_style_encode(q),
                        "shared.weight": seed_style_encode(emb)},
              "abs": {"encoder.final_layer_norm.weight": torch.rand(64, generator=g)}}
    cfg, params = from_seed(theirs, model)
    assert set(cfg.entries) == {"lm.enc_layers.0.self_attn.q.weight", "lm.tokens.weight",
                                "lm.enc_final_norm.weight"}
    dense = compiled(model, "sft", cfg, params).sparse["enc.0.self.q"].dense()
    torch.testing.assert_close(dense, q)                          # the same matrix, our order
    back = to_seed(cfg, params, model)
    for name, enc in theirs["diffs"].items():
        assert back["diffs"][name]["size"] == enc["size"]
        assert back["diffs"][name]["index_steps"] == enc["index_steps"]
        assert torch.equal(back["diffs"][name]["values"], enc["values"])
    assert torch.equal(back["abs"]["encoder.final_layer_norm.weight"],
                       theirs["abs"]["encoder.final_layer_norm.weight"])
    # and through the command line, a file on disk each way
    from petserve.adapters.backbone.loading import save_backbone
    save_backbone(model, tmp_path / "bb")
    torch.save(theirs, tmp_path / "pytorch_diff.bin")
    assert cli(["import-sft", str(tmp_path / "pytorch_diff.bin"), "--backbone", str(tmp_path / "bb"),
                "--out", str(tmp_path / "a.safetensors")]) == 0
    assert cli(["export-sft", str(tmp_path / "a.safetensors"), "--backbone", str(tmp_path / "bb"),
                "--out", str(tmp_path / "round.bin")]) == 0
    again = torch.load(tmp_path / "round.bin", weights_only=True)
    assert again["diffs"].keys() == theirs["diffs"].keys()
    for name, enc in theirs["diffs"].items():
        assert again["diffs"][name]["index_steps"] == enc["index_steps"]
        assert torch.equal(again["diffs"][name]["values"], enc["values"])
    theirs["diffs"]["decoder.block.9.layer.0.SelfAttention.q.weight"] = seed_style_encode(q)
    torch.save(theirs, tmp_path / "bad.bin")
    capsys.readouterr()
    assert cli(["import-sft", str(tmp_path / "bad.bin"), "--backbone", str(tmp_path / "bb"),
                "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "decoder.block.9" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


# ---- served ---------------------------------------------------------------------------------
@pytest.fixture
def served(tiny_t5, tmp_path):
    backend, config = make_backend(tiny_t5, tmp_path / "store", num_slots=4)
    backend.start()
    with TestClient(create_app(backend, config)) as client:
        yield client, backend
    backend.stop()


def put(client, model, adapter_id, kind, cfg, params):
    return client.put(f"/v1/adapters/{adapter_id}", headers=AUTH,
                      content=adapter_bytes(kind, cfg, params, model, "vqa"))


def ask(client, adapter, seed=0):
    feats = np.random.default_rng(seed).normal(size=(4, 64)).round(3).tolist()
    return client.post("/v1/vqa", json={"adapter": adapter, "features": feats,
                                        "question": "what color?", "max_new_tokens": 5})


def test_composites_are_served_reported_and_invalidated(served, tiny_t5):
    client, backend = served
    model = tiny_t5
    assert put(client, model, "lang", "sft", *random_sft(model, 11)).status_code == 201
    assert put(client, model, "task", "sft", *random_sft(model, 12)).status_code == 201
    assert put(client, model, "low", "lora", *random_adapter(model, "lora", {"r": 4}, 13)).status_code == 201
    r = ask(client, ["lang", "task", "low"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == ["lang", "task", "low"] and body["adapter_versions"] == [1, 1, 1]
    assert body["adapter_version"] is None
    alone = backend.engine.run_alone(InferenceRequest(
        adapter=("lang", "task", "low"), task="vqa", text="what color?",
        features=np.asarray(np.random.default_rng(0).normal(size=(4, 64)).round(3), np.float32),
        max_new_tokens=5))
    assert body["answer"] == alone.text
    single = ask(client, "lang").json()
    assert single["adapter_versions"] == [1]
    # a new version of a member: the composite is rebuilt with it
    assert put(client, model, "task", "sft", *random_sft(model, 14)).status_code == 201
    assert ask(client, ["lang", "task", "low"]).json()["adapter_versions"] == [1, 2, 1]
    resident = backend.engine.pool.resident()
    assert not any(isinstance(k[0], tuple) and ("task", 1) in k[0] for k in resident)
    # a deleted member: the composite is gone, and asking for it is a 404
    assert client.delete("/v1/adapters/lang", headers=AUTH).status_code == 200
    gone = ask(client, ["lang", "task", "low"])
    assert gone.status_code == 404 and "lang" in gone.json()["error"]["message"]


def test_bad_composites_get_a_clear_4xx(served, tiny_t5):
    client, _ = served
    model = tiny_t5
    for i, gate in enumerate(("small", "large")):
        cfg, params = random_adapter(model, "vlpet", {"gate": gate}, seed=i)
        assert put(client, model, f"pet{i}", "vlpet", cfg, params).status_code == 201
    r = ask(client, ["pet0", "pet1"])
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapters_do_not_compose"
    assert "'pet0' and 'pet1'" in r.json()["error"]["message"]
    r = ask(client, [f"a{i}" for i in range(1000)])
    assert r.status_code == 422 and "16" in r.json()["error"]["message"]
    r = ask(client, ["pet0", "nobody"])
    assert r.status_code == 404 and "nobody" in r.json()["error"]["message"]
    assert ask(client, ["pet0", "pet0"]).status_code == 422
    cfg, params = random_sft(model, 3, names=("lm.enc_layers.0.self_attn.q.weight",))
    key = "lm.enc_layers.0.self_attn.q.weight.idx"
    params[key] = params[key].flip(0)
    r = put(client, model, "unsorted", "sft", cfg, params)
    assert r.status_code == 422 and "sorted" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/unsorted").status_code == 404
