"""`petserve serve --no-ray --store s3://BUCKET/PREFIX` as a real server process on moto's S3 server:
the embedded default seeds its demo adapters into S3, lists them, takes an upload; and start-up
errors about the bucket or the URL are one line, not a traceback."""
from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from petserve.adapters.demo import ensure_demo_assets
from petserve.serving.cli import main
from tests.test_cli_serve import SERVE, free_port, wait_ready

pytest_plugins = ("tests.moto_s3",)
TOKEN = "s3-serve-token"


@pytest.mark.slow
def test_serve_on_s3_seeds_lists_and_uploads(s3_env, tmp_path):
    bucket = s3_env.new_bucket()
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "PETSERVE_TOKEN": TOKEN,         # s3_env set the AWS_* variables
           "PETSERVE_STORE": str(tmp_path / "cache")}
    with open(log, "w") as out:
        proc = subprocess.Popen(SERVE + ["--store", f"s3://{bucket}/team", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=180)
        assert f"store s3://{bucket}/team)" in log.read_text()
        demo = ensure_demo_assets().store_files()
        listed = httpx.get(f"{url}/v1/adapters", timeout=30).json()["adapters"]
        assert set(demo) <= {a["id"] for a in listed}
        some_id, some_file = sorted(demo.items())[0]
        r = httpx.put(f"{url}/v1/adapters/my-copy", content=some_file.read_bytes(), timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1
        keys = {o["Key"] for o in s3_env.client().list_objects_v2(
            Bucket=bucket, Prefix="team/")["Contents"]}
        assert {"team/my-copy/v1.json", f"team/{some_id}/v1.json"} <= keys
        assert any((tmp_path / "cache" / ".s3-cache").iterdir())     # the replica's cache
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("store,message", [
    ("s3://no-such-bucket/team", "bucket 'no-such-bucket' does not exist"),
    ("s3://Bad_Bucket/x", "is not s3://BUCKET[/PREFIX]"),
])
def test_serve_store_errors_are_one_line(s3_env, store, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PETSERVE_STORE", str(tmp_path))
    assert main(["serve", "--no-ray", "--store", store]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("petserve: error:") and message in err and "\n" not in err


def test_the_readme_s3_commands_as_printed(tmp_path):
    """The README's moto walk-through, literally (ports moved to free ones, the store's cache
    under tmp): moto's server, a bucket, the server on it, the list and an upload."""
    from tests.test_redteam_server import ROOT, readme_block_after
    block = readme_block_after("### Adapter store in S3")
    moto, port = free_port(), free_port()
    script = (block.replace("5000", str(moto)).replace("8080", str(port))
              .replace(".venv/bin/", f"{ROOT}/.venv/bin/")
              .replace("@adapters/demo_assets", f"@{ROOT}/adapters/demo_assets"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PETSERVE_STORE"] = str(tmp_path / "cache")
    proc = subprocess.Popen(["bash", "-c", "trap 'kill $(jobs -p) 2>/dev/null' EXIT\n" + script],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0, err + (tmp_path / "serve.log").read_text()[-2000:]
    listed, uploaded = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {"colors", "count", "caption"} <= {a["id"] for a in listed["adapters"]}
    assert uploaded["id"] == "my-colors" and uploaded["version"] == 1, uploaded
