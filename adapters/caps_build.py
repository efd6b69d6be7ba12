"""Building a CapS cache adapter (adapters/caps.py) from a support set: what ``petserve
build-cache`` and the ``caps-24`` demo run (docs/METHODS.md §3.9, §5).

1. class text embeddings: every label in every prompt template, embedded and normalised, averaged
   over the templates and normalised again (the seed's prompt ensemble);
2. support image features: the normalised mean of ``views`` augmented views of each image (view 0
   the image itself, the others a random resized crop, flipped half the time), as the seed's
   ``augment_epoch`` averages its cache keys;
3. support caption features: the CLIP text embedding of each support image's caption (the caller
   captions them: the CLI through the serving engine, the demo through the same generation code);
4. alpha, beta, gamma, delta searched on a validation split (``caps.search_weights``), for the full
   head and for the three reduced variants the demo scores beside it.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from petserve.adapters.caps import CacheHead, SearchGrid, logits, search_weights

DEFAULT_TEMPLATES = ("a {}",)
CROP_SCALE = (0.5, 1.0)             # area kept by a random resized crop
VARIANTS = ("zero_shot", "image_only", "caption_only", "full")
DEFAULT_GRID = SearchGrid()


def augmented_views(image: Image.Image, views: int, rng: random.Random) -> list[Image.Image]:
    """``views`` views of ``image``: itself, then random resized crops (area CROP_SCALE, aspect
    3/4-4/3, resized back), each flipped left-right with probability 1/2."""
    out, (w, h) = [image], image.size
    for _ in range(views - 1):
        area = rng.uniform(*CROP_SCALE) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw = max(1, min(w, round((area * aspect) ** 0.5)))
        ch = max(1, min(h, round((area / aspect) ** 0.5)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        view = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        out.append(view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view)
    return out


@torch.no_grad()
def image_features(model, towers, images: Sequence[Image.Image], views: int = 1, seed: int = 0,
                   batch: int = 128) -> torch.Tensor:
    """(n, D) normalised CLIP image embeddings; with ``views`` > 1 each the normalised mean of
    that many augmented views (deterministic in ``seed``)."""
    rng = random.Random(seed)
    flat = [v for im in images for v in (augmented_views(im, views, rng) if views > 1 else [im])]
    cls = torch.cat([model.vision.encode(flat[i:i + batch])[:, 0]
                     for i in range(0, len(flat), batch)])
    emb = towers.image_embeds(cls).reshape(len(images), max(1, views), -1)
    return F.normalize(emb.mean(1), dim=-1)


@torch.no_grad()
def class_embeddings(towers, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
                     ) -> torch.Tensor:
    """(C, D) prompt-ensembled class text embeddings."""
    emb = towers.text_embeds([t.format(label) for label in labels for t in templates])
    return F.normalize(emb.reshape(len(labels), len(templates), -1).mean(1), dim=-1)


@dataclass
class Split:
    """Images with their class indices."""

    images: list
    targets: list[int]


def split_validation(support: Split, per_class: int) -> tuple[Split, Split]:
    """(cache part, validation part): the last ``per_class`` images of every class held out.
    ValueError when a class would keep no support image."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(support.targets):
        by_class.setdefault(t, []).append(i)
    short = [c for c, idx in by_class.items() if len(idx) <= per_class]
    if short:
        raise ValueError(f"class {short[0]} has {len(by_class[short[0]])} support images: hold "
                         f"{per_class} per class out for validation and at least one must stay")
    held = {i for idx in by_class.values() for i in idx[-per_class:]}
    keep = [i for i in range(len(support.targets)) if i not in held]
    pick = (lambda idx: Split([support.images[i] for i in idx], [support.targets[i] for i in idx]))
    return pick(keep), pick(sorted(held))


@dataclass
class BuiltCache:
    """The full head (what the adapter file holds), every variant's head and validation accuracy."""

    head: CacheHead
    variants: dict[str, CacheHead]
    validation: dict[str, float]


def build_cache(model, towers, labels: Sequence[str], support: Split,
                captioner: Callable[[list], list[str]], val: Split | None = None,
                val_per_class: int = 1, views: int = 10,
                templates: Sequence[str] = DEFAULT_TEMPLATES, grid: SearchGrid = DEFAULT_GRID,
                seed: int = 0) -> BuiltCache:
    """The CapS head of ``support`` (images, class indices into ``labels``). ``captioner`` maps a
    list of images to their captions. Without ``val``, ``val_per_class`` images of each class are
    held out for the search; the head finally keeps every support image, with the weights found."""
    labels = list(labels)
    text = class_embeddings(towers, labels, templates)
    captions = captioner(list(support.images))
    imgs = image_features(model, towers, support.images, views, seed)
    caps = F.normalize(towers.text_embeds(captions), dim=-1)
    full = CacheHead(labels, text, imgs, caps, torch.tensor(support.targets, dtype=torch.int64))
    if val is None:
        part, val = split_validation(support, val_per_class)
        keep = [i for i, im in enumerate(support.images) if any(im is p for p in part.images)]
        searched_on = CacheHead(labels, text, imgs[keep], caps[keep], full.targets[keep])
    else:
        searched_on = full
    val_f = image_features(model, towers, val.images)
    val_t = torch.tensor(val.targets)
    variants, accuracy = {}, {}
    zero = searched_on.with_weights(0.0, 1.0, 0.0, 0.0)
    accuracy["zero_shot"] = float((logits(val_f, zero).argmax(-1) == val_t).float().mean())
    variants["zero_shot"] = full.with_weights(0.0, 1.0, 0.0, 0.0)
    for name, kwargs in (("image_only", {"image_only": True}),
                         ("caption_only", {"caption_only": True}), ("full", {})):
        found, acc = search_weights(searched_on, val_f, val_t, grid, **kwargs)
        variants[name] = full.with_weights(found.alpha, found.beta, found.gamma, found.delta)
        accuracy[name] = acc
    return BuiltCache(variants["full"], variants, accuracy)


def accuracy(head: CacheHead, features: torch.Tensor, targets: Sequence[int]) -> float:
    """Top-1 accuracy of ``head`` on normalised image features."""
    pred = logits(features, head).argmax(-1)
    return float((pred == torch.as_tensor(list(targets))).float().mean())
