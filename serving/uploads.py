"""Validate an uploaded adapter before it reaches the store.

The store only ever holds petserve ``.safetensors`` files: a zipped PEFT LoRA directory is imported
and re-serialised here. Every way an upload can be broken becomes an ApiError 4xx (never a 500).
"""
from __future__ import annotations

import io
import zipfile

import torch

from petserve.adapters.adapter_file import (
    AdapterFile,
    AdapterFileError,
    adapter_bytes,
    cast_params,
    load_adapter,
)
from petserve.adapters.kinds import get_kind
from petserve.adapters.peft_import import import_peft_lora
from petserve.serving.errors import ApiError

ZIP_MAGIC = b"PK\x03\x04"
MAX_ZIP_MEMBERS = 64


def prepare_upload(data: bytes, model, max_bytes: int, task: str = "vqa",
                   towers=None, audio=None) -> tuple[bytes, dict]:
    """Validate an uploaded adapter: a petserve .safetensors file (adapters.adapter_file.load_adapter)
    or a zip of a PEFT LoRA directory (adapters.peft_import.import_peft_lora, then re-serialised with
    adapter_bytes so the store only ever holds petserve safetensors; ``task`` is the task recorded
    for it). Returns (bytes to store, store metadata dict with kind, task, trainable_parameters,
    backbone_fingerprint, config, name, task_conditioned, inputs). AdapterFileError -> ApiError with the
    error's status (422 by default, 413 for size) and code. A cache file (CapS) is checked against
    ``towers``, the server's CLIP (``prepare_cache``); a file made for ``audio``, the server's
    audio backbone (its fingerprint in the file), against that backbone."""
    data = bytes(data)
    if len(data) > max_bytes:
        raise ApiError.payload_too_large(f"adapter upload is {len(data)} bytes, over the limit of "
                                         f"{max_bytes} bytes", code="adapter_too_large")
    if is_cache_file(data):
        return data, prepare_cache(data, towers)
    try:
        if data.startswith(ZIP_MAGIC):
            _check_zip_size(data, max_bytes)
            af = _import_zip(data, model, task)
            data = adapter_bytes(af.kind, af.config, af.params, model, af.meta.task, name=af.meta.name,
                                 inputs=af.meta.inputs)
            if len(data) > max_bytes:
                raise AdapterFileError("adapter_too_large", f"the imported adapter is {len(data)} "
                                       f"bytes, over the limit of {max_bytes} bytes", status=413)
        else:
            if audio is not None and _file_fingerprint(data) == audio.fingerprint:
                model = audio
            af = load_adapter(data, model, max_bytes=max_bytes)
        _check_compiles(af, model)
    except AdapterFileError as e:
        raise ApiError(e.status, e.code, e.message) from e
    return data, {"kind": af.kind, "task": af.meta.task,
                  "task_conditioned": af.task_conditioned,
                  "trainable_parameters": af.meta.trainable_parameters,
                  "backbone_fingerprint": model.fingerprint, "config": af.meta.config,
                  "name": af.meta.name, "inputs": af.meta.inputs.model_dump(mode="json")}


def _file_fingerprint(data: bytes) -> str | None:
    """The backbone fingerprint an adapter file names (None when its header is unreadable: the
    full parse then reports why)."""
    import json

    from petserve.adapters.adapter_file import parse_header
    try:
        header, _ = parse_header(data)
        return json.loads(header["__metadata__"]["petserve"])["backbone"]["fingerprint"]
    except (AdapterFileError, KeyError, TypeError, ValueError):
        return None


def is_cache_file(data: bytes) -> bool:
    from petserve.adapters.adapter_file import read_petserve_file
    from petserve.adapters.cache_file import CACHE_FORMAT
    if data.startswith(ZIP_MAGIC):
        return False
    try:
        return read_petserve_file(data)[0].get("format") == CACHE_FORMAT
    except ValueError:
        return False


def prepare_cache(data: bytes, towers) -> dict:
    """Store metadata of a cache adapter made with ``towers`` (422 naming the problem: no CLIP
    on this server, another CLIP, features of another width, a broken file)."""
    from petserve.adapters.cache_file import CacheFileError, load_cache, towers_identity
    if towers is None:
        raise ApiError.unprocessable("no_clip", "this server has no CLIP text side, so it cannot "
                                     "serve cache adapters (start it with --clip FILE_OR_DIR)")
    identity = towers_identity(towers)
    try:
        head, meta = load_cache(data, identity, towers.cfg.projection_dim)
    except CacheFileError as e:
        raise ApiError.unprocessable(e.code, str(e)) from None
    return {"kind": "cache", "task": "classify", "task_conditioned": False,
            "trainable_parameters": 0, "backbone_fingerprint": towers.backbone, "clip": identity,
            "name": meta.get("name", ""), "classes": head.num_classes,
            "supports": int(head.images.shape[0])}


def _check_zip_size(data: bytes, max_bytes: int) -> None:
    """Refuse a zip whose members would unpack past ``max_bytes`` (a zip bomb) before reading any."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except zipfile.BadZipFile as e:
        raise AdapterFileError(
            "not_peft_zip", f"upload looks like a zip but is not a valid one: {e}") from None
    if len(infos) > MAX_ZIP_MEMBERS:
        raise AdapterFileError("not_peft_dir", f"zip has {len(infos)} members; a PEFT LoRA "
                               f"directory has a handful")
    unpacked = sum(i.file_size for i in infos)
    if unpacked > max_bytes:
        raise AdapterFileError("adapter_too_large", f"zip unpacks to {unpacked} bytes, over the "
                               f"limit of {max_bytes} bytes", status=413)


def _import_zip(data: bytes, model, task: str) -> AdapterFile:
    try:
        return import_peft_lora(data, model, task=task)
    except AdapterFileError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError) as e:   # odd adapter_config.json values
        raise AdapterFileError("bad_peft_files", f"cannot import the PEFT adapter: "
                               f"{type(e).__name__}: {e}") from e


def _check_compiles(af: AdapterFile, model) -> None:
    """The adapter must compile into runtime forms (what the slot pool will do at serve time)."""
    params = cast_params(af.params, torch.float32)
    try:
        get_kind(af.kind).compile(af.config, params, model, af.meta.task)
    except (KeyError, ValueError, RuntimeError) as e:
        raise AdapterFileError("invalid_adapter", f"adapter does not compile for this backbone: "
                               f"{e}") from e
