"""``petserve train`` end to end on a tiny demo source, its checkpoints, --push, and its errors."""
from __future__ import annotations

import json

import pytest

from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.backbone import build_backbone
from petserve.serving.cli import main

TINY = ["--backbone", "tiny", "--train-size", "8", "--eval-size", "4", "--batch-size", "4", "--quiet"]


def _train(tmp_path, *extra, name="a.safetensors"):
    return ["train", "--kind", "lora", "--task", "vqa", "--data", "demo:colors",
            "--out", str(tmp_path / name), *TINY, *extra]


def test_train_writes_a_loadable_adapter(tmp_path, capsys):
    assert main(_train(tmp_path, "--steps", "3", "--r", "4", "--alpha", "8")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "lora" and summary["task"] == "vqa" and summary["steps"] == 3
    assert set(summary["eval"]) == {"step", "vqa_accuracy", "exact_match"}
    adapter = load_adapter(tmp_path / "a.safetensors", build_backbone("tiny"))
    assert adapter.config.r == 4 and adapter.config.alpha == 8 and adapter.meta.task == "vqa"


def test_a_language_sft_learns_french_captions_by_denoising(tmp_path, capsys):
    """--lang fr draws the demo source in French; --denoise learns its captions as unlabelled text
    (span corruption on a T5: the eval's targets are the hidden words)."""
    argv = ["train", "--kind", "sft", "--task", "text", "--data", "demo:caption", "--lang", "fr",
            "--denoise", "--out", str(tmp_path / "fr.safetensors"), *TINY, "--steps", "2",
            "--share", "0.01"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "sft" and summary["task"] == "text" and summary["steps"] == 2
    assert load_adapter(tmp_path / "fr.safetensors", build_backbone("tiny")).meta.kind == "sft"


def test_checkpoint_and_resume_from_the_cli(tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert main(_train(tmp_path, "--steps", "4", "--checkpoint-dir", ckpt, "--eval-every", "2",
                       "--id", "same")) == 0
    first = (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    # Resuming a finished run trains nothing more and writes the same adapter.
    assert main(_train(tmp_path, "--steps", "4", "--checkpoint-dir", ckpt, "--resume",
                       "--eval-every", "2", "--id", "same", name="b.safetensors")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    assert (tmp_path / "b.safetensors").read_bytes() == first


class _Reply:
    def __init__(self, status, body):
        self.status_code, self._body, self.text = status, body, json.dumps(body)

    def json(self):
        return self._body


def test_push_puts_the_file_with_a_bearer_token(tmp_path, capsys, monkeypatch):
    import httpx
    sent = {}

    def fake_put(url, content, headers, timeout):
        sent.update(url=url, content=content, headers=headers)
        return _Reply(201, {"id": "colors-x", "version": 1})
    monkeypatch.setattr(httpx, "put", fake_put)
    assert main(_train(tmp_path, "--steps", "2", "--push", "http://srv:8000/", "--id", "colors-x",
                       "--token", "s3cret")) == 0
    assert sent["url"] == "http://srv:8000/v1/adapters/colors-x"
    assert sent["headers"]["Authorization"] == "Bearer s3cret"
    assert load_adapter(sent["content"], build_backbone("tiny")).kind == "lora"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pushed"]["version"] == 1

    monkeypatch.setattr(httpx, "put", lambda *a, **k: _Reply(
        401, {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}))
    assert main(_train(tmp_path, "--steps", "1", "--push", "http://srv", "--id", "x")) == 2
    assert capsys.readouterr().err == ("petserve: error: --push: http://srv/v1/adapters/x answered "
                                       "401: missing or invalid API key\n")


def _bad_jsonl(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "x.png", "question": "q?", "answer": "a"}\n{not json\n')
    return str(path)


@pytest.mark.parametrize("argv,fragment", [
    (["--task", "vqa", "--data", "demo:colors", "--out", "x"], "--kind is required"),
    (["--kind", "nope", "--task", "vqa", "--data", "demo:colors", "--out", "x"], "unknown kind"),
    (["--kind", "lora", "--task", "vqa2", "--data", "demo:colors", "--out", "x"], "--task"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--steps", "0"],
     "--steps: Input should be greater than or equal to 1"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--lr", "fast"],
     "--lr"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--steps", "2",
      "--epochs", "1"], "--steps or --epochs"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--resume"],
     "--resume needs --checkpoint-dir"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--push", "http://h"],
     "--push needs --id"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--id", "Bad/Id"],
     "--id: String should match pattern"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--rr", "4"],
     "no option --rr"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:nope", "--out", "x"], "unknown demo task"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--lang", "de"],
     "--lang: Input should be 'en' or 'fr'"),
    (["--kind", "lora", "--task", "vqa", "--data", "missing.jsonl", "--out", "x", "--lang", "fr"],
     "--lang fr: only a demo: source has another language"),
    (["--kind", "sft", "--task", "caption", "--data", "demo:caption", "--out", "x", "--denoise"],
     "--denoise learns unlabelled text: give --task text"),
    (["--kind", "lora", "--task", "vqa", "--data", "missing.jsonl", "--out", "x"], "file not found"),
    (["--kind", "lora", "--task", "vqa", "--data", "vqav2:q.json,a.json", "--out", "x"],
     "needs 3 comma-separated paths"),
    (["--kind", "lora", "--task", "vqa", "--data", "somewhere", "--out", "x"], "unknown data source"),
    (["--kind", "lora", "--task", "vqa", "--data", "BAD", "--out", "x"], "bad.jsonl:2: not valid JSON"),
    (["--kind", "lora", "--task", "caption", "--data", "demo:colors", "--out", "x", *TINY],
     "holds vqa examples, but the task is caption"),
    (["--kind", "lora", "--task", "vqa", "--data", "demo:colors", "--out", "x", "--backbone",
      "t5-huge"], "--backbone"),
])
def test_bad_arguments_are_one_clear_line(tmp_path, capsys, argv, fragment):
    argv = [_bad_jsonl(tmp_path) if a == "BAD" else a for a in argv]
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1, err
