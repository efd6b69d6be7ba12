"""``petserve push FILE --id ID``: upload an adapter to a running server and print its answer.

FILE is a petserve ``.safetensors`` adapter, or a PEFT LoRA directory (zipped here; the server
imports it). Any failure prints one line naming the problem and exits 2.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

from petserve.serving.cli import CliError

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_DIR_FILES = 64


def register(sub) -> None:
    p = sub.add_parser("push", help="upload an adapter to a running server",
                       description="Upload FILE (a .safetensors adapter or a PEFT LoRA directory) "
                                   "as a new version of adapter ID.")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--id", required=True, dest="adapter_id", help="adapter id to upload as")
    p.add_argument("--url", default=os.environ.get("PETSERVE_URL", DEFAULT_URL),
                   help=f"server URL (default $PETSERVE_URL or {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="write token (default $PETSERVE_TOKEN)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    p.set_defaults(run=run)


def zip_directory(directory: Path) -> bytes:
    """The directory's regular files (not subdirectories) as an in-memory zip."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if not files:
        raise CliError(f"{directory}: the directory has no files (expected a PEFT LoRA "
                       "directory: adapter_config.json + adapter_model.safetensors)")
    if len(files) > MAX_DIR_FILES:
        raise CliError(f"{directory}: {len(files)} files; a PEFT LoRA directory has a handful")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in files:
            z.write(path, arcname=path.name)
    return buf.getvalue()


def read_adapter(path: Path) -> bytes:
    if path.is_dir():
        return zip_directory(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file or directory") from None
    except OSError as e:
        raise CliError(f"{path}: cannot read ({e.strerror})") from None


def _server_error(response) -> str:
    try:
        error = response.json()["error"]
        detail = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        detail = response.text[:200] or response.reason_phrase
    hint = " (pass --token or set PETSERVE_TOKEN)" if response.status_code == 401 else ""
    return f"the server refused the upload ({response.status_code} {detail}){hint}"


def run(args, extra) -> int:
    import httpx

    from petserve.serving.errors import ApiError
    from petserve.serving.store import validate_adapter_id
    try:
        adapter_id = validate_adapter_id(args.adapter_id)
    except ApiError as e:
        raise CliError(f"--id: {e.message}") from None
    data = read_adapter(args.file)
    token = args.token or os.environ.get("PETSERVE_TOKEN", "")
    url = f"{args.url.rstrip('/')}/v1/adapters/{adapter_id}"
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.put(url, content=data, headers=headers, timeout=args.timeout)
    except httpx.InvalidURL as e:
        raise CliError(f"--url {args.url!r} is not a valid URL ({e})") from None
    except httpx.UnsupportedProtocol:
        raise CliError(f"--url {args.url!r}: use an http:// or https:// URL") from None
    except httpx.HTTPError as e:
        raise CliError(f"cannot reach the server at {args.url} ({type(e).__name__}: {e})") from None
    if response.status_code != 201:
        raise CliError(_server_error(response))
    print(json.dumps(response.json(), indent=2))
    return 0
