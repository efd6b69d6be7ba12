"""FeatureCache: visual tokens keyed by the content of the pixels, so an image asked of many adapters
is encoded once (the vision encoder is frozen and shared by every adapter; per-adapter visual
embeddings are applied later, inside the model). The one feature cache: the serving engine and the
trainer (adapters/training/batches.py) both keep their visual tokens here.

Keys are sha256 digests of the raw content plus its shape, prefixed by what it is (``img:``,
``vid:``, ``feat:``, ``file:``), so two different inputs never share an entry unless their bytes
are equal.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from petserve.adapters.backbone.visual import VisualTokens, feature_tokens


def _digest(prefix: str, parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))   # length-prefixed: no two splits hash alike
        h.update(p)
    return f"{prefix}:{h.hexdigest()}"


def _array_parts(a: np.ndarray) -> list[bytes]:
    a = np.ascontiguousarray(a)
    return [f"{a.dtype.str}{a.shape}".encode(), a.tobytes()]


def images_key(images: list) -> str:
    """Key of 1-2 images: each image's RGB bytes and size, in order. ``images`` are PIL images
    (already RGB) or (H, W, 3) uint8 arrays."""
    parts = []
    for im in images:
        if hasattr(im, "tobytes") and hasattr(im, "size") and hasattr(im, "mode"):
            parts += [f"{im.mode}{im.size}".encode(), im.tobytes()]
        else:
            parts += _array_parts(np.asarray(im))
    return _digest("img", parts)


def file_key(path) -> str:
    """Key of a media file by its bytes (training sets name their videos by path). OSError when
    it cannot be read."""
    return _digest("file", [Path(path).read_bytes()])


def frames_key(frames: np.ndarray) -> str:
    return _digest("vid", _array_parts(frames))


def features_key(features: np.ndarray, boxes: np.ndarray | None) -> str:
    parts = _array_parts(features) + ([] if boxes is None else _array_parts(boxes))
    return _digest("feat", parts)


class FeatureCache:
    """LRU of ``capacity`` VisualTokens (None: unbounded, for a training run); counts hits and
    misses. Thread-safe."""

    def __init__(self, capacity: int | None):
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: OrderedDict[str, VisualTokens] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> VisualTokens | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return hit

    def put(self, key: str, tokens: VisualTokens) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = tokens
            while self.capacity is not None and len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def get_or_compute(self, key: str, compute: Callable[[], VisualTokens]) -> VisualTokens:
        """The cached tokens of ``key``, or ``compute()`` stored under it. ``compute`` runs outside
        the lock (it is the expensive vision encoder)."""
        tokens = self.get(key)
        if tokens is None:
            tokens = compute()
            self.put(key, tokens)
        return tokens

    def __len__(self) -> int:
        return len(self._items)

    def counters(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "items": len(self._items),
                    "capacity": self.capacity}


def encode_visual(model, images: list, frames: np.ndarray | None, features: np.ndarray | None,
                  boxes: np.ndarray | None) -> VisualTokens | None:
    """A request's visual tokens on the model's device: features (N, f) as given, video frames
    (T, H, W, 3) -> one CLIP token per frame, 1-2 images -> every CLIP token of each; None when the
    request is text only. Inputs are trusted (admission, serving/schemas.py, checked them)."""
    if features is not None:
        t = feature_tokens(features, boxes)
        return VisualTokens(t.feats.to(model.device, model.dtype), t.boxes.to(model.device),
                            t.order.to(model.device))
    if frames is not None:
        return model.vision.video_tokens(list(frames))
    if images:
        return model.vision.image_tokens(images)
    return None
