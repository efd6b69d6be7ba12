"""A pool of rendered demo scenes with model-ready pixels and dense per-patch labels (pretraining).

Rendering, resizing and labelling cost more than a tiny model's training step, so the pool is made
once and pretraining draws batches from it. Labels are read off the rendered image itself: the
object owning most of each patch (its colour and shape class; 0 = background), the patch holding
each object's centre, and the object count.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from petserve.adapters.backbone.model import VLModel
from petserve.adapters.data.synthetic import BACKGROUND, COLORS, SHAPES, Scene, render_scene, sample_scene

COLOR_INDEX = {c: i + 1 for i, c in enumerate(COLORS)}       # 0 = background
SHAPE_INDEX = {s: i + 1 for i, s in enumerate(SHAPES)}
MAX_OBJECTS = 5


@dataclass
class ScenePool:
    scenes: list[Scene]
    images: torch.Tensor        # (n, 3, S, S) uint8: resized as VisionEncoder.pixels does
    color: torch.Tensor         # (n, P) int64 colour class of each patch
    shape: torch.Tensor         # (n, P) int64 shape class of each patch
    centre: torch.Tensor        # (n, P) float32: 1 where an object's centre falls
    count: torch.Tensor         # (n,) int64: number of objects - 1

    def __len__(self) -> int:
        return len(self.scenes)

    def pixels(self, model: VLModel, idx) -> torch.Tensor:
        """Normalised model input of the images ``idx`` (1/510 quantisation step: 4x less
        memory than fp32 for an error far below the images' own 8-bit steps)."""
        x = self.images[idx].to(model.vision.mean.device).float() / 255
        return ((x - model.vision.mean) / model.vision.std).to(model.dtype)


def resized_images(model: VLModel, images: list) -> torch.Tensor:
    """(n, 3, S, S) floats in [0, 1]: the resize and crop of ``model.vision.pixels`` for same-size
    images, done in one batched call (the per-image path costs ~15 ms an image on CPU)."""
    S = model.vision.cfg.image_size
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    if (h, w) != (S, S):
        scale = S / min(h, w)
        x = F.interpolate(x, size=(max(S, round(h * scale)), max(S, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - S) // 2, (x.shape[-1] - S) // 2
        x = x[..., top:top + S, left:left + S].clamp(0, 1)
    return x


def patch_labels(scene: Scene, image, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(colour, shape, centre) per patch of a ``grid`` x ``grid`` layout, row-major like the ViT's
    patches. A patch belongs to the object covering most of it, if that covers a quarter or more."""
    rgb = np.asarray(image)
    fg = (rgb != np.array(BACKGROUND, dtype=np.uint8)).any(-1)
    owner = np.zeros(fg.shape, dtype=np.int64)                # 0 = background, k + 1 = object k
    for k, s in enumerate(scene.shapes):                       # boxes never overlap
        box = (slice(s.y, s.y + s.size), slice(s.x, s.x + s.size))
        owner[box][fg[box]] = k + 1
    cell = rgb.shape[0] // grid
    patch = (np.arange(grid * cell) // cell)
    patch_id = patch[:, None] * grid + patch[None, :]
    n = len(scene.shapes) + 1
    counts = np.bincount((patch_id * n + owner[:grid * cell, :grid * cell]).ravel(),
                         minlength=grid * grid * n).reshape(grid * grid, n)
    major = counts[:, 1:].argmax(1) + 1
    major[counts[:, 1:].max(1) < cell * cell // 4] = 0
    colors = np.array([0] + [COLOR_INDEX[s.color] for s in scene.shapes])
    shapes = np.array([0] + [SHAPE_INDEX[s.shape] for s in scene.shapes])
    centre = np.zeros(grid * grid, dtype=np.float32)
    for s in scene.shapes:
        cx, cy = s.center
        centre[min(cy // cell, grid - 1) * grid + min(cx // cell, grid - 1)] = 1.0
    return colors[major], shapes[major], centre


def make_scene_pool(model: VLModel, n: int, seed: int, progress: bool = True,
                    chunk: int = 256) -> ScenePool:
    """``n`` scenes of 1-5 objects (deterministic in ``seed``) with pixels and labels."""
    rng = random.Random(f"scene-pool-{seed}")
    grid = model.vision.cfg.image_size // model.vision.cfg.clip["patch_size"]
    scenes, pixels, labels = [], [], []   # pixels: uint8 chunks
    for start in tqdm(range(0, n, chunk), disable=not progress, desc="render scenes", leave=False):
        part = [sample_scene(rng, rng.randint(1, MAX_OBJECTS)) for _ in range(min(chunk, n - start))]
        images = [render_scene(s) for s in part]
        pixels.append((resized_images(model, images) * 255).round().to(torch.uint8))
        labels += [patch_labels(s, im, grid) for s, im in zip(part, images)]
        scenes += part
    color, shape, centre = (torch.from_numpy(np.stack(x)) for x in zip(*labels))
    count = torch.tensor([len(s.shapes) - 1 for s in scenes])
    return ScenePool(scenes, torch.cat(pixels), color, shape, centre, count)
