"""LT-SFT (``petserve train --kind sft``): phase 1 over every chosen entry, the K that moved most
kept, phase 2 over those; a task SFT learns on top of a fixed language SFT."""
from __future__ import annotations

import json

import pytest
import torch

from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.data import make_demo_examples
from petserve.adapters.training import TrainConfig
from petserve.adapters.training.lt_sft import LTSFTConfig, chosen_params, select_entries, train_sft
from petserve.serving.cli import main as cli
from tests.test_sft import compiled, random_sft

DECODER = ("lm.dec_layers.*.ffn.*.weight",)


def test_select_keeps_the_entries_that_moved_most():
    deltas = {"a": torch.tensor([0.0, -5.0, 1.0, 0.1]), "b": torch.tensor([4.0, 0.0, 0.0])}
    got = select_entries(deltas, LTSFTConfig(count=2, per_param=False))
    assert got["a"].tolist() == [1] and got["b"].tolist() == [0]
    got = select_entries(deltas, LTSFTConfig(count=3, per_param=False))
    assert got["a"].tolist() == [1, 2] and got["b"].tolist() == [0]
    per = select_entries(deltas, LTSFTConfig(share=0.5))          # per parameter: 2 of a, 2 of b
    assert per["a"].tolist() == [1, 2] and len(per["b"]) == 2 and per["b"][0] == 0


def test_lt_sft_trains_a_sparse_adapter_of_k_entries(tiny_t5):
    model = tiny_t5
    examples = make_demo_examples("colors", 48, seed=3)
    names = chosen_params(model, DECODER)
    total = sum(model.get_parameter(n).numel() for n in names)
    tc = TrainConfig(steps=12, batch_size=16, lr=3e-3, progress=False, seed=1)
    result = train_sft(model, examples, LTSFTConfig(params=DECODER, share=0.02, full_steps=12), tc)
    assert result.kind == "sft" and set(result.config.entries) == set(names)
    kept = sum(result.config.entries.values())
    assert kept == round(0.02 * total + 0.5) or abs(kept - 0.02 * total) <= len(names)
    assert result.history.losses[-1] < result.history.losses[0]
    af = load_adapter(__import__("petserve.adapters.training", fromlist=["x"]).trained_adapter_bytes(
        result, model), model)
    assert af.kind == "sft" and sum(v.numel() for k, v in af.params.items() if k.endswith(".val")) == kept


def test_a_task_sft_learns_on_top_of_a_language_sft(tiny_t5):
    model = tiny_t5
    examples = make_demo_examples("colors", 32, seed=4)
    base = compiled(model, "sft", *random_sft(model, 21, names=("lm.dec_layers.0.ffn.wo.weight",)))
    tc = TrainConfig(steps=4, batch_size=16, lr=3e-3, progress=False, seed=2)
    ltc = LTSFTConfig(params=DECODER, share=0.01, full_steps=4)
    alone = train_sft(model, examples, ltc, tc)
    over = train_sft(model, examples, ltc, tc, base=base)
    assert set(over.config.entries) == set(alone.config.entries)    # the task's own deltas only
    assert over.history.losses[0] != alone.history.losses[0]          # trained with the base under it


def test_train_sft_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "colors-sft.safetensors"
    rc = cli(["train", "--kind", "sft", "--task", "vqa", "--data", "demo:colors", "--backbone", "tiny",
              "--steps", "2", "--batch-size", "8", "--train-size", "16", "--eval-size", "8", "--quiet",
              "--out", str(out), "--share", "0.005", "--full-steps", "2",
              "--params", "lm.dec_layers.*.weight"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "sft" and out.exists()
    rc = cli(["train", "--kind", "sft", "--task", "vqa", "--data", "demo:colors", "--backbone", "tiny",
              "--steps", "2", "--out", str(tmp_path / "x.safetensors"), "--share", "2"])
    assert rc == 2 and "--share" in capsys.readouterr().err


def readme_sft_lines() -> list[str]:
    """The README's `petserve train --kind sft` lines (section "Composable sparse fine-tuning")."""
    from pathlib import Path
    text = (Path(__file__).parent.parent / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith("petserve train --kind sft")]


@pytest.mark.slow
def test_the_readme_sft_commands_train_a_language_and_a_task_sft(tmp_path):
    """Literally as printed (on the embedded default): a language SFT from captions by denoising,
    then the colors task SFT on top of it."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    lines = readme_sft_lines()
    assert len(lines) == 2 and "--base lang.safetensors" in lines[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    summaries = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line + " --quiet"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries.append(json.loads(done.stdout.splitlines()[-1]))
    assert summaries[0]["kind"] == summaries[1]["kind"] == "sft"
    assert summaries[0]["task"] == "text"
    assert summaries[0]["eval"]["exact_match"] >= 0.5          # hidden words; measured 0.67
    assert summaries[1]["eval"]["vqa_accuracy"] >= 0.9          # measured 1.0


def readme_composite_bodies() -> list[dict]:
    """The JSON bodies of the README's composed `/v1/vqa` requests, `$IMG` left as is."""
    from pathlib import Path
    lines = (Path(__file__).parent.parent / "README.md").read_text().splitlines()
    bodies = []
    for line in lines:
        if line.strip().startswith("-d ") and '\\"adapter\\": [' in line:
            text = line.strip()[len('-d "'):-1].replace('\\"', '"')
            bodies.append(json.loads(text))
    return bodies


def test_the_readme_composite_requests_compose_demo_adapters(tmp_path):
    """The README's composed requests (colors LoRA + caption Compacter; the French composition
    demo) on the embedded default, with the quickstart's image."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.data import make_demo_examples
    from petserve.adapters.demo import ensure_demo_assets
    from petserve.serving.api import create_app
    from petserve.serving.deployments import seed_store
    from tests.test_api import make_backend
    bodies = readme_composite_bodies()
    assert [b["adapter"] for b in bodies] == [["colors", "caption"], ["lang-fr", "colors-sft"]]
    png = io.BytesIO()
    make_demo_examples("colors", 1, 7)[0].images[0].save(png, format="PNG")
    img = base64.b64encode(png.getvalue()).decode()
    assets = ensure_demo_assets(progress=False)
    model = build_backbone(assets.backbone_dir)
    backend, config = make_backend(model, tmp_path / "store", num_slots=4)
    seed_store(backend.store, assets.adapters, str(assets.backbone_dir), 2**26)
    backend.start()
    try:
        with TestClient(create_app(backend, config)) as client:
            replies = [client.post("/v1/vqa", json={**b, "image": img}) for b in bodies]
    finally:
        backend.stop()
    for body, r in zip(bodies, replies):
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == body["adapter"] and len(r.json()["adapter_versions"]) == 2
