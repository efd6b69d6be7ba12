"""Compacter, Hyperformer, prompt tuning and the adapter's sharing modes: each materialised form
equals its method run directly, prompts of any length batch with anything, bad configs say why."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from petserve.adapters.adapter_file import adapter_bytes, load_adapter
from petserve.adapters.backbone.visual import feature_tokens
from petserve.adapters.kinds import get_kind
from petserve.adapters.kinds.compacter import phm_weight
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import SingleAdapterWeights
from petserve.kernels.bottleneck import act
from tests.conftest import random_adapter

TEXTS = [("vqa", "what color is the shape?"), ("caption", ""), ("vqa", "how many shapes are there?"),
         ("vqa", "what shape is it?"), ("caption", ""), ("vqa", "what color is it?")]


def _rows(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = model.cfg.vision.feat_dim
    return [model.row_input(t, q, feature_tokens(torch.randn(4 + i % 3 * 5, f, generator=g)))
            for i, (t, q) in enumerate(TEXTS[:n])]


def _logits(model, compiled: list, rows, slots):
    """Teacher-forced logits (B, 4, V) with ``compiled[s]`` in slot s."""
    bank = SlotBank(model, max(len(compiled), 1))
    for s, c in enumerate(compiled):
        bank.set(s, c)
    ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, model.device))
    with torch.no_grad():
        enc, valid = model.encode(rows, ctx)
        cache = model.init_cache(enc, valid, ctx)
        dec = torch.tensor([[model.cfg.lm.decoder_start_id, 11, 24, 7]] * len(rows))
        return model.decode(dec, torch.arange(4).expand_as(dec), cache, ctx)


def _as_plain_adapter(model, params, weights: dict):
    """Kind ``adapter`` holding the given per-site (D, bd, U, bu) plus ``params``' norms and visual."""
    k = get_kind("adapter")
    cfg = k.Config()
    plain = {n: v for n, v in params.items() if n.startswith(("vec.", "visual."))}
    for site, (D, bd, U, bu) in weights.items():
        plain.update({f"adapter.{site}.down.weight": D, f"adapter.{site}.down.bias": bd,
                      f"adapter.{site}.up.weight": U, f"adapter.{site}.up.bias": bu})
    assert set(plain) == set(k.param_shapes(cfg, model))
    return k.compile(cfg, plain, model)


# ---- Compacter ---------------------------------------------------------------------------
def _kron_sum(A, B):
    """H = sum_i A_i (kron) B_i with torch.kron: (d_in, d_out), the Compacter code's y = x H + b."""
    return sum(torch.kron(A[i], B[i]) for i in range(A.shape[0]))


def _direct_phm(cfg, params, prefix):
    A = params["compacter.phm_rule"] if cfg.shared_phm_rule else params[f"{prefix}.A"]
    B = params[f"{prefix}.s"] @ params[f"{prefix}.t"] if cfg.factorized_phm else params[f"{prefix}.B"]
    return _kron_sum(A, B), params[f"{prefix}.bias"]


def test_phm_weight_is_the_transposed_kronecker_sum():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 3, 3, generator=g), torch.randn(3, 4, 5, generator=g)
    torch.testing.assert_close(phm_weight(A, B), _kron_sum(A, B).T)


COMPACTERS = [{}, {"n": 4, "reduction_factor": 4, "shared_phm_rule": True, "factorized_phm": True,
                   "phm_rank": 3}]


