"""Full training of the tiny base model (the embedded default) on synthetic shapes scenes.

The base must see colours, shapes, counts and positions, yet must NOT already answer the demo tasks
(docs/METHODS.md, "Demo tasks"), so that each demo adapter has something to add. Two stages:

1. **Vision** (the tiny CLIP ViT alone): dense targets on every patch — the colour and shape class
   of the object owning it, whether an object's centre falls in it — and the object count on CLS.
   A ViT trained from scratch on image-level answers learns shapes very slowly; 49 labels an image
   and a PCA-whitened patch embedding (the ``hlb-CIFAR10`` trick) make it learn them in minutes.
2. **Language** (language model + visual embedding, CLIP frozen): *grounding* questions under the
   ``gqa:`` prefix, with answer formats the demo tasks never use::

       what objects are there?          -> red circle , blue square   (left to right)
       is there a green triangle?       -> yes / no   (negatives share a colour or a shape)
       are there three objects?         -> yes / no
       what is left of the red circle?  -> blue square   (its neighbour; also "right of")
       is the color of the circle red?  -> yes / no   (also "is the red shape a circle?")
       how many objects are there?      -> three objects

With ``french`` > 0 that share of the questions is asked and answered in the demo's second
language (``quels objets y a-t-il ?`` -> ``cercle rouge , carre bleu``): the base is bilingual the
way the multilingual models composable SFT starts from are (docs/METHODS.md, "Composition"), while
every demo task, and every task adapter, stays English.

The demo tasks differ in prefix (``vqa:`` / ``caption:``), wording and output format (one colour
word, one shape word, a number word, a caption with articles), so the bare backbone fails them and
each adapter only learns its task's question and answer format.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from petserve.adapters.backbone.model import RowInput, VLModel
from petserve.adapters.backbone.visual import VisualTokens
from petserve.adapters.data.synthetic import COLORS, NUMBER_WORDS, SHAPES, Shape, object_name, word
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.training.scene_pool import MAX_OBJECTS, ScenePool, make_scene_pool
from petserve.adapters.training.schedule import batch_indices, lr_at, warmup_steps

PRETRAIN_TASK = "gqa"
QUESTION_MIX = (("list", 0.25), ("exists", 0.2), ("count", 0.1), ("how_many", 0.1),
                ("relation", 0.15), ("attribute", 0.2))


@dataclass(frozen=True)
class PretrainConfig:
    pool_size: int = 8000           # distinct scenes rendered once
    vision_steps: int = 1800
    vision_lr: float = 3e-3
    steps: int = 800                # language stage
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    french: float = 0.0             # share of grounding questions in French


# ---- grounding questions -------------------------------------------------------------------
# (question templates, answers yes / no) per language
_WORDING = {
    "en": {"list": "what objects are there?", "exists": "is there a {}?",
           "count": "are there {} objects?", "relation": "what is {} of the {}?",
           "color": "is the color of the {} {}?", "shape": "is the {} shape a {}?",
           "how_many": "how many objects are there?", "objects": ("object", "objects"),
           "left": "left", "right": "right", "yes": "yes", "no": "no"},
    "fr": {"list": "quels objets y a-t-il ?", "exists": "y a-t-il un {} ?",
           "count": "y a-t-il {} objets ?", "relation": "qu'est-ce qui est a {} du {} ?",
           "color": "la couleur du {} est {} ?", "shape": "la forme {} est un {} ?",
           "how_many": "combien d'objets y a-t-il ?", "objects": ("objet", "objets"),
           "left": "gauche", "right": "droite", "yes": "oui", "no": "non"},
}


def left_to_right(scene):
    return sorted(scene.shapes, key=lambda s: (s.center[0], s.center[1]))


def grounding_question(scene, rng: random.Random, lang: str = "en") -> tuple[str, str]:
    """One (question, answer) pair about ``scene`` in ``lang`` (formats in the module docstring)."""
    w = _WORDING[lang]
    kinds, weights = zip(*QUESTION_MIX)
    kind = rng.choices(kinds, weights)[0]
    if kind in ("relation", "attribute"):
        pair = (_relation if kind == "relation" else _attribute)(scene, rng, lang)
        if pair is not None:
            return pair
        kind = "list"
    if kind == "exists":
        return _exists(scene, rng, lang)
    if kind == "how_many":
        n = len(scene.shapes)
        return w["how_many"], f"{word(NUMBER_WORDS[n - 1], lang)} {w['objects'][n > 1]}"
    if kind == "count":
        n = len(scene.shapes)
        asked = n if rng.random() < 0.5 else rng.choice([k for k in range(1, 6) if k != n])
        return (w["count"].format(word(NUMBER_WORDS[asked - 1], lang)),
                w["yes"] if asked == n else w["no"])
    return w["list"], " , ".join(object_name(s, lang) for s in left_to_right(scene))


def _exists(scene, rng: random.Random, lang: str) -> tuple[str, str]:
    w = _WORDING[lang]
    present = sorted({(s.color, s.shape) for s in scene.shapes})
    color, shape = rng.choice(present)
    if rng.random() >= 0.5:
        while (color, shape) in present:    # a near miss: keep the colour or the shape
            if rng.random() < 0.5:
                color = rng.choice(COLORS)
            else:
                shape = rng.choice(SHAPES)
    name = object_name(Shape(shape, color, 0, 0, 1), lang)
    return w["exists"].format(name), w["yes"] if (color, shape) in present else w["no"]


def _attribute(scene, rng: random.Random, lang: str) -> tuple[str, str] | None:
    """Is the colour of the (only) circle red? / Is the (only) red shape a circle? -> yes / no."""
    w = _WORDING[lang]
    asks = [("color", s) for s in scene.shapes if [t.shape for t in scene.shapes].count(s.shape) == 1]
    asks += [("shape", s) for s in scene.shapes if [t.color for t in scene.shapes].count(s.color) == 1]
    if not asks:
        return None
    what, s = rng.choice(asks)
    yes = rng.random() < 0.5
    if what == "color":
        asked = s.color if yes else rng.choice([c for c in COLORS if c != s.color])
        question = w["color"].format(word(s.shape, lang), word(asked, lang))
    else:
        asked = s.shape if yes else rng.choice([k for k in SHAPES if k != s.shape])
        question = w["shape"].format(word(s.color, lang), word(asked, lang))
    return question, w["yes"] if yes else w["no"]


def _relation(scene, rng: random.Random, lang: str) -> tuple[str, str] | None:
    names = [object_name(s, lang) for s in left_to_right(scene)]
    unique = [i for i, n in enumerate(names) if names.count(n) == 1]
    options = [(i, side) for i in unique for side, j in (("left", i - 1), ("right", i + 1))
               if 0 <= j < len(names)]
    if not options:
        return None
    i, side = rng.choice(options)
    question = _WORDING[lang]["relation"].format(_WORDING[lang][side], names[i])
    return question, names[i - 1 if side == "left" else i + 1]


# ---- the base model ------------------------------------------------------------------------
def build_base(preset_name: str = "tiny", vision: dict | None = None, seed: int = 0) -> VLModel:
    """A freshly initialised backbone of a preset, its CLIP config overridden by ``vision``
    (e.g. ``{"image_size": 56, "patch_size": 8}``), frozen and in eval mode."""
    from petserve.adapters.backbone.config import preset
    from petserve.adapters.backbone.loading import init_weights
    from petserve.adapters.backbone.tokenizer import load_tokenizer
    cfg = preset(preset_name)
    if vision:
        clip = {**cfg.vision.clip, **vision}
        cfg = replace(cfg, vision=replace(cfg.vision, clip=clip, feat_dim=clip["hidden_size"],
                                          image_size=clip["image_size"]))
    torch.manual_seed(seed)
    model = VLModel(cfg, load_tokenizer(None, cfg.lm.family))
    init_weights(model)
    return model.requires_grad_(False).eval()


def pretrain_backbone(model: VLModel, pc: PretrainConfig | None = None,
                      progress: bool = True) -> dict[str, list[float]]:
    """Both stages, in place; returns their losses. The model ends frozen, in eval mode, with a
    stale ``fingerprint`` until it is saved and rebuilt (``save_backbone`` + ``build_backbone``)."""
    pc = pc or PretrainConfig()
    torch.manual_seed(pc.seed)
    pool = make_scene_pool(model, pc.pool_size, pc.seed, progress)
    whiten_patch_embedding(model, pool)
    vision = pretrain_vision(model, pool, pc, progress)
    language = pretrain_language(model, pool, pc, progress)
    model.requires_grad_(False).eval()
    return {"vision": vision, "language": language}


def _patch_conv(model: VLModel) -> torch.nn.Conv2d:
    return model.vision.clip.embeddings.patch_embedding


@torch.no_grad()
def whiten_patch_embedding(model: VLModel, pool: ScenePool, eps: float = 1e-2,
                           max_images: int = 2000) -> None:
    """Set the ViT's patch embedding to the top principal components of the pool's patches,
    whitened (``W = E^T / sqrt(lambda + eps)``): decorrelated, unit-variance inputs from step 0."""
    conv = _patch_conv(model)
    p, D = conv.kernel_size[0], conv.out_channels
    x = pool.pixels(model, slice(0, max_images))
    n, C, S, _ = x.shape
    g = S // p
    patches = x.reshape(n, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * p * p)
    patches = patches.double()
    if patches.shape[0] < 2 * patches.shape[1]:
        raise ValueError("too few patches to whiten the patch embedding; use a larger pool")
    evals, evecs = torch.linalg.eigh(torch.cov(patches.T))
    evals, evecs = evals.flip(0)[:D].clamp_min(0), evecs.flip(1)[:, :D]
    if evecs.shape[1] < D:              # fewer pixel dims than channels: keep the rest as drawn
        D = evecs.shape[1]
    conv.weight[:D] = (evecs / torch.sqrt(evals + eps)).T.reshape(D, C, p, p).to(conv.weight)


class PatchHeads(torch.nn.Module):
    """Linear read-outs used only while the vision encoder pre-trains (then dropped)."""

    def __init__(self, width: int):
        super().__init__()
        self.color = torch.nn.Linear(width, len(COLORS) + 1)
        self.shape = torch.nn.Linear(width, len(SHAPES) + 1)
        self.centre = torch.nn.Linear(width, 1)
        self.count = torch.nn.Linear(width, MAX_OBJECTS)

    def loss(self, feats: torch.Tensor, color, shape, centre, count) -> torch.Tensor:
        """feats (n, 1 + P, f): CLS predicts the count, each patch its labels (n, P)."""
        cls, patches = feats[:, 0], feats[:, 1:]
        return (F.cross_entropy(self.color(patches).flatten(0, 1), color.flatten())
                + F.cross_entropy(self.shape(patches).flatten(0, 1), shape.flatten())
                + F.binary_cross_entropy_with_logits(self.centre(patches).squeeze(-1), centre)
                + F.cross_entropy(self.count(cls), count))


def clip_features(model: VLModel, pixels: torch.Tensor) -> torch.Tensor:
    """(n, 1 + P, f) post-layernormed CLIP features, as VisionEncoder.encode (keeps autograd)."""
    clip = model.vision.clip
    return clip.post_layernorm(clip(pixels.to(model.dtype)))


def _flip(model: VLModel, pool: ScenePool, idx: list[int], flip: torch.Tensor):
    """The batch ``idx`` with the images of ``flip`` mirrored left-right (labels too)."""
    g = round(pool.color.shape[1] ** 0.5)
    pixels = pool.pixels(model, idx)
    pixels[flip] = pixels[flip].flip(-1)
    labels = []
    for t in (pool.color[idx], pool.shape[idx], pool.centre[idx]):
        t = t.clone()
        t[flip] = t[flip].view(-1, g, g).flip(-1).reshape(-1, g * g)
        labels.append(t)
    return pixels, labels


def pretrain_vision(model: VLModel, pool: ScenePool, pc: PretrainConfig,
                    progress: bool = True) -> list[float]:
    """Stage 1: the CLIP ViT with dense per-patch targets (random left-right flips)."""
    clip, heads = model.vision.clip, PatchHeads(model.vision.cfg.feat_dim)
    clip.requires_grad_(True)
    params = list(clip.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=pc.vision_lr, eps=1e-6, weight_decay=0.01)
    warm, losses = warmup_steps(pc.vision_steps, 0.05), []
    gen = torch.Generator().manual_seed(pc.seed)
    bar = tqdm(range(pc.vision_steps), disable=not progress, desc="pretrain vision", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, pc.vision_steps, warm, pc.vision_lr)
        idx = batch_indices(step, len(pool), pc.batch_size, pc.seed)
        flip = torch.rand(len(idx), generator=gen) < 0.5
        pixels, (color, shape, centre) = _flip(model, pool, idx, flip)
        loss = heads.loss(clip_features(model, pixels), color, shape, centre, pool.count[idx])
        _step(opt, params, loss)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    clip.requires_grad_(False)
    return losses


def _step(opt, params, loss, max_norm: float = 1.0) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def pretrain_language(model: VLModel, pool: ScenePool, pc: PretrainConfig,
                      progress: bool = True) -> list[float]:
    """Stage 2: language model + visual embedding on grounding questions, CLIP frozen (its
    features of the pool are computed once)."""
    with torch.no_grad():
        feats = torch.cat([clip_features(model, pool.pixels(model, slice(i, i + 256)))
                           for i in range(0, len(pool), 256)])
    modules = (model.lm, model.visual_embed)
    for m in modules:
        m.requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=pc.lr, eps=1e-6)
    warm, losses = warmup_steps(pc.steps, 0.05), []
    bar = tqdm(range(pc.steps), disable=not progress, desc="pretrain language", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, pc.steps, warm, pc.lr)
        loss = _language_loss(model, pool, feats, step, pc)
        _step(opt, params, loss)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def _language_loss(model: VLModel, pool: ScenePool, feats: torch.Tensor, step: int,
                   pc: PretrainConfig) -> torch.Tensor:
    rng = random.Random(f"questions-{pc.seed}-{step}")
    boxes = model.vision.boxes
    order = torch.zeros(feats.shape[1], dtype=torch.long, device=feats.device)
    rows, targets = [], []
    for i in batch_indices(step, len(pool), pc.batch_size, pc.seed + 1):
        lang = "fr" if pc.french and rng.random() < pc.french else "en"
        question, answer = grounding_question(pool.scenes[i], rng, lang)
        rows.append(RowInput(model.row_input(PRETRAIN_TASK, question, None).ids,
                             VisualTokens(feats[i], boxes, order)))
        targets.append(model.target_ids(answer))
    return model.loss(rows, targets, StepContext.backbone_only(len(rows), model.device))
