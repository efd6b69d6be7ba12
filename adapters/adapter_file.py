"""The adapter file: one ``.safetensors`` whose metadata holds the JSON description.

Metadata key ``petserve`` -> JSON ``{format_version, kind, config, backbone: {fingerprint, name},
task, created, trainable_parameters, name?, inputs?}`` (``inputs``: how the adapter's training
inputs were built, ``adapters.tasks.InputFormat``). Version 1 files (written before ``inputs`` and
VL-PET's ``gate_input`` existed) are read with the values they were trained with. Tensors are
named as the kind declares (``adapters.kinds.base``). Only safetensors is ever parsed (never
pickle). Every way a file can be broken raises :class:`AdapterFileError` with its own ``code``
and a message that says what is wrong.
"""
from __future__ import annotations

import json
import math
import struct
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from petserve.adapters.atomic_file import write_atomically
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.kinds import KINDS, get_kind
from petserve.adapters.kinds.base import KindConfig
from petserve.adapters.runtime.forms import CompiledAdapter
from petserve.adapters.tasks import TASK_NAMES, InputFormat

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_MAX_BYTES = 512 * 2**20
_MAX_HEADER = 64 * 2**20
DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
          "I64": (torch.int64, 8)}     # I64: sft indices only (AdapterKind.check_params)
# per float dtype, the unsigned view and its exponent bits: a value is NaN or infinite exactly
# when every exponent bit is set
_EXPONENT = {"F32": (np.uint32, 0x7F800000), "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80)}


class AdapterFileError(ValueError):
    """A broken adapter file. ``code`` is machine-readable; ``status`` the HTTP status it maps to."""

    def __init__(self, code: str, message: str, status: int = 422):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class BackboneRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fingerprint: str
    name: str = ""


class AdapterMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int
    kind: str
    config: dict
    backbone: BackboneRef
    task: str
    created: float = Field(default_factory=time.time)
    trainable_parameters: int = 0
    name: str = ""
    inputs: InputFormat = Field(default_factory=InputFormat)
    # where a generated adapter came from: {"generator": name, "context_sha256": digest}
    generated: dict[str, str] | None = None


@dataclass
class AdapterFile:
    meta: AdapterMeta
    config: KindConfig
    params: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def task_conditioned(self) -> bool:
        """True when the runtime forms depend on the task asked (Hyperformer, shared adapters)."""
        return get_kind(self.meta.kind).is_task_conditioned(self.config)

    def compile(self, model: VLModel, task: str | None = None) -> CompiledAdapter:
        """Runtime forms on the model's device/dtype; ``task`` (default: the file's task) matters
        only for task-conditioned kinds."""
        params = cast_params(self.params, model.dtype, model.device)
        return get_kind(self.meta.kind).compile(self.config, params, model, task or self.meta.task)


def cast_params(params: dict[str, torch.Tensor], dtype: torch.dtype,
                device=None) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (on ``device``); integer ones (sft indices) as they are."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in params.items()}


# ---- writing -------------------------------------------------------------------------------
def reproducible_created() -> float:
    """A build's ``created`` stamp: ``$SOURCE_DATE_EPOCH`` (the reproducible-builds convention)
    or 0, never the wall clock (the adapter store records upload times itself)."""
    import os
    return float(os.environ.get("SOURCE_DATE_EPOCH", 0))


def adapter_bytes(kind: str, config: KindConfig, params: dict[str, torch.Tensor], model: VLModel,
                  task: str, name: str = "", dtype: torch.dtype = torch.float32,
                  inputs: InputFormat | None = None, generated: dict[str, str] | None = None,
                  created: float | None = None) -> bytes:
    """Serialise an adapter (checked against the kind's declared tensors first); ``created``
    defaults to now."""
    from safetensors.torch import save
    kind_cls = get_kind(kind)
    _check_tensors(kind_cls.param_shapes(config, model), {k: tuple(v.shape) for k, v in params.items()})
    meta = AdapterMeta(format_version=FORMAT_VERSION, kind=kind, config=config.model_dump(mode="json"),
                       backbone=BackboneRef(fingerprint=model.fingerprint, name=model.cfg.name),
                       task=task, name=name, inputs=inputs or InputFormat(), generated=generated,
                       created=time.time() if created is None else created,
                       trainable_parameters=sum(v.numel() for k, v in params.items()
                                                if v.is_floating_point()
                                                and k not in kind_cls.buffers(config, model)))
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in params.items()}
    return save(tensors, metadata={"petserve": meta.model_dump_json()})


