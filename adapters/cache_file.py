"""The ``cache`` adapter file (CapS-Adapter, adapters/caps.py): one ``.safetensors`` holding a
classification head over CLIP features.

Tensors: ``text`` (C, D) class text embeddings, ``images`` (N, D) support image features,
``captions`` (N, D) support caption features, ``targets`` (N,) int64 class of each support.
Metadata ``petserve``: ``{"format": "petserve-cache", "version": 1, "kind": "cache", "labels": [...],
"alpha", "beta", "gamma", "delta", "clip": <identity of the CLIP towers>, "name"}``. The CLIP
identity (``towers_identity``) binds the features to the towers that made them: a cache made with
another CLIP is refused, naming both.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch

from petserve.adapters.caps import CacheHead

CACHE_FORMAT, CACHE_VERSION = "petserve-cache", 1
MAX_CLASSES, MAX_SUPPORTS = 4096, 65536


class CacheFileError(ValueError):
    """A cache file that cannot be used; ``code`` is stable, the message names the problem."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def towers_identity(towers) -> str:
    """A digest of the towers' tensors and of the backbone they belong to."""
    h = hashlib.sha256(towers.backbone.encode())
    for k, v in sorted(towers.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_bytes(head: CacheHead, clip: str, name: str = "") -> bytes:
    from safetensors.torch import save
    check_head(head)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": "cache",
            "labels": list(head.labels), "alpha": head.alpha, "beta": head.beta,
            "gamma": head.gamma, "delta": head.delta, "clip": clip, "name": name}
    tensors = {"text": head.text.float().contiguous(), "images": head.images.float().contiguous(),
               "captions": head.captions.float().contiguous(),
               "targets": head.targets.to(torch.int64).contiguous()}
    return save(tensors, metadata={"petserve": json.dumps(meta, separators=(",", ":"))})


def load_cache(data: bytes, clip: str, dim: int) -> tuple[CacheHead, dict]:
    """(head, metadata) of a cache file for the towers of identity ``clip`` and width ``dim``;
    CacheFileError otherwise."""
    from petserve.adapters.adapter_file import read_petserve_file
    try:
        meta, tensors = read_petserve_file(data)
    except ValueError as e:
        raise CacheFileError("invalid_cache", f"not a petserve cache file ({e})") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise CacheFileError("invalid_cache", "not a petserve cache file (format "
                             f"{meta.get('format')!r} version {meta.get('version')!r})")
    if meta.get("clip") != clip:
        raise CacheFileError("clip_mismatch", f"the cache was made with CLIP towers "
                             f"{meta.get('clip')}, this server's are {clip}")
    missing = sorted({"text", "images", "captions", "targets"} - set(tensors))
    if missing:
        raise CacheFileError("invalid_cache", f"missing tensor {missing[0]!r}")
    try:
        head = CacheHead(list(meta["labels"]), tensors["text"], tensors["images"],
                         tensors["captions"], tensors["targets"], float(meta["alpha"]),
                         float(meta["beta"]), float(meta["gamma"]), float(meta["delta"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CacheFileError("invalid_cache", f"bad cache metadata ({e})") from None
    check_head(head, dim)
    return head, meta


def check_head(head: CacheHead, dim: int | None = None) -> None:
    """CacheFileError naming the first problem: label count, shapes, widths, targets, weights."""
    C, N = len(head.labels), head.images.shape[0] if head.images.dim() == 2 else -1
    if not 1 <= C <= MAX_CLASSES:
        raise CacheFileError("invalid_cache", f"a cache needs 1-{MAX_CLASSES} classes, got {C}")
    if len(set(head.labels)) != C or not all(isinstance(x, str) and x for x in head.labels):
        raise CacheFileError("invalid_cache", "labels must be distinct non-empty strings")
    D = head.text.shape[-1]
    if dim is not None and D != dim:
        raise CacheFileError("feature_dim_mismatch", f"the cache's features are {D} wide, this "
                             f"server's CLIP embeddings {dim}")
    shapes = {"text": (C, D), "images": (N, D), "captions": (N, D), "targets": (N,)}
    for name, want in shapes.items():
        got = tuple(getattr(head, name).shape)
        if got != want:
            raise CacheFileError("invalid_cache", f"tensor {name!r} has shape {got}, expected "
                                 f"{want}")
    if not 1 <= N <= MAX_SUPPORTS:
        raise CacheFileError("invalid_cache", f"a cache needs 1-{MAX_SUPPORTS} supports, got {N}")
    if head.targets.dtype != torch.int64 or int(head.targets.min()) < 0 or \
            int(head.targets.max()) >= C:
        raise CacheFileError("invalid_cache", f"targets must be int64 class indices in [0, {C})")
    for name in ("text", "images", "captions"):
        t = getattr(head, name)
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise CacheFileError("invalid_cache", f"tensor {name!r} must be finite floats")
    for name in ("alpha", "beta", "gamma", "delta"):
        if not math.isfinite(getattr(head, name)):
            raise CacheFileError("invalid_cache", f"{name} must be finite")
    if not 0.0 <= head.delta <= 1.0:
        raise CacheFileError("invalid_cache", f"delta must be in [0, 1], got {head.delta}")
