"""`petserve serve --no-ray` as a real server process: crash safety of uploads, and `petserve push`;
the CLI's configuration (flags over YAML) and serving/serve_config.yaml.

The server runs on a tiny Hugging Face T5 directory (features-only backbone), so the same backbone
also takes a PEFT LoRA directory for `petserve push DIR`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from petserve.adapters.adapter_file import adapter_bytes
from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.tokenizer import TINY_VOCAB_SIZE
from petserve.serving.cli import main
from tests.conftest import random_adapter

TOKEN = "cli-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KINDS = {"lora": {"r": 4}, "adapter": {"reduction_factor": 4}, "vlpet": {"gate": "small"}}
SERVE = [sys.executable, "-c", "import sys; from petserve.serving.cli import main; sys.exit(main())",
         "serve", "--no-ray", "--num-slots", "4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hf_t5_dir(tmp_path_factory) -> Path:
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=TINY_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    directory = tmp_path_factory.mktemp("hf-t5")
    tf.T5ForConditionalGeneration(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_backbone(hf_t5_dir):
    return build_backbone(hf_t5_dir)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Until ``url``/healthz answers 200; AssertionError with the log's end if the server exits
    or is not ready in time (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server not ready: {log.read_text()[-2000:]}")


class ServerProcess:
    """`petserve serve --no-ray` in a subprocess; output goes to a log file (a pipe could fill)."""

    def __init__(self, backbone_dir: Path, store: Path, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PETSERVE_TOKEN": TOKEN}
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                SERVE + ["--backbone", str(backbone_dir), "--store", str(store),
                         "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout=120)

    def _wait_ready(self, timeout: float) -> None:
        wait_ready(self.proc, self.url, self.log, timeout)

    def kill(self) -> None:
        self.proc.kill()      # SIGKILL: no clean-up code runs
        self.proc.wait(10)


def ask(url: str, adapter: str, seed: int) -> httpx.Response:
    feats = np.random.default_rng(seed).normal(size=(3, 2048)).round(3).tolist()
    return httpx.post(f"{url}/v1/vqa", json={"adapter": adapter, "features": feats,
                                             "question": "what color?", "max_new_tokens": 4},
                      timeout=60)


def slow_upload(url: str, started: threading.Event, outcome: list) -> None:
    """A large chunked upload that trickles in, so the server is killed in the middle of it."""
    def body():
        for i in range(2000):
            if i == 3:
                started.set()
            yield b"\0" * 65536
            time.sleep(0.02)
    try:
        outcome.append(httpx.put(f"{url}/v1/adapters/partial", content=body(), headers=AUTH,
                                 timeout=60).status_code)
    except httpx.HTTPError as e:
        outcome.append(type(e).__name__)


@pytest.fixture(scope="module")
def restarted(hf_t5_dir, hf_backbone, tmp_path_factory):
    """Acknowledge three uploads, SIGKILL the server during a fourth, restart it on the store."""
    store, logs = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("logs")
    server = ServerProcess(hf_t5_dir, store, logs / "first.log")
    acknowledged = {}
    for seed, (kind, options) in enumerate(KINDS.items()):
        cfg, params = random_adapter(hf_backbone, kind, options, seed)
        r = httpx.put(f"{server.url}/v1/adapters/ack-{kind}", headers=AUTH, timeout=60,
                      content=adapter_bytes(kind, cfg, params, hf_backbone, "vqa"))
        assert r.status_code == 201, r.text
        acknowledged[f"ack-{kind}"] = r.json()["version"]
    started, outcome = threading.Event(), []
    uploader = threading.Thread(target=slow_upload, args=(server.url, started, outcome))
    uploader.start()
    assert started.wait(30)
    time.sleep(0.2)
    assert uploader.is_alive() and not outcome      # the server is mid-body
    server.kill()
    uploader.join(30)
    second = ServerProcess(hf_t5_dir, store, logs / "second.log")
    yield second, acknowledged, outcome
    second.kill()


@pytest.mark.slow
def test_every_acknowledged_upload_survives_sigkill_and_no_partial_is_listed(restarted):
    server, acknowledged, outcome = restarted
    assert outcome and outcome[0] != 201
    listed = httpx.get(f"{server.url}/v1/adapters", timeout=30).json()["adapters"]
    assert {a["id"]: a["version"] for a in listed} == acknowledged
    assert httpx.get(f"{server.url}/v1/adapters/partial", timeout=30).status_code == 404
    for seed, (adapter_id, version) in enumerate(sorted(acknowledged.items())):
        answer = ask(server.url, adapter_id, seed)
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter"] == adapter_id
        assert answer.json()["adapter_version"] == version


@pytest.mark.slow
def test_push_safetensors_file(restarted, hf_backbone, tmp_path, capsys):
    server = restarted[0]
    cfg, params = random_adapter(hf_backbone, "lora", {"r": 2}, seed=7)
    path = tmp_path / "mine.safetensors"
    path.write_bytes(adapter_bytes("lora", cfg, params, hf_backbone, "vqa"))
    code = main(["push", str(path), "--id", "pushed", "--url", server.url, "--token", TOKEN])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["id"] == "pushed" and printed["version"] == 1
    assert printed["kind"] == "lora" and printed["trainable_parameters"] > 0
    assert ask(server.url, "pushed", 0).json()["adapter_version"] == 1


@pytest.mark.slow
def test_push_peft_lora_directory(restarted, hf_t5_dir, tmp_path, capsys):
    import peft
    import torch
    import transformers as tf
    base = tf.T5ForConditionalGeneration.from_pretrained(hf_t5_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    lora.save_pretrained(tmp_path / "peft")
    code = main(["push", str(tmp_path / "peft"), "--id", "from-peft", "--url",
                 restarted[0].url, "--token", TOKEN])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert json.loads(printed.out)["kind"] == "lora"


@pytest.mark.slow
@pytest.mark.parametrize("case,args,message", [
    ("missing file", ["/nonexistent/a.safetensors", "--id", "x"], "no such file"),
    ("wrong token", ["FILE", "--id", "x", "--token", "wrong"], "401"),
    ("no server", ["FILE", "--id", "x", "--url", "http://127.0.0.1:9"], "cannot reach"),
    ("not a url", ["FILE", "--id", "x", "--url", "localhost"], "http://"),
    ("invalid id", ["FILE", "--id", "../etc"], "invalid adapter id"),
])
def test_push_failures_print_one_line_and_exit_2(restarted, tmp_path, capsys, case, args,
                                                 message):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"whatever")
    args = [str(path) if a == "FILE" else a for a in args]
    if "--url" not in args:
        args += ["--url", restarted[0].url]
    assert main(["push", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("petserve: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("args,message", [
    (["--backbone", "/nonexistent/dir"], "neither a preset"),
    (["--port", "70000"], "port"),
    (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_serve_rejects_bad_arguments_before_starting(args, message, capsys):
    assert main(["serve", "--no-ray", *args]) == 2
    assert message in capsys.readouterr().err


def test_flags_override_the_yaml_config(tmp_path):
    from petserve.serving.cli import build_parser
    from petserve.serving.commands.serve import server_config
    path = tmp_path / "server.yaml"
    path.write_text("backbone: tiny-bart\nport: 9000\nengine:\n  num_slots: 3\n  max_queue: 7\n")
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9100",
                                      "--num-slots", "5", "--store", str(tmp_path / "s")])
    config = server_config(args)
    assert (config.backbone, config.port, config.store_dir) == ("tiny-bart", 9100, tmp_path / "s")
    assert (config.engine.num_slots, config.engine.max_queue) == (5, 7)


def test_petserve_store_names_a_directory_or_a_bucket(tmp_path, monkeypatch):
    """$PETSERVE_STORE=s3://... opens the S3 store (not a local folder named `s3:`), with the blob
    cache in the default directory; a --store directory wins over it."""
    from petserve.serving.cli import build_parser
    from petserve.serving.commands.serve import server_config
    from petserve.serving.server_config import DEFAULT_STORE, ServerConfig
    monkeypatch.setenv("PETSERVE_STORE", "s3://team-bucket/adapters")
    for config in (ServerConfig(), server_config(build_parser().parse_args(["serve"]))):
        assert config.store_url == "s3://team-bucket/adapters"
        assert config.store_dir == DEFAULT_STORE.expanduser()
    flagged = server_config(build_parser().parse_args(["serve", "--store", str(tmp_path)]))
    assert (flagged.store_url, flagged.store_dir) == (None, tmp_path)
    monkeypatch.setenv("PETSERVE_STORE", "s3://Bad_Bucket")
    with pytest.raises(ValueError, match="is not s3://BUCKET"):
        ServerConfig()
    monkeypatch.setenv("PETSERVE_STORE", str(tmp_path / "dir"))
    assert (ServerConfig().store_url, ServerConfig().store_dir) == (None, tmp_path / "dir")


def test_serve_config_yaml_is_a_valid_serve_config_that_builds(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from petserve.serving.deployments import app_builder
    raw = yaml.safe_load((Path(__file__).parents[1] / "serving/serve_config.yaml").read_text())
    app = ServeDeploySchema.model_validate(raw).applications[0]
    assert app.import_path == "petserve.serving.deployments:app_builder"
    args = {**app.args, "backbone": "tiny-t5", "store_dir": str(tmp_path), "device": "cpu"}
    assert type(app_builder(args)).__name__ == "Application"     # no cluster needed to build
