"""The audio family's commands: `petserve train --family audio`, `petserve params --family audio`,
the demo builder (deterministic, valid) and its score command."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from petserve.adapters import audio_demo
from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.backbone.audio import build_audio_backbone
from petserve.adapters.data.audio import make_clips, wav_bytes
from petserve.serving.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_audio_on_a_demo_task_writes_an_adapter_with_its_head(tmp_path, capsys) -> None:
    out = tmp_path / "pitch.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--family", "audio", "--kind", "adapter",
                                "--data", "demo:pitch", "--out", str(out), "--steps", "3",
                                "--train-size", "2", "--eval-data", "demo:pitch", "--eval-size", "1",
                                "--quiet", "--block", "conformer", "--mode", "parallel",
                                "--placement", "pfeiffer", "--kernel-size", "5")
    assert code == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["task"] == "audio_classify" and len(summary["labels"]) == 8
    assert 0 <= summary["eval"]["accuracy"] <= 1
    model = build_audio_backbone(audio_demo.ensure_audio_assets(progress=False).backbone_dir)
    af = load_adapter(out, model)
    assert af.config.block == "conformer" and af.config.labels == tuple(summary["labels"])
    assert af.params["head.weight"].shape == (8, model.cfg.lm.d_model)


def test_train_audio_from_a_folder_of_label_folders(tmp_path, capsys) -> None:
    clips = make_clips("timbre", 2, 3)
    for i, (clip, y) in enumerate(zip(clips.clips, clips.labels)):
        if y < 2:
            folder = tmp_path / "data" / ("hum" if y == 0 else "buzz")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.wav").write_bytes(wav_bytes(clip))
    out = tmp_path / "a.safetensors"
    code, stdout, err = run_cli(capsys, "train", "--family", "audio", "--kind", "lora", "--data",
                                str(tmp_path / "data"), "--out", str(out), "--steps", "2", "--quiet",
                                "--r", "2", "--targets", "enc.self.q,enc.self.v")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["labels"] == ["buzz", "hum"]


@pytest.mark.parametrize("args,message", [
    (["--data", "demo:nope"], "unknown audio demo task"),
    (["--data", "demo:pitch", "--labels", "a,b"], "--labels come from the data"),
    (["--data", "demo:pitch", "--task", "vqa"], "one task, audio_classify"),
    (["--data", "demo:pitch", "--steps", "zero"], "not a number"),
    (["--data", "/no/such/dir"], "neither demo:TASK nor a directory"),
    (["--data", "demo:pitch", "--block", "conformer", "--kernel-size", "4"], "odd"),
])
def test_train_audio_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, message) -> None:
    code, _, err = run_cli(capsys, "train", "--family", "audio", "--kind", "adapter",
                           "--out", str(tmp_path / "x.safetensors"), "--quiet", *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "x.safetensors").exists()


def test_params_counts_audio_adapters_on_ast_base(capsys) -> None:
    code, stdout, err = run_cli(capsys, "params", "--family", "audio", "--kind", "adapter",
                                "--classes", "50", "--block", "conformer", "--placement",
                                "pfeiffer", "--mode", "parallel", "--reduction-factor", "96",
                                "--adjacent-norms", "true")
    assert code == 0, err
    got = json.loads(stdout)
    # 12 conformer blocks of r = 8: pw1 768 -> 16, depthwise k 31, BN affine, pw2 8 -> 768; the 12
    # LayerNorms after attention and the final one; a 50-class head (running stats not counted)
    block = (768 * 16 + 16) + (8 * 31 + 8) + 2 * 8 + (8 * 768 + 768)
    assert got["trainable"] == 12 * block + 13 * 2 * 768 + 50 * 768 + 50
    assert 0.2 < got["percent"] < 0.5


def test_the_audio_builder_is_deterministic_and_scores(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(audio_demo, "AUDIO_BASE", replace(audio_demo.AUDIO_BASE, steps=3))
    monkeypatch.setattr(audio_demo, "AUDIO_RECIPES", tuple(
        replace(r, steps=2, per_class=2) for r in audio_demo.AUDIO_RECIPES))
    first = audio_demo.build_audio_assets(tmp_path / "a", progress=False)
    second = audio_demo.build_audio_assets(tmp_path / "b", progress=False)
    assert audio_demo.valid_audio_assets(tmp_path / "a") is not None
    for task, path in first.adapters.items():
        assert path.read_bytes() == second.adapters[task].read_bytes(), task
    weights = "model.safetensors"
    assert (first.backbone_dir / weights).read_bytes() == (second.backbone_dir / weights).read_bytes()
    scores = audio_demo.audio_scores(first, per_class=1)
    assert [s.task for s in scores] == [r.task for r in audio_demo.AUDIO_RECIPES]
    assert all(0 <= s.accuracy <= 1 and 0 <= s.probe <= 1 for s in scores)
    (tmp_path / "a" / first.adapters["pitch"].name).write_bytes(b"broken")
    assert audio_demo.valid_audio_assets(tmp_path / "a") is None


def test_the_shipped_audio_assets_are_current() -> None:
    assert audio_demo.valid_audio_assets(audio_demo.AUDIO_DIR) is not None


def test_decoding_refuses_what_it_cannot_read() -> None:
    from petserve.adapters.data.audio import AudioError, decode_audio
    with pytest.raises(AudioError, match="no samples"):
        decode_audio(wav_bytes(np.zeros(0, dtype=np.float32)), 10)
    samples, sr = decode_audio(wav_bytes(np.ones((100, 2), dtype=np.float32) * 0.5), 10)
    assert sr == 16000 and samples.shape == (100,)          # stereo mixed down


def test_serve_refuses_an_audio_backbone_that_does_not_load(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "serve", "--no-ray", "--audio-backbone", str(tmp_path),
                           "--store", str(tmp_path / "store"))
    assert code == 2 and "--audio-backbone" in err and "no config.json" in err, err