@pytest.mark.parametrize("options", COMPACTERS)
def test_compacter_adapter_output_equals_direct_phm_layers(tiny_bart, options):
    """Random x through PHM down -> act -> PHM up (Kronecker products built here) equals the
    materialised BottleneckForm's U act(D x + b_d) + b_u, at every site."""
    cfg, params = random_adapter(tiny_bart, "compacter", options, seed=1)
    compiled = get_kind("compacter").compile(cfg, params, tiny_bart)
    x = torch.randn(7, tiny_bart.cfg.lm.d_model, generator=torch.Generator().manual_seed(2))
    assert len(compiled.bottleneck) == 10
    for site, f in compiled.bottleneck.items():
        Hd, bd = _direct_phm(cfg, params, f"compacter.{site}.down")
        Hu, bu = _direct_phm(cfg, params, f"compacter.{site}.up")
        direct = act(x @ Hd + bd) @ Hu + bu
        torch.testing.assert_close(F.linear(act(F.linear(x, f.D, f.bd)), f.U, f.bu), direct,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_compacter_logits_equal_an_adapter_built_from_direct_phm(family, request):
    model = request.getfixturevalue(family)
    cfg, params = random_adapter(model, "compacter", COMPACTERS[1], seed=3)
    weights = {}
    for site in get_kind("compacter").sites(cfg, model):
        Hd, bd = _direct_phm(cfg, params, f"compacter.{site}.down")
        Hu, bu = _direct_phm(cfg, params, f"compacter.{site}.up")
        weights[site] = (Hd.T, bd, Hu.T, bu)
    rows = _rows(model, 2)
    got = _logits(model, [get_kind("compacter").compile(cfg, params, model)], rows, [0, 0])
    want = _logits(model, [_as_plain_adapter(model, params, weights)], rows, [0, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- Hyperformer -------------------------------------------------------------------------
def _hypernet_directly(cfg, params, model, task):
    """The Hyperformer code's modules (nn.Linear / nn.LayerNorm), run layer by layer: per-site
    (D, bd, U, bu), each generator output viewed as the code views it (down (r, d), up (d, r))."""
    d, r = model.cfg.lm.d_model, model.cfg.lm.d_model // cfg.reduction_factor
    z, out = params[f"hyperformer.task.{task}"], {}

    def module(mod, name):
        mod.load_state_dict({"weight": params[f"{name}.weight"], "bias": params[f"{name}.bias"]})
        return mod
    for stream, n in (("enc", model.cfg.lm.enc_layers), ("dec", model.cfg.lm.dec_layers)):
        pre = f"hyperformer.{stream}"
        task_net = torch.nn.Sequential(
            module(torch.nn.Linear(2 * cfg.task_dim, cfg.hidden_dim), f"{pre}.fc1"),
            torch.nn.ReLU(),
            module(torch.nn.Linear(cfg.hidden_dim, cfg.proj_dim), f"{pre}.fc2"),
            module(torch.nn.LayerNorm(cfg.proj_dim, eps=1e-6), f"{pre}.norm"))
        for i in range(n):
            e = task_net(torch.cat([z, params[f"{pre}.layer"][i]]))
            for sub in ("self", "ffn") if stream == "enc" else ("self", "cross", "ffn"):
                def gen(name, size, pre=pre, sub=sub, e=e):
                    return module(torch.nn.Linear(cfg.proj_dim, size), f"{pre}.{sub}.{name}")(e)
                out[f"{stream}.{i}.{sub}"] = (
                    gen("down.weight_gen", r * d).view(r, d), gen("down.bias_gen", r),
                    gen("up.weight_gen", d * r).view(d, r), gen("up.bias_gen", d))
    return out


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_hyperformer_equals_running_the_hypernetwork_per_layer(family, request):
    model = request.getfixturevalue(family)
    cfg, params = random_adapter(model, "hyperformer", {"task_dim": 16, "hidden_dim": 12}, seed=4)
    kind, rows = get_kind("hyperformer"), _rows(model, 2)
    per_task = {}
    for task in ("caption", "nlvr"):
        with torch.no_grad():
            want = _as_plain_adapter(model, params, _hypernet_directly(cfg, params, model, task))
        got = kind.compile(cfg, params, model, task)
        assert set(got.bottleneck) == set(want.bottleneck)
        per_task[task] = _logits(model, [got], rows, [0, 0])
        torch.testing.assert_close(per_task[task], _logits(model, [want], rows, [0, 0]), atol=1e-5, rtol=1e-5)
    assert (per_task["caption"] - per_task["nlvr"]).abs().max() > 1e-3     # the task matters


def test_hyperformer_file_round_trip_compiles_per_task(tiny_t5):
    cfg, params = random_adapter(tiny_t5, "hyperformer", {"tasks": ("vqa", "caption"), "task_dim": 8}, 5)
    af = load_adapter(adapter_bytes("hyperformer", cfg, params, tiny_t5, task="vqa"), tiny_t5)
    for task in ("vqa", "caption"):
        a = af.compile(tiny_t5, task).bottleneck["dec.1.cross"]
        b = get_kind("hyperformer").compile(cfg, params, tiny_t5, task).bottleneck["dec.1.cross"]
        torch.testing.assert_close(a.U, b.U)
    with pytest.raises(ValueError, match="no task 'gqa'; it was trained for vqa, caption"):
        af.compile(tiny_t5, "gqa")


# ---- prompt tuning -----------------------------------------------------------------------
def _prompt(model, length, seed):
    cfg, params = random_adapter(model, "prompt", {"length": length, "mid_dim": 24}, seed)
    return get_kind("prompt").compile(cfg, params, model)


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_prompt_rows_of_different_lengths_beside_plain_rows_equal_each_row_alone(family, request):
    model = request.getfixturevalue(family)
    # The LoRA row is a bystander; scale 1 (alpha = r) keeps random B from amplifying fp32 rounding
    # of the wider padded attention past 1e-5 (at scale 8 it reaches 2e-5 with either LoRA path).
    compiled = [_prompt(model, 1, 0), _prompt(model, 6, 1), _prompt(model, 3, 2),
                get_kind("lora").compile(*random_adapter(model, "lora", {"r": 4, "alpha": 4}, 3), model)]
    rows, slots = _rows(model, 6), [1, -1, 0, 2, 3, 1]
    mixed = _logits(model, compiled, rows, slots)
    for i, s in enumerate(slots):
        alone = _logits(model, [compiled[s]] if s >= 0 else [], [rows[i]], [0 if s >= 0 else -1])
        torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=1e-5)
    plain = _logits(model, [], rows, [-1] * 6)
    assert all((mixed[i] - plain[i]).abs().max() > 1e-3 for i in (0, 2, 3))    # prompts do act


@pytest.mark.parametrize("family", ["tiny_t5", "tiny_bart"])
def test_prompt_enters_the_encoder_as_the_papers_lay_it_out(family, request):
    """[prompt ; text] then visual tokens. BART: text positions start at 0 after an unpositioned
    prompt, layernorm_embedding over prompt and text. T5: prompt at positions 0..P-1, text after."""
    model = request.getfixturevalue(family)
    compiled, row = _prompt(model, 3, 7), _rows(model, 1)[0]
    ctx = StepContext(SlotBank(model, 1), BatchMeta.build([0], 1, model.device))
    ctx.weights.set(0, compiled)
    lm, n, P = model.lm, len(row.ids), 3
    with torch.no_grad():
        got, _ = model.encode([row], ctx)
        text = lm.embed_text(torch.tensor([row.ids]), torch.arange(n)[None], ctx)
        x = lm.finish_text(torch.cat([compiled.prefix[None], text], 1), ctx)
        vis, vis_valid = model._visual_block([row], ctx)
        pos = torch.arange(P + n) if lm.t5 else torch.cat([torch.full((P,), -1), torch.arange(n)])
        pos = torch.cat([pos, torch.full((vis.shape[1],), -1)])[None]
        valid = torch.ones(1, P + n + vis.shape[1], dtype=torch.bool)
        want = lm.encode(torch.cat([x, vis], 1), valid, pos, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- sharing modes of the bottleneck adapter ---------------------------------------------
@pytest.mark.parametrize("sharing,same_down,same_up", [
    ("single", True, True), ("multiple", False, False),
    ("half-shared-down", True, False), ("half-shared-up", False, True)])
def test_sharing_picks_the_tasks_projections(tiny_bart, sharing, same_down, same_up):
    kind = get_kind("adapter")
    cfg, params = random_adapter(tiny_bart, "adapter", {"sharing": sharing, "tasks": ("vqa", "nlvr")}, 6)
    a, b = (kind.compile(cfg, params, tiny_bart, t).bottleneck["dec.1.cross"] for t in ("vqa", "nlvr"))
    assert torch.equal(a.D, b.D) == same_down and torch.equal(a.U, b.U) == same_up
    assert kind.is_task_conditioned(cfg) == (sharing != "single")
    if sharing == "multiple":
        assert torch.equal(a.D, params["adapter.dec.1.cross.vqa.down.weight"])
    if sharing != "single":
        with pytest.raises(ValueError, match="has no task 'gqa'; it was trained for vqa, nlvr"):
            kind.compile(cfg, params, tiny_bart, "gqa")


def test_shared_adapter_file_round_trip(tiny_t5):
    options = {"sharing": "half-shared-up", "tasks": ("vqa", "caption")}
    cfg, params = random_adapter(tiny_t5, "adapter", options, 8)
    af = load_adapter(adapter_bytes("adapter", cfg, params, tiny_t5, task="vqa"), tiny_t5)
    assert af.config.sharing == "half-shared-up" and af.config.tasks == ("vqa", "caption")
    rows = _rows(tiny_t5, 2)
    for task in ("vqa", "caption"):
        torch.testing.assert_close(_logits(tiny_t5, [af.compile(tiny_t5, task)], rows, [0, 0]),
                                   _logits(tiny_t5, [get_kind("adapter").compile(cfg, params, tiny_t5, task)],
                                           rows, [0, 0]))


# ---- training keeps autograd through the materialisation ---------------------------------
@pytest.mark.parametrize("kind,options,probe", [
    ("compacter", {"shared_phm_rule": True}, "compacter.phm_rule"),
    ("compacter", {"factorized_phm": True}, "compacter.enc.0.self.down.s"),
    ("hyperformer", {"task_dim": 8}, "hyperformer.task.caption"),
    ("prompt", {"length": 2}, "prompt.embed"),
    ("adapter", {"sharing": "half-shared-down"}, "adapter.enc.1.ffn.caption.up.weight")])
def test_gradients_reach_the_stored_tensors(tiny_bart, kind, options, probe):
    k = get_kind(kind)
    cfg, params = random_adapter(tiny_bart, kind, options, 9)
    params = {n: v.requires_grad_() for n, v in params.items()}
    weights = SingleAdapterWeights(k.compile(cfg, params, tiny_bart, "caption"), tiny_bart.lm.vector_params(),
                                   tiny_bart.visual_embed.state_dict())
    rows = _rows(tiny_bart, 2)
    ctx = StepContext(weights, BatchMeta.build([0, 0], 1, tiny_bart.device))
    tiny_bart.loss(rows, [[5, 6], [7]], ctx).backward()
    assert params[probe].grad is not None and params[probe].grad.abs().sum() > 0


def test_compacter_zero_init_up_is_an_identity(tiny_t5):
    k = get_kind("compacter")
    cfg = k.Config(zero_init_up=True, factorized_phm=True)
    params = k.init_params(cfg, tiny_t5, seed=0)
    params = {n: v for n, v in params.items() if not n.startswith(("vec.", "visual."))}   # backbone's own
    rows = _rows(tiny_t5, 2)
    compiled = k.compile_modules(cfg, params, tiny_t5)
    torch.testing.assert_close(_logits(tiny_t5, [compiled], rows, [0, 0]),
                               _logits(tiny_t5, [], rows, [-1, -1]))


def test_trainable_sets_follow_vl_adapter(tiny_bart):
    norms = {f"vec.{n}" for n in tiny_bart.lm.vector_params() if "norm." in n}
    for kind, want in (("compacter", norms), ("hyperformer", norms), ("prompt", set())):
        k = get_kind(kind)
        shapes = k.param_shapes(k.Config(), tiny_bart)
        assert {n for n in shapes if n.startswith("vec.")} == want, kind
        assert sum(n.startswith("visual.") for n in shapes) == 9, kind
    assert get_kind("hyperformer").task_conditioned and not get_kind("compacter").task_conditioned


# ---- bad configs say what is wrong -------------------------------------------------------
@pytest.mark.parametrize("kind,options,fragment", [
    ("prompt", {"length": 0}, "prompt length must be at least 1"),
    ("compacter", {"n": 4, "dim": 10}, "does not divide the adapter width"),
    ("adapter", {"sharing": "multiple", "tasks": ()}, "needs a non-empty task list"),
    ("compacter", {"sharing": "half-shared-up", "tasks": ()}, "needs a non-empty task list"),
    ("hyperformer", {"tasks": ()}, "needs a non-empty task list"),
    ("adapter", {"sharing": "multiple", "tasks": ("vqa", "vqa")}, "duplicates"),
    ("hyperformer", {"tasks": ("vqa.v2",)}, "task names may use only"),
    ("adapter", {"sharing": "some"}, "sharing"),
])
def test_bad_configs_are_rejected_with_a_message(kind, options, fragment):
    with pytest.raises(ValidationError, match=fragment):
        get_kind(kind).Config(**options)


def test_phm_n_must_divide_the_widths(tiny_bart):
    k = get_kind("compacter")
    with pytest.raises(ValueError, match=r"PHM n=3 must divide both d_model \(64\) and the adapter width"):
        k.param_shapes(k.Config(n=3), tiny_bart)


def test_hyperformer_asked_for_a_task_it_has_no_embedding_for(tiny_bart):
    k = get_kind("hyperformer")
    cfg, params = random_adapter(tiny_bart, "hyperformer", {"task_dim": 8}, 0)
    with pytest.raises(ValueError, match="hyperformer adapter has no task 'video_qa'; "
                                         "it was trained for vqa, gqa, nlvr, caption"):
        k.compile(cfg, params, tiny_bart, "video_qa")
    with pytest.raises(ValueError, match="task-conditioned: compile it for one of its tasks"):
        k.compile(cfg, params, tiny_bart)
