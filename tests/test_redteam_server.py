"""Red-team cases that need a real `petserve serve --no-ray` process, on the embedded default as
the README runs it: the README's upload line through real curl (and curl's other upload forms),
requests no in-process client can send, SIGKILL right after a 201, 300 concurrent requests over a
small queue, and RSS / open file descriptors flat over 500 mixed good and bad requests.

The in-process cases are in tests/test_redteam.py; SIGKILL during a slow upload of another id is
test_cli_serve's.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_api import png_bytes
from tests.test_cli_serve import AUTH, SERVE, TOKEN, ServerProcess, free_port, slow_upload

ROOT = Path(__file__).resolve().parents[1]
COLORS = ROOT / "adapters/demo_assets/colors.safetensors"
MAX_QUEUE = 8


class DefaultServer(ServerProcess):
    """ServerProcess on the embedded default (no --backbone: demo backbone and adapters seeded
    into the store) with a YAML config."""

    def __init__(self, store: Path, log: Path, config: Path) -> None:
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                SERVE + ["--config", str(config), "--store", str(store), "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PETSERVE_TOKEN": TOKEN})
        self._wait_ready(timeout=120)

    def status(self, field: str) -> int:
        """A /proc/PID/status field in kB (VmRSS, VmHWM)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(next(x for x in f if x.startswith(field + ":")).split()[1])

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def start(tmp: Path, name: str, store: Path | None = None) -> DefaultServer:
    config = tmp / "server.yaml"
    config.write_text(f"max_adapter_bytes: {2 * 2**20}\nengine:\n  max_queue: {MAX_QUEUE}\n")
    return DefaultServer(store or tmp / "store", tmp / f"{name}.log", config)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("redteam-server"), "server")
    yield server
    server.kill()


def good_request(url: str, adapter: str | None = "colors", seed: int = 0) -> httpx.Response:
    feats = np.random.default_rng(seed).normal(size=(2, 64)).round(3).tolist()
    return httpx.post(f"{url}/v1/vqa", json={"adapter": adapter, "features": feats,
                                             "question": "what color?", "max_new_tokens": 2},
                      timeout=60)


def assert_healthy(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    answer = good_request(url)
    assert answer.status_code == 200 and answer.json()["adapter"] == "colors", answer.text


def stored_temp_files(store: Path) -> list[str]:
    return [p.name for p in store.rglob(".tmp-*")]


# ---- uploads through curl ---------------------------------------------------------------------


def readme_upload_line() -> str:
    """The README's upload command, continuation lines joined."""
    lines = (ROOT / "README.md").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("curl -s -X PUT"))
    command = lines[i]
    while command.endswith("\\"):
        i += 1
        command = command[:-1].rstrip() + " " + lines[i].strip()
    return command


def test_the_readme_upload_line_through_curl(server):
    curl = shutil.which("curl")
    assert curl, "curl is not installed (CI needs `apt-get install curl`)"
    line = readme_upload_line()
    assert "--data-binary @adapters/demo_assets/colors.safetensors" in line
    done = subprocess.run(["bash", "-c", line.replace("localhost:8000", server.url[7:])],
                          cwd=ROOT, env={**os.environ, "TOKEN": TOKEN}, capture_output=True,
                          timeout=60)
    info = json.loads(done.stdout)
    assert info["id"] == "my-colors" and info["kind"] == "lora", info
    assert info["sha256"] == hashlib.sha256(COLORS.read_bytes()).hexdigest()
    assert good_request(server.url, "my-colors").json()["adapter_version"] == info["version"]


@pytest.mark.parametrize("form", [["-F", f"file=@{COLORS}"], ["-T", str(COLORS)],
                                  ["--data-binary", f"@{COLORS}", "-H",
                                   "content-type: application/octet-stream"]],
                         ids=["multipart", "upload-file", "octet-stream"])
def test_curl_upload_forms(server, form):
    done = subprocess.run(["curl", "-s", "-X", "PUT", f"{server.url}/v1/adapters/curled", "-H",
                           f"Authorization: Bearer {TOKEN}", *form], capture_output=True,
                          timeout=60)
    info = json.loads(done.stdout)
    assert info["id"] == "curled", info
    assert info["sha256"] == hashlib.sha256(COLORS.read_bytes()).hexdigest()


# ---- requests only a raw client sends ---------------------------------------------------------


