"""Examples -> model inputs: prompt ids, target ids and visual tokens.

The vision encoder is frozen while adapters train, so its features are a pure function of the
pixels: :class:`FeatureCache` keys them by media *content* (sha1 of the image bytes or of the video
file / frame array) and encodes each distinct image once per run, in batches.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from petserve.adapters.backbone.model import RowInput, VLModel
from petserve.adapters.backbone.visual import VisualTokens
from petserve.adapters.data.records import DataError, Example

VIDEO_FRAMES = 8          # frames sampled uniformly per video (VL-Adapter's video setting)


def media_key(item) -> str:
    """Content hash of an image (PIL or path), a video path or a frame array."""
    h = hashlib.sha1()
    if isinstance(item, (str, Path)):
        try:
            h.update(Path(item).read_bytes())
        except OSError as e:
            raise DataError(f"{item}: cannot read media file ({e.strerror or e})") from None
    elif isinstance(item, np.ndarray):
        h.update(f"{item.shape}{item.dtype}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    else:                                               # PIL image
        h.update(f"{item.mode}{item.size}".encode())
        h.update(item.tobytes())
    return h.hexdigest()


def sample_frame_indices(total: int, num: int) -> list[int]:
    """``num`` indices spread uniformly over ``total`` frames (the centre of each segment)."""
    return [((2 * i + 1) * total) // (2 * num) for i in range(num)]


def read_video_frames(path: Path, num: int = VIDEO_FRAMES) -> np.ndarray:
    """(num, H, W, 3) uint8 frames of a video file, sampled uniformly (decodes the whole clip:
    meant for the short clips of training sets)."""
    import av
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise DataError(f"{path}: cannot decode video ({e})") from None
    if not frames:
        raise DataError(f"{path}: the video has no frames")
    return np.stack([frames[i] for i in sample_frame_indices(len(frames), num)])


def as_frames(frames, num: int = VIDEO_FRAMES) -> np.ndarray:
    if isinstance(frames, (str, Path)):
        return read_video_frames(Path(frames), num)
    frames = np.asarray(frames)
    return frames[sample_frame_indices(len(frames), num)]


class FeatureCache:
    """Frozen-vision visual tokens by media content. Contract: the model's vision encoder does not
    change while the cache lives (true for adapter training; not for pretraining)."""

    def __init__(self, model: VLModel, encode_batch: int = 64):
        if model.vision is None:
            raise ValueError("this backbone takes precomputed features, not pixels; "
                             "training from images needs a backbone with a CLIP vision encoder")
        self.model, self.encode_batch = model, encode_batch
        self._tokens: dict[str, VisualTokens] = {}
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
            parts = [self._tokens[k] for k in ks]
            if not parts:
                out.append(None)
            elif ex.frames is not None:
                out.append(parts[0])
            else:
                out.append(VisualTokens.concat([_with_order(p, i) for i, p in enumerate(parts)]))
        return out

    def _keys(self, ex: Example) -> list[str]:
        if ex.frames is not None:
            return ["video:" + media_key(ex.frames)]
        return ["image:" + media_key(im) for im in ex.images]

    def _encode_missing(self, examples: list[Example], keys: list[list[str]]) -> None:
        images, image_keys = [], []
        for ex, ks in zip(examples, keys):
            for i, k in enumerate(ks):
                if k in self._tokens or k in image_keys:
                    continue
                if k.startswith("video:"):
                    frames = as_frames(ex.frames)
                    self._tokens[k] = _cpu(self.model.vision.video_tokens(list(frames)))
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
            self._tokens[k] = _cpu(VisualTokens(tokens.feats[part], tokens.boxes[part],
                                                torch.zeros(per, dtype=torch.long)))
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

    def __init__(self, model: VLModel, examples: list[Example], cache: FeatureCache, task: str):
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
