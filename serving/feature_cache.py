"""FeatureCache: visual tokens keyed by the content of the pixels, so an image asked of many adapters
is encoded once (the vision encoder is frozen and shared by every adapter; per-adapter visual
embeddings are applied later, inside the model).

Keys are sha256 digests of the raw content plus its shape, prefixed by what it is (``img:``,
``vid:``, ``feat:``), so two different inputs never share an entry unless their bytes are equal.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

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


def frames_key(frames: np.ndarray) -> str:
    return _digest("vid", _array_parts(frames))


def features_key(features: np.ndarray, boxes: np.ndarray | None) -> str:
    parts = _array_parts(features) + ([] if boxes is None else _array_parts(boxes))
    return _digest("feat", parts)


class FeatureCache:
    """LRU of ``capacity`` VisualTokens (on the model's device); counts hits and misses."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.hits = self.misses = 0
        self._items: OrderedDict[str, VisualTokens] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: str, compute: Callable[[], VisualTokens]) -> VisualTokens:
        """The cached tokens of ``key``, or ``compute()`` stored under it. ``compute`` runs outside
        the lock (it is the expensive vision encoder)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return hit
            self.misses += 1
        tokens = compute()
        if self.capacity > 0:
            with self._lock:
                self._items[key] = tokens
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
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
    request is text only. Inputs are assumed validated (the engine's submit does it)."""
    if features is not None:
        t = feature_tokens(features, boxes)
        return VisualTokens(t.feats.to(model.device, model.dtype), t.boxes.to(model.device),
                            t.order.to(model.device))
    if frames is not None:
        return model.vision.video_tokens(list(frames))
    if images:
        return model.vision.image_tokens(images)
    return None
