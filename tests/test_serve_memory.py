"""`petserve serve` (the embedded default, as `make serve` runs it) as a real process tree: only the
Backbone and AudioBackbone replicas import torch (not the driver, not MetricsBoard), the HTTP app
runs inside the one Backbone replica (no Ingress process: ``ingress`` "auto" with one replica), and
the whole tree's resident memory stays under 2 GiB plus 512 MiB for the audio family's replica (one
more torch process). Audio requests reach the AudioBackbone replica through the Backbone one, and
/metrics shows both replicas' engine stats.

Processes are found under the driver's pid in /proc; torch shows as libtorch in /proc/PID/maps."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from petserve.adapters.data.audio import AUDIO_TASKS, make_clips, wav_bytes

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux /proc")]
TOKEN = "memory-test-token"
TREE_LIMIT_MIB = 2048 + 512       # the VL tree + the AudioBackbone replica
AUDIO_LIMIT_MIB = 448
NO_MODEL = ("ray::ServeReplica:petserve:MetricsBoard",)
INGRESS = "ray::ServeReplica:petserve:Ingress"
BACKBONE = "ray::ServeReplica:petserve:Backbone"
AUDIO = "ray::ServeReplica:petserve:AudioBackbone"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def describe(pid: int) -> dict | None:
    """{cmd, rss_mib, pss_mib, torch} of a live process; None once it is gone."""
    proc = Path(f"/proc/{pid}")
    try:
        rollup = dict(line.split()[:2] for line in (proc / "smaps_rollup").read_text().splitlines()
                      if line.endswith("kB"))
        return {"cmd": (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip(),
                "rss_mib": int(rollup["Rss:"]) / 1024, "pss_mib": int(rollup["Pss:"]) / 1024,
                "torch": "libtorch" in (proc / "maps").read_text()}
    except (OSError, KeyError):
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The driver's pid and URL, serving with a fresh store (seeded with the demo adapters)."""
    port = free_port()
    env = {**os.environ, "PETSERVE_STORE": str(tmp_path_factory.mktemp("store")),
           "PETSERVE_TOKEN": TOKEN, "RAY_ADDRESS": "local"}    # never join another cluster
    log = (tmp_path_factory.mktemp("log") / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from petserve.serving.cli import main; sys.exit(main())",
         "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not healthy within 180 s"
            time.sleep(1)
        yield proc.pid, url
    finally:
        proc.send_signal(signal.SIGTERM)               # the driver removes the app, stops Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_only_the_backbones_import_torch_and_the_tree_fits(server):
    driver, url = server
    body = {"adapter": "colors", "question": "what color is the shape?",
            "features": [[0.1] * 64], "max_new_tokens": 2}
    r = httpx.post(f"{url}/v1/vqa", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{url}/v1/adapters", timeout=30).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=30)         # our own, without Ray's dashboard
    assert metrics.status_code == 200 and "petserve_http_requests_total" in metrics.text
    time.sleep(2)                                             # a stats push reaches the board

    procs = {pid: d for pid in process_tree(driver) if (d := describe(pid)) is not None}
    table = "\n".join(f"{d['rss_mib']:7.0f} {d['pss_mib']:7.0f} {'torch' if d['torch'] else '     '}"
                      f" {d['cmd'][:90]}" for d in sorted(procs.values(), key=lambda d: -d["rss_mib"]))
    by_cmd = {d["cmd"]: d for d in procs.values()}
    assert by_cmd.get(BACKBONE, {}).get("torch"), table       # the probe sees torch where it is
    assert by_cmd.get(AUDIO, {}).get("torch"), table
    assert by_cmd[AUDIO]["rss_mib"] <= AUDIO_LIMIT_MIB, table  # no transformers modeling stack
    for name in NO_MODEL:
        assert name in by_cmd and not by_cmd[name]["torch"], table
    assert INGRESS not in by_cmd, table
    assert not procs[driver]["torch"], table
    rss = sum(d["rss_mib"] for d in procs.values())
    print(f"\n{table}\ntree: RSS {rss:.0f} MiB, PSS {sum(d['pss_mib'] for d in procs.values()):.0f}"
          f" MiB over {len(procs)} processes")
    assert rss <= TREE_LIMIT_MIB, table


def test_audio_requests_go_through_the_backbone_replica_to_the_audio_one(server):
    _, url = server
    right = 0
    clips = make_clips("pitch", 1, 2024)
    for clip, y in zip(clips.clips, clips.labels):
        r = httpx.post(f"{url}/v1/audio/classify", data={"adapter": "pitch", "top_k": "2"},
                       files={"audio": ("clip.wav", wav_bytes(clip), "audio/wav")}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == "pitch" and len(body["scores"]) == 2
        right += body["label"] == AUDIO_TASKS["pitch"][y]
    assert right / len(clips.labels) >= 0.8
    r = httpx.post(f"{url}/v1/audio/classify", data={"adapter": "no-such-audio"},
                   files={"audio": ("clip.wav", wav_bytes(clips.clips[0]), "audio/wav")}, timeout=60)
    assert r.status_code == 404, r.text
    time.sleep(2)                                   # a stats push from the audio replica
    text = httpx.get(f"{url}/metrics", timeout=30).text
    assert ('petserve_engine_request_seconds_count{adapter="pitch",replica="AudioBackbone#'
            in text), text[-3000:]
    assert 'petserve_engine_batch_rows_count{replica="Backbone#' in text, text[-3000:]