def save_adapter(path: Path, *args, **kwargs) -> Path:
    """Write :func:`adapter_bytes` to ``path`` atomically (temp file, fsync, rename)."""
    data = adapter_bytes(*args, **kwargs)
    return write_atomically(Path(path), lambda f: f.write(data))


# ---- reading -------------------------------------------------------------------------------
def load_adapter(source: bytes | Path, model: VLModel, max_bytes: int = DEFAULT_MAX_BYTES,
                 check_backbone: bool = True) -> AdapterFile:
    """Parse and fully validate an adapter file against ``model``; raises AdapterFileError."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    if len(data) > max_bytes:
        raise AdapterFileError("adapter_too_large", f"adapter file is {len(data)} bytes, over the "
                               f"limit of {max_bytes} bytes", status=413)
    header, body = parse_header(data)
    meta = _parse_meta(header.pop("__metadata__", None))
    kind_cls = KINDS.get(meta.kind)
    if kind_cls is None:
        raise AdapterFileError("unknown_kind", f"unknown adapter kind {meta.kind!r}; "
                               f"this server knows {sorted(KINDS)}")
    try:
        config, expected = _config_and_shapes(kind_cls, meta.config, model)
    except (ValidationError, ValueError) as e:
        raise AdapterFileError("invalid_config", f"invalid {meta.kind} config: {_short(e)}") from e
    if check_backbone and meta.backbone.fingerprint != model.fingerprint:
        raise AdapterFileError("wrong_backbone", f"adapter was trained for backbone "
                               f"{meta.backbone.name or '?'} ({meta.backbone.fingerprint}); this server "
                               f"runs {model.cfg.name} ({model.fingerprint})")
    _check_tensors(expected, {k: tuple(v["shape"]) for k, v in header.items()})
    _check_finite(header, body)
    params = _read_tensors(header, body)
    try:
        kind_cls.check_params(config, params, model)
    except ValueError as e:
        raise AdapterFileError("invalid_tensors", str(e)) from e
    return AdapterFile(meta, config, params)


def parse_header(data: bytes) -> tuple[dict, memoryview]:
    """The safetensors header (validated tensor table) and the data buffer after it."""
    if len(data) < 8:
        raise AdapterFileError("not_safetensors", "not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise AdapterFileError("not_safetensors", f"not a safetensors file (header length {n} does "
                               f"not fit in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError("not_safetensors",
                               f"not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise AdapterFileError("not_safetensors", "not a safetensors file (header is not an object)")
    body = memoryview(data)[8 + n:]
    _check_table(header, len(body))
    return header, body


def read_petserve_file(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the ``petserve`` metadata as a dict, the tensors) of any petserve safetensors artifact
    (adapter, generator, text tower, cache); AdapterFileError when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    header, _ = parse_header(data)
    raw = header.get("__metadata__") or {}
    try:
        meta = json.loads(raw["petserve"])
        tensors = load(bytes(data))
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise AdapterFileError("missing_metadata", f"no readable petserve metadata ({e})") from None
    if not isinstance(meta, dict):
        raise AdapterFileError("bad_metadata", "petserve metadata is not an object")
    return meta, tensors


def _check_table(header: dict, body_len: int) -> None:
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise AdapterFileError("corrupt_tensor_table", f"tensor {name!r}: malformed entry")
        if entry["dtype"] not in DTYPES:
            raise AdapterFileError("bad_dtype", f"tensor {name!r} has dtype {entry['dtype']}; adapter "
                                   f"tensors must be one of {sorted(DTYPES)}")
        shape, offs = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise AdapterFileError("corrupt_tensor_table", f"tensor {name!r}: bad shape or offsets")
        begin, end = offs
        if not 0 <= begin <= end or end - begin != math.prod(shape) * DTYPES[entry["dtype"]][1]:
            raise AdapterFileError("corrupt_tensor_table", f"tensor {name!r}: offsets {offs} do not "
                                   f"match shape {shape}")
        if end > body_len:
            raise AdapterFileError("truncated", f"file is truncated: tensor {name!r} needs bytes up to "
                                   f"{end}, only {body_len} present")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, a), (b2, _, b) in zip(spans, spans[1:]):
        if b2 < e1:
            raise AdapterFileError("corrupt_tensor_table", f"tensors {a!r} and {b!r} overlap")


def _parse_meta(raw) -> AdapterMeta:
    if not isinstance(raw, dict) or "petserve" not in raw:
        raise AdapterFileError("missing_metadata", "safetensors file has no 'petserve' metadata: not a "
                               "petserve adapter (PEFT LoRA directories are uploaded as a zip)")
    try:
        meta = AdapterMeta.model_validate_json(raw["petserve"])
    except ValidationError as e:
        raise AdapterFileError("bad_metadata", f"adapter metadata is invalid: {_short(e)}") from e
    if meta.format_version not in READABLE_VERSIONS:
        raise AdapterFileError("unsupported_format_version", f"adapter format version "
                               f"{meta.format_version} is not supported (this server reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))})")
    if meta.format_version == 1 and meta.kind == "vlpet":
        # version 1 gated from the sublayer's normalised input
        meta.config.setdefault("gate_input", "normed")
    if meta.task not in TASK_NAMES:
        raise AdapterFileError("invalid_task",
                               f"adapter task {meta.task!r} is not one of {list(TASK_NAMES)}")
    return meta


def _check_tensors(expected: dict, got: dict) -> None:
    missing = sorted(set(expected) - set(got))
    if missing:
        raise AdapterFileError("missing_tensors", f"{len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise AdapterFileError("unexpected_tensors", f"{len(extra)} unexpected tensor(s), e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(got[k]) != tuple(shape):
            raise AdapterFileError("shape_mismatch", f"tensor {k!r} has shape {list(got[k])}, "
                                   f"expected {list(shape)}")


# Resolved configs and expected shapes per backbone: the same for every file of one kind and
# config, and a few hundred microseconds of Python each (the backbone's sites walked).
_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SHAPES_PER_MODEL = 256
_SHAPES_LOCK = threading.Lock()


def _config_and_shapes(kind_cls, raw: dict, model: VLModel) -> tuple[KindConfig, dict]:
    """(the resolved config, every tensor's expected shape) of a file's kind and config."""
    key = (kind_cls.name, json.dumps(raw, sort_keys=True))
    with _SHAPES_LOCK:
        memo = _SHAPES.setdefault(model, OrderedDict())
        got = memo.get(key)
        if got is not None:
            memo.move_to_end(key)
            return got
    config = kind_cls.resolve(kind_cls.Config(**raw), model)
    got = (config, kind_cls.param_shapes(config, model))
    with _SHAPES_LOCK:
        memo[key] = got
        while len(memo) > _SHAPES_PER_MODEL:
            memo.popitem(last=False)
    return got


def _check_finite(header: dict, body: memoryview) -> None:
    """A NaN or infinity in any float tensor is an AdapterFileError naming the tensor. Tensors
    of one dtype that lie back to back are checked as one array of their bits."""
    runs: list[list] = []           # [begin, end, dtype, [(begin, name), ...]]
    for begin, end, dtype, name in sorted((*e["data_offsets"], e["dtype"], n)
                                          for n, e in header.items() if e["dtype"] in _EXPONENT):
        if runs and runs[-1][2] == dtype and runs[-1][1] == begin:
            runs[-1][1] = end
            runs[-1][3].append((begin, name))
        else:
            runs.append([begin, end, dtype, [(begin, name)]])
    for begin, end, dtype, names in runs:
        uint, mask = _EXPONENT[dtype]
        size = np.dtype(uint).itemsize
        bits = np.frombuffer(body, dtype=uint, count=(end - begin) // size, offset=begin)
        bad = np.flatnonzero((bits & mask) == mask)
        if bad.size:
            at = begin + int(bad[0]) * size
            name = next(n for b, n in reversed(names) if b <= at)
            raise AdapterFileError("non_finite", f"tensor {name!r} contains NaN or infinite values")


def _read_tensors(header: dict, body: memoryview) -> dict[str, torch.Tensor]:
    params = {}
    for name, e in header.items():
        dtype = DTYPES[e["dtype"]][0]
        begin, end = e["data_offsets"]
        raw = bytearray(body[begin:end])     # a copy per tensor: each owns its (writable) bytes
        params[name] = (torch.frombuffer(raw, dtype=dtype) if raw
                        else torch.empty(0, dtype=dtype)).view(e["shape"])
    return params


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'config'}: {x['msg']}" for x in e.errors()[:3])
    return str(e)