def raw_request(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    """Send exactly this request line (http.client neither resolves '..' nor sends a body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/adapters/..", "/v1/adapters/../../etc/passwd"])
def test_literal_dot_dot_id_is_400(server, method, path):
    headers = {**AUTH, "Content-Length": "0"}
    status, body = raw_request(server.port, method, path, headers)
    assert (status, body["error"]["code"]) == (400, "invalid_adapter_id"), body


def test_upload_declaring_10_gb_is_413_before_its_body(server):
    before = server.status("VmRSS")
    started = time.monotonic()
    status, body = raw_request(server.port, "PUT", "/v1/adapters/huge",
                               {**AUTH, "Content-Length": str(10 * 2**30)})
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    assert time.monotonic() - started < 5 and server.status("VmRSS") - before < 20 * 1024
    assert_healthy(server.url)


# ---- load -------------------------------------------------------------------------------------


def test_300_concurrent_requests_over_the_queue_limit_get_503_with_retry_after(server):
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(client.post("/v1/vqa", json={
                "adapter": "colors", "question": "what color?", "max_new_tokens": 8,
                "features": np.random.default_rng(i).normal(size=(2, 64)).round(3).tolist()})
                for i in range(300))), 120)

    answers = asyncio.run(burst())         # every one answers: none hangs past the timeouts
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= MAX_QUEUE, statuses
    busy = [r for r in answers if r.status_code == 503]
    assert busy, "the queue limit was never reached"
    for r in busy:
        assert r.json()["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
    assert_healthy(server.url)


def _mixed_requests() -> list[tuple[str, str, dict, int]]:
    """(method, path, httpx kwargs, expected status): good and bad, cheap, over every route."""
    feats = np.random.default_rng(0).normal(size=(2, 64)).round(3).tolist()
    ask = {"adapter": "colors", "features": feats, "question": "what color?", "max_new_tokens": 2}
    svg = base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    json_type = {"content-type": "application/json"}
    return [
        ("POST", "/v1/vqa", {"json": ask}, 200),
        ("POST", "/v1/caption", {"json": {**ask, "adapter": "caption", "question": None}}, 422),
        ("POST", "/v1/caption", {"json": {"adapter": "caption", "features": feats,
                                          "max_new_tokens": 2}}, 200),
        ("POST", "/v1/caption", {"data": {"adapter": "caption", "max_new_tokens": "2"},
                                 "files": {"image": ("one.png", png_bytes(0))}}, 200),
        ("POST", "/v1/vqa", {"json": {"question": "q", "image": "abc$"}}, 400),
        ("POST", "/v1/vqa", {"json": {"question": "q", "image": svg}}, 415),
        ("POST", "/v1/vqa", {"json": {**ask, "adapter": "missing"}}, 404),
        ("POST", "/v1/vqa", {"content": b"[" * 10_000, "headers": json_type}, 400),
        ("POST", "/v1/vqa", {"data": {"question": "q"}, "files": {"video": ("v", b"junk" * 99)}},
         415),
        ("PUT", "/v1/adapters/scratch", {"content": os.urandom(512), "headers": AUTH}, 422),
        ("PUT", "/v1/adapters/scratch", {"content": b"x", "headers": {}}, 401),
        ("GET", "/v1/adapters/%2E%2E", {}, 400),
        ("GET", "/v1/adapters", {}, 200),
        ("GET", "/healthz", {}, 200),
    ]


def test_rss_and_open_fds_stay_flat_over_500_mixed_requests(server):
    cases, deadline = _mixed_requests(), time.monotonic() + 180
    with httpx.Client(base_url=server.url, timeout=60) as client:
        def run(n: int) -> None:
            for i in range(n):
                assert time.monotonic() < deadline
                method, path, kwargs, status = cases[i % len(cases)]
                r = client.request(method, path, **kwargs)
                assert r.status_code == status, (method, path, r.text)
        run(100)                                       # warm-up: caches, slots, allocator pools
        rss, fds = server.status("VmRSS"), server.open_fds()
        run(400)
        grown_mb = (server.status("VmRSS") - rss) / 1024
        assert grown_mb < 25 and server.open_fds() <= fds + 2, (grown_mb, fds, server.open_fds())
    assert_healthy(server.url)


# ---- SIGKILL ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_right_after_a_201_while_the_same_id_is_mid_upload(tmp_path):
    """The acknowledged version survives, the torn upload leaves nothing visible (its temp file is
    cleaned at start-up) and the id takes new uploads."""
    first = start(tmp_path, "first")
    started, outcome = threading.Event(), []
    torn = threading.Thread(target=slow_upload, args=(first.url, started, outcome))  # id 'partial'
    torn.start()
    try:
        assert started.wait(30)
        acked = httpx.put(f"{first.url}/v1/adapters/partial", content=COLORS.read_bytes(),
                          headers=AUTH, timeout=60)
        first.kill()                                   # no pause: right after the 201
        assert acked.status_code == 201, acked.text
    finally:
        first.kill()
        torn.join(30)
    assert outcome and outcome[0] != 201
    second = start(tmp_path, "second", store=tmp_path / "store")
    try:
        got = httpx.get(f"{second.url}/v1/adapters/partial", timeout=30).json()
        assert (got["version"], got["sha256"]) == (acked.json()["version"], acked.json()["sha256"])
        assert stored_temp_files(tmp_path / "store") == []
        assert good_request(second.url, "partial").json()["adapter_version"] == got["version"]
        again = httpx.put(f"{second.url}/v1/adapters/partial", content=COLORS.read_bytes(),
                          headers=AUTH, timeout=60)
        assert again.status_code == 201 and again.json()["version"] == got["version"] + 1
        assert_healthy(second.url)
    finally:
        second.kill()


# ---- the Generative Adapter commands of the README --------------------------------------------


def readme_block_after(marker: str) -> str:
    """The first ```bash block after the line holding ``marker``."""
    text = (ROOT / "README.md").read_text()
    rest = text[text.index(marker):]
    start = rest.index("```bash\n") + len("```bash\n")
    return rest[start:rest.index("```", start)]


def test_the_readme_generate_commands_through_curl(server, tmp_path):
    """Literally as printed (the embedded default ships its generator): write a context, generate
    an adapter from it, ask with it by id and with the context inline."""
    block = readme_block_after("Generate an adapter from a context")
    script = block.replace("localhost:8000", server.url[7:]).replace(".venv/bin/python",
                                                                     str(ROOT / ".venv/bin/python"))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "TOKEN": TOKEN}, timeout=120)
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    generated, by_id, inline = replies
    assert generated["kind"] == "lora" and generated["id"] == "count-fr", generated
    assert by_id["adapter"] == "count-fr" and by_id["adapter_version"] == generated["version"]
    assert inline["adapter"] is None and len(inline["context_sha256"]) == 64
    assert inline["answer"] == by_id["answer"]
