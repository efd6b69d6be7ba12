"""Seed fidelity: checkpoints saved by VL-Adapter's and VL-PET's code import and give their answers.

No seed checkpoint can be downloaded here, so tests/seed_reference/ re-implements the seeds' VL-T5
and VL-BART literally (their module names, order of operations, prompt strings and zero boxes).
A random checkpoint of it, imported with ``petserve import-seed``, must give the reference's logits
(fp32, atol 1e-4) and greedy answers, for every kind, alone and mixed in one batch with our own
adapters; the importer refuses bad input with one error line (exit 2) and writes nothing.
"""
from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from petserve.adapters.adapter_file import adapter_bytes, load_adapter
from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.model import RowInput
from petserve.adapters.backbone.tokenizer import tiny_tokenizer
from petserve.adapters.backbone.visual import VisualTokens, object_index
from petserve.adapters.generation import GenerationRequest, generate
from petserve.adapters.params import count
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.seed_import import SeedImportError, import_checkpoint
from petserve.adapters.tasks import SEED_INPUTS
from petserve.serving.cli import main as cli
from tests.conftest import random_adapter
from tests.seed_reference import vlbart, vlt5

REFS = {"t5": vlt5, "bart": vlbart}
V, FEAT, N = 300, 32, 6
TASKS = ["vqa", "gqa", "nlvr", "caption"]
HF = {
    "t5": dict(model_type="t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=32, vocab_size=V, layer_norm_epsilon=1e-6,
               feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
               tie_word_embeddings=True),
    "bart": dict(model_type="bart", d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                 decoder_ffn_dim=128, vocab_size=V, max_position_embeddings=64,
                 activation_function="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 decoder_start_token_id=2, scale_embedding=False),
}
# The seeds' VL-T5 has no LoRA (its --use_lora builds nothing), so a T5 "lora" run is the bare model.
CASES = [(arch, kind) for arch, ref in REFS.items() for kind in ref.KINDS if (arch, kind) != ("t5", "lora")]


def seed_options(method: dict) -> dict:
    """The CLI options a user passes for this run (what the keys cannot tell)."""
    return {k: str(method[k]) for k in ("encoder_gating_scaling_factor", "lora_alpha") if k in method}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    out = {}
    for arch in REFS:
        d = tmp_path_factory.mktemp(f"tok-{arch}")
        tiny_tokenizer(arch).save_pretrained(str(d))
        (d / "config.json").write_text(json.dumps(HF[arch]))
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def imported(tokenizer_dirs):
    """(arch, kind) -> (reference model, SeedImport), built once."""
    cache = {}

    def get(arch: str, kind: str):
        if (arch, kind) not in cache:
            method = dict(REFS[arch].KINDS[kind])
            ref = REFS[arch].build(HF[arch], method, TASKS, seed=1).eval()
            res = import_checkpoint(ref.state_dict(), f"vl-{arch}", method.get("repo", "vl-adapter"),
                                    HF[arch], tokenizer_dirs[arch], seed_options(method))
            cache[arch, kind] = ref, res
        return cache[arch, kind]
    return get


def batch(arch: str, seed: int, B: int = 2, pair: bool = False):
    """Token ids (ending in eos, BART starting with bos), features, zero boxes, image order."""
    g = torch.Generator().manual_seed(seed)
    eos, bos = (1, None) if arch == "t5" else (2, 0)
    lengths = [7, 5][:B] + [6] * max(0, B - 2)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 100, (n,), generator=g).tolist()
        rows.append(([bos] if bos is not None else []) + ids[:n - 1 - (bos is not None)] + [eos])
    feats = torch.randn(B, N, FEAT, generator=g)
    order = torch.tensor([0] * (N // 2) + [1] * (N - N // 2)) if pair else torch.zeros(N, dtype=torch.long)
    dec = torch.randint(5, 100, (B, 4), generator=g)
    dec[:, 0] = 0 if arch == "t5" else 2
    return rows, feats, order, dec


def padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    L = max(map(len, rows))
    return torch.tensor([r + [pad] * (L - len(r)) for r in rows])


def ref_logits(arch, ref, rows, feats, order, dec, task):
    """The reference's logits, one row at a time (its small gate averages over padding too)."""
    pad = HF[arch]["pad_token_id"]
    out = []
    # NLVR2's model passes object order ids restarting at 0 for the second image
    # (the T5 reference derives them from img_order_ids itself)
    takes_obj = "obj_order_ids" in inspect.signature(REFS[arch].logits).parameters
    pair = {"obj_order_ids": object_index(order)[None]} if order.any() and takes_obj else {}
    for i, r in enumerate(rows):
        img = None if not order.any() else order[None]
        out.append(REFS[arch].logits(ref, padded([r], pad), feats[i:i + 1], torch.zeros(1, N, 4), img,
                                     dec[i:i + 1], task, **pair))
    return torch.cat(out)


def our_logits(model, bank, slots, rows, feats, order, dec):
    ctx = StepContext(bank, BatchMeta.build(slots, bank.num_slots, "cpu"))
    inputs = [RowInput(r, VisualTokens(feats[i], torch.rand(N, 4), order), zero_boxes=True)
              for i, r in enumerate(rows)]
    enc, valid = model.encode(inputs, ctx)
    cache = model.init_cache(enc, valid, ctx)
    return model.decode(dec, torch.arange(dec.shape[1]).expand_as(dec), cache, ctx)


def compiled(res, adapter, task):
    data = adapter_bytes(adapter.kind, adapter.config, adapter.params, res.model, adapter.task,
                         inputs=res.inputs)
    return load_adapter(data, res.model).compile(res.model, task)


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_imported_checkpoint_gives_the_seed_logits(imported, arch, kind):
    ref, res = imported(arch, kind)
    assert res.keys_consumed == res.keys_total
    if kind == "full":
        assert res.adapters == []
    else:
        assert sorted(a.task for a in res.adapters) == sorted(TASKS)
    for task in [a.task for a in res.adapters] or ["vqa"]:
        rows, feats, order, dec = batch(arch, seed=len(task), pair=task == "nlvr")
        with torch.no_grad():
            want = ref_logits(arch, ref, rows, feats, order, dec, task)
            bank, slots = SlotBank(res.model, 2), [-1] * len(rows)
            bare = our_logits(res.model, bank, slots, rows, feats, order, dec)
            mine = [a for a in res.adapters if a.task == task]
            if mine:
                bank.set(1, compiled(res, mine[0], task))
                slots = [1] * len(rows)
            got = our_logits(res.model, bank, slots, rows, feats, order, dec)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        if mine:        # the adapter matters: without it the answer is another
            assert (bare - want).abs().max() > 1e-2


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_imported_checkpoint_gives_the_seed_greedy_answers(imported, arch, kind):
    ref, res = imported(arch, kind)
    task = "caption" if res.adapters else "vqa"
    rows, feats, order, _ = batch(arch, seed=7)
    bank, slot = SlotBank(res.model, 1), -1
    for a in res.adapters:
        if a.task == task:
            bank.set(0, compiled(res, a, task))
            slot = 0
    eos = HF[arch]["eos_token_id"]
    with torch.no_grad():
        ours = generate(res.model, bank, [
            GenerationRequest(RowInput(r, VisualTokens(feats[i], torch.zeros(N, 4), order), True), slot, 8)
            for i, r in enumerate(rows)])
        for i, r in enumerate(rows):
            want = REFS[arch].greedy(ref, padded([r], 0), feats[i:i + 1], torch.zeros(1, N, 4), None,
                                     task, 8)[0]
            want = want[:want.index(eos)] if eos in want else want
            assert ours[i].tokens == want


def test_imported_adapters_mix_in_one_batch_with_ours(imported):
    """Rows of two imported tasks, our own adapters of three kinds and the bare backbone, in one
    batch: every row gets what it gets alone."""
    ref, res = imported("t5", "vlpet_large")
    model = res.model
    # LoRA at scale 1 (alpha = r): a random B at the default scale amplifies the fp32 rounding of
    # the prompt row's wider padded attention past 1e-5 (1.6e-5 on one CI CPU, logits ~3).
    ours = [random_adapter(model, k, o, seed=i) for i, (k, o) in enumerate(
        [("lora", {"r": 4, "alpha": 4}), ("adapter", {"reduction_factor": 8}),
         ("prompt", {"length": 3, "mid_dim": 8})])]
    bank = SlotBank(model, 6)
    by_task = {a.task: a for a in res.adapters}
    bank.set(0, compiled(res, by_task["vqa"], "vqa"))
    bank.set(1, compiled(res, by_task["caption"], "caption"))
    for slot, (kind, (cfg, params)) in enumerate(zip(("lora", "adapter", "prompt"), ours), start=2):
        from petserve.adapters.kinds import get_kind
        bank.set(slot, get_kind(kind).compile(cfg, params, model, "vqa"))
    slots = [0, 2, 1, -1, 3, 4, 0]
    rows, feats, order, dec = batch("t5", seed=3, B=len(slots))
    with torch.no_grad():
        mixed = our_logits(model, bank, slots, rows, feats, order, dec)
        for i, s in enumerate(slots):
            alone = our_logits(model, bank, [s], rows[i:i + 1], feats[i:i + 1], order, dec[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
        for i, task in ((0, "vqa"), (2, "caption"), (6, "vqa")):
            want = ref_logits("t5", ref, rows[i:i + 1], feats[i:i + 1], order, dec[i:i + 1], task)
            torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-4, rtol=1e-4)


def test_object_order_restarts_for_the_second_image():
    assert object_index(torch.tensor([0, 0, 0, 1, 1])).tolist() == [0, 1, 2, 0, 1]
    assert object_index(torch.zeros(4, dtype=torch.long)).tolist() == [0, 1, 2, 3]


def test_seed_prompts_and_question_budget_follow_the_seed_tokenization():
    """The seeds encode f"{prompt}{question}" with max_length=20, truncation=True."""
    for family in ("t5", "bart"):
        tok = tiny_tokenizer(family)
        question = " ".join(["what color is the big red circle"] * 5)
        for task in ("vqa", "gqa", "caption"):
            text = "" if task == "caption" else question
            limit = {"max_length": 40 if task == "caption" else 20, "truncation": True}
            want = tok(SEED_INPUTS.prompts[task] + text, **limit)["input_ids"]
            got = SEED_INPUTS.truncate(task, list(tok(SEED_INPUTS.prompt(task, text))["input_ids"]))
            assert got == want
    statement = " ".join(["there is a red circle"] * 6)        # NLVR2's statements are not cut
    ids = list(tok(SEED_INPUTS.prompt("nlvr", statement))["input_ids"])
    assert len(ids) > 20 and SEED_INPUTS.truncate("nlvr", ids) == ids
    assert SEED_INPUTS.prompt("gqa", "is it red?") == "gpa: is it red?"    # sic, as the seeds
    assert SEED_INPUTS.prompt("video_qa", "why?") == "vqa: why?"


def test_params_of_vlpet_on_t5_base_follow_the_released_t5_setting():
    got = count("t5-base", "vlpet", {"gate": "large"})
    explicit = count("t5-base", "vlpet", {"gate": "large", "r": 192, "heads": 4, "gate_rank": 192,
                                           "gate_scale": 0.3, "decoder_r": 96})
    assert got == explicit
    assert got != count("t5-base", "vlpet", {"gate": "large", "gate_rank": 96})


# ---- the command line ----------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli(["import-seed", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_import_seed_cli_writes_a_backbone_and_adapters_the_server_answers_with(
        imported, tokenizer_dirs, tmp_path, capsys):
    ref, _ = imported("t5", "vlpet_large")
    ckpt = tmp_path / "vlpet.pth"
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, ckpt)    # saved under DDP
    rc, out, err = run_cli(capsys, ckpt, "--repo", "vl-pet", "--arch", "vl-t5", "--config",
                           tokenizer_dirs["t5"], "--out", tmp_path / "out",
                           "--encoder_gating_scaling_factor", "0.3")
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["keys_total"] == summary["keys_consumed"] == len(ref.state_dict())
    assert sorted(a["task"] for a in summary["adapters"]) == sorted(TASKS)
    assert {a["kind"] for a in summary["adapters"]} == {"vlpet"}
    model = build_backbone(tmp_path / "out" / "backbone")
    assert Path(summary["backbone"]) == tmp_path / "out" / "backbone"

    # served: the engine builds the seeds' input ("vqa: " + question, 20 tokens, zero boxes)
    from petserve.serving.engine import Engine
    from petserve.serving.engine_io import InferenceRequest
    from petserve.serving.server_config import EngineConfig
    from petserve.serving.store import LocalDirStore
    from petserve.serving.uploads import prepare_upload
    store = LocalDirStore(tmp_path / "store")
    for a in summary["adapters"]:
        blob, meta = prepare_upload(Path(a["path"]).read_bytes(), model, 2**26)
        store.put(a["task"], blob, meta)
    engine = Engine(model, store, EngineConfig(num_slots=4))
    question = "what color is the big red circle on the left of the small blue square there ?"
    grid = np.random.default_rng(0).normal(size=(49, FEAT)).astype(np.float32)   # RN101's 7x7
    # the seeds' --downsample: nn.AdaptiveMaxPool2d((6, 6)) over the grid
    pooled = torch.nn.AdaptiveMaxPool2d((6, 6))(torch.from_numpy(grid).T.reshape(1, FEAT, 7, 7))
    pooled = pooled.reshape(FEAT, 36).T[None]
    ids = model.tokenizer("vqa: " + question, max_length=20, truncation=True)["input_ids"]
    want = vlt5.greedy(ref, torch.tensor([ids]), pooled, torch.zeros(1, 36, 4), None, "vqa", 8)[0]
    want = want[:want.index(1)] if 1 in want else want
    req = InferenceRequest(adapter="vqa", task="vqa", text=question, features=grid, max_new_tokens=8)
    assert engine.run_alone(req).tokens == want
    engine.start()
    try:                     # through the scheduler, the second time from the feature cache
        for _ in range(2):
            assert engine.submit(req).result(timeout=60).tokens == want
    finally:
        engine.stop()
    assert engine.stats()["feature_cache"]["hits"] >= 1


def bad_checkpoints(tmp_path: Path, imported) -> dict[str, tuple[Path, str]]:
    ref, _ = imported("t5", "full")
    good = tmp_path / "good.pth"
    torch.save(ref.state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[:len(data) // 2])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"shared.weight": Evil()}, f)
    bart, _ = imported("bart", "full")
    torch.save(bart.state_dict(), tmp_path / "bart.pth")
    return {"truncated": (tmp_path / "truncated.pth", "truncated or corrupt"),
            "pickle with objects": (tmp_path / "evil.pth", "objects other than tensors"),
            "wrong architecture": (tmp_path / "bart.pth", "is a VL-BART checkpoint, but --arch is vl-t5"),
            "missing config": (good, "--config is required")}


@pytest.mark.parametrize("case", ["truncated", "pickle with objects", "wrong architecture",
                                  "missing config"])
def test_import_seed_refuses_bad_input_with_one_line(imported, tokenizer_dirs, tmp_path, capsys, case):
    path, message = bad_checkpoints(tmp_path, imported)[case]
    config = [] if case == "missing config" else ["--config", tokenizer_dirs["t5"]]
    rc, out, err = run_cli(capsys, path, "--repo", "vl-adapter", "--arch", "vl-t5", *config,
                           "--out", tmp_path / "out")
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_an_unknown_key_is_an_error_naming_it(imported, tokenizer_dirs):
    ref, _ = imported("t5", "adapter_single")
    state = dict(ref.state_dict(), **{"encoder.block.0.layer.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(SeedImportError, match=r"encoder\.block\.0\.layer\.0\.mystery\.weight"):
        import_checkpoint(state, "vl-t5", "vl-adapter", HF["t5"], tokenizer_dirs["t5"])
    state = {k: v for k, v in ref.state_dict().items() if "up_sampler" not in k}
    with pytest.raises(SeedImportError, match="lacks key"):
        import_checkpoint(state, "vl-t5", "vl-adapter", HF["t5"], tokenizer_dirs["t5"])


@pytest.mark.parametrize("arch,kind", [("t5", "vlpet_large"), ("bart", "adapter_single")])
def test_nlvr_is_the_likelier_of_true_and_false_as_the_seeds_decide_it(imported, arch, kind):
    ref, res = imported(arch, kind)
    model = res.model
    bank = SlotBank(model, 1)
    bank.set(0, compiled(res, next(a for a in res.adapters if a.task == "nlvr"), "nlvr"))
    spec = model.choice_ids("nlvr")
    prefix, choices = list(spec[:spec.index(-1)]), list(spec[spec.index(-1) + 1:])
    assert [model.decode_text([t]) for t in choices] == ["true", "false"]
    # the seeds: VL-T5 reads the logits after its start token, VL-BART after [</s>, <s>]
    assert prefix == ([] if arch == "t5" else [model.tokenizer.bos_token_id])
    start = torch.tensor([[HF[arch]["decoder_start_token_id"], *prefix]])
    picked = set()
    for seed in range(6):
        rows, feats, order, _ = batch(arch, seed=100 + seed, B=1, pair=True)
        with torch.no_grad():
            first = ref_logits(arch, ref, rows, feats, order, start, "nlvr")[0, -1]
            want = choices[int(first[choices].argmax())]
            got = generate(model, bank, [GenerationRequest(
                RowInput(rows[0], VisualTokens(feats[0], torch.zeros(N, 4), order), True), 0, 8,
                choices=spec)])[0]
        assert got.tokens == prefix + [want] and got.text == model.decode_text([want])
        picked.add(want)
    assert model.choice_ids("vqa") == ()


def test_seed_options_the_keys_cannot_tell(imported, tokenizer_dirs, tmp_path, capsys):
    ref, _ = imported("bart", "lora")
    ckpt = tmp_path / "lora.pth"
    torch.save(ref.state_dict(), ckpt)
    common = [ckpt, "--repo", "vl-adapter", "--arch", "vl-bart", "--config", tokenizer_dirs["bart"]]
    rc, _, err = run_cli(capsys, *common, "--out", tmp_path / "a", "--lora-dim", "8")
    assert rc == 2 and "unknown seed option --lora_dim" in err and not (tmp_path / "a").exists()
    rc, out, err = run_cli(capsys, *common, "--out", tmp_path / "b", "--use_tasks_prompts", "false",
                           "--lora_alpha", "16")
    assert rc == 0, err
    model = build_backbone(tmp_path / "b" / "backbone")
    af = load_adapter(tmp_path / "b" / "adapters" / "vqa.safetensors", model)
    assert af.config.alpha == 16 and af.meta.inputs.prompts == {t: "" for t in TASKS}
    assert af.meta.inputs.boxes == "zero" and af.meta.inputs.feature_grid == 6


# ---- the README's commands, literally ----------------------------------------------------------
def readme_section_commands() -> list[str]:
    """The shell lines of the README's "Bring a VL-Adapter / VL-PET checkpoint" section."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Bring a VL-Adapter / VL-PET checkpoint", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    return [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]


@pytest.mark.slow
def test_the_readme_commands_import_serve_and_answer(imported, tokenizer_dirs, tmp_path):
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import httpx
    lines = readme_section_commands()
    imports = [line for line in lines if line.startswith("petserve import-seed")]
    serve = next(line for line in lines if line.startswith("petserve serve"))
    curl = next(line for line in lines if line.startswith("curl"))
    assert len(imports) == 3 and "--arch vl-t5" in imports[0]
    ref, _ = imported("t5", "vlpet_large")
    ckpt = tmp_path / imports[0].split()[2]                   # snap/VLT5_multitask/RUN/BEST.pth
    ckpt.parent.mkdir(parents=True)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, ckpt)
    shutil.copytree(tokenizer_dirs["t5"], tmp_path / "t5-base")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PETSERVE_STORE": str(tmp_path / "store"), "PETSERVE_TOKEN": "readme"}
    done = subprocess.run(["bash", "-c", imports[0]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["keys_consumed"] == len(ref.state_dict())

    grid = np.random.default_rng(5).normal(size=(49, FEAT)).round(4).astype(np.float32)
    question = "what is the man holding?"
    (tmp_path / "request.json").write_text(json.dumps(
        {"adapter": "vqa", "question": question, "features": grid.tolist()}))
    pooled = torch.nn.AdaptiveMaxPool2d((6, 6))(torch.from_numpy(grid).T.reshape(1, FEAT, 7, 7))
    model = build_backbone(tmp_path / "vlpet-t5" / "backbone")
    ids = model.tokenizer("vqa: " + question, max_length=20, truncation=True)["input_ids"]
    want = vlt5.greedy(ref, torch.tensor([ids]), pooled.reshape(FEAT, 36).T[None], torch.zeros(1, 36, 4),
                       None, "vqa", 20)[0]
    want_text = model.decode_text(want[:want.index(1)] if 1 in want else want)

    server = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                if httpx.get("http://localhost:8000/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        done = subprocess.run(["bash", "-c", curl.split("#")[0]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        answer = json.loads(done.stdout)
        assert answer["adapter"] == "vqa" and answer["answer"] == want_text, answer
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
