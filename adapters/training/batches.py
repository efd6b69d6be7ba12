"""Examples -> model inputs: prompt ids, target ids and visual tokens.

The vision encoder is frozen while adapters train, so its features are a pure function of the
pixels: :class:`ExampleFeatures` keeps them in the one FeatureCache
(adapters/backbone/feature_cache.py, the serving engine's too), keyed by media content, and
encodes each distinct image once per run, in batches. Videos are read and sampled by the one
decoder (adapters/data/video.py), as in serving.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from petserve.adapters.backbone.feature_cache import FeatureCache, file_key, frames_key, images_key
from petserve.adapters.backbone.model import RowInput, VLModel
from petserve.adapters.backbone.visual import VisualTokens
from petserve.adapters.data.records import DataError, Example
from petserve.adapters.data.video import VIDEO_FRAMES, VideoError, read_video, sample_frames


def media_key(item) -> str:
    """Content key of an image (PIL or path), a video path or a frame array."""
    if isinstance(item, (str, Path)):
        try:
            return file_key(item)
        except OSError as e:
            raise DataError(f"{item}: cannot read media file ({e.strerror or e})") from None
    if isinstance(item, np.ndarray):
        return frames_key(item)
    return images_key([item])


def as_frames(frames, num: int = VIDEO_FRAMES) -> np.ndarray:
    """(num, H, W, 3) frames of a video file or a frame array, sampled as serving samples them."""
    if isinstance(frames, (str, Path)):
        try:
            return read_video(frames, num)
        except VideoError as e:
            raise DataError(f"{frames}: cannot decode video ({e})") from None
    return sample_frames(np.asarray(frames), num)


class ExampleFeatures:
    """Frozen-vision visual tokens of training examples. Contract: the model's vision encoder does
    not change while it lives (true for adapter training; not for pretraining)."""

    def __init__(self, model: VLModel, encode_batch: int = 64):
        if model.vision is None:
            raise ValueError("this backbone takes precomputed features, not pixels; "
                             "training from images needs a backbone with a CLIP vision encoder")
        self.model, self.encode_batch = model, encode_batch
        self._tokens = FeatureCache(capacity=None)      # a run's media, on the CPU
        self.encoded = 0                                # distinct media encoded so far

    def __len__(self) -> int:
        return len(self._tokens)

    def example_tokens(self, examples: list[Example]) -> list[VisualTokens | None]:
        """Visual tokens of each example (None when it has no media): images with image order
        0 / 1 (NLVR2), videos one token per frame. Missing entries are encoded in batches."""
        keys = [self._keys(ex) for ex in examples]
        self._encode_missing(examples, keys)
        out = []
        for ex, ks in zip(examples, keys):
            parts = [self._tokens.get(k) for k in ks]
            if not parts:
                out.append(None)
            elif ex.frames is not None:
                out.append(parts[0])
            else:
                out.append(VisualTokens.concat([_with_order(p, i) for i, p in enumerate(parts)]))
        return out

    def _keys(self, ex: Example) -> list[str]:
        if ex.frames is not None:
            return [media_key(ex.frames)]
        return [media_key(im) for im in ex.images]

    def _encode_missing(self, examples: list[Example], keys: list[list[str]]) -> None:
        images, image_keys = [], []
        for ex, ks in zip(examples, keys):
            for i, k in enumerate(ks):
                if k in self._tokens or k in image_keys:
                    continue
                if ex.frames is not None:
                    frames = as_frames(ex.frames)
                    self._tokens.put(k, _cpu(self.model.vision.video_tokens(list(frames))))
                    self.encoded += 1
                else:
                    images.append(_load_image(ex, i))
                    image_keys.append(k)
        for start in range(0, len(images), self.encode_batch):
            chunk = images[start:start + self.encode_batch]
            self._store_images(image_keys[start:start + len(chunk)], chunk)

    def _store_images(self, keys: list[str], images: list) -> None:
        tokens = self.model.vision.image_tokens(images)  # n images, order 0..n-1
        per = tokens.feats.shape[0] // len(images)
        for i, k in enumerate(keys):
            part = slice(i * per, (i + 1) * per)
            self._tokens.put(k, _cpu(VisualTokens(tokens.feats[part], tokens.boxes[part],
                                                  torch.zeros(per, dtype=torch.long))))
            self.encoded += 1


def _load_image(ex: Example, i: int):
    return ex.load_images()[i]


def _with_order(t: VisualTokens, order: int) -> VisualTokens:
    return VisualTokens(t.feats, t.boxes, torch.full_like(t.order, order))


def _cpu(t: VisualTokens) -> VisualTokens:
    return VisualTokens(t.feats.detach().cpu(), t.boxes.detach().cpu(), t.order.detach().cpu())


@dataclass
class EncodedText:
    prompt_ids: list[int]
    target_ids: list[int]


class BatchBuilder:
    """Tokenizes every example once; ``batch(indices)`` -> (rows, target ids) for model.loss."""

    def __init__(self, model: VLModel, examples: list[Example], cache: ExampleFeatures, task: str):
        self.model, self.examples, self.cache, self.task = model, examples, cache, task
        self.text = [EncodedText(model.row_input(task, ex.text, None).ids, model.target_ids(ex.target))
                     for ex in examples]

    def rows(self, indices: list[int]) -> list[RowInput]:
        exs = [self.examples[i] for i in indices]
        visual = self.cache.example_tokens(exs)
        return [RowInput(self.text[i].prompt_ids, _to(v, self.model)) for i, v in zip(indices, visual)]

    def batch(self, indices: list[int]) -> tuple[list[RowInput], list[list[int]]]:
        return self.rows(indices), [self.text[i].target_ids for i in indices]


def _to(t: VisualTokens | None, model: VLModel) -> VisualTokens | None:
    if t is None:
        return None
    return VisualTokens(t.feats.to(model.device, model.dtype), t.boxes.to(model.device, model.dtype),
                        t.order.to(model.device))
