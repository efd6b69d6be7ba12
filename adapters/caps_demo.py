"""The cache-classification demo (docs/METHODS.md §5, "Cache classification"): ``caps-24``.

24 classes ``"{color} {shape}"``; the target domain is shifted (outlined shapes on a dark, noisy
background: ``synthetic.render_shifted``). The support set holds CapsRecipe.support_per_class
shifted images per class, captioned by the ``caption`` demo adapter; the weights are searched on
CapsRecipe.val_per_class more. ``caps_scores`` draws fresh shifted images and scores zero-shot CLIP,
the image-only cache (delta = gamma = 0, Tip-Adapter-like), the caption-only cache and full CapS,
each variant's weights searched on the same validation images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

CACHE_ID = "caps-24"
CAPS_MARGIN = 0.10                 # target: full >= zero-shot + CAPS_MARGIN and >= image-only


@dataclass(frozen=True)
class CapsRecipe:
    support_per_class: int = 4
    val_per_class: int = 4
    views: int = 10
    seed: int = 501


CAPS_RECIPE = CapsRecipe()


def shifted_split(n: int, seed: int):
    """``n`` shifted-domain images of each of the 24 classes, deterministic in ``seed``."""
    from petserve.adapters.caps_build import Split
    from petserve.adapters.data.synthetic import CLASS_LABELS, make_class_scenes, render_shifted
    images, targets = [], []
    for c, label in enumerate(CLASS_LABELS):
        for j, scene in enumerate(make_class_scenes(label, n, seed)):
            images.append(render_shifted(scene, seed * 100_003 + 1000 * c + j))
            targets.append(c)
    return Split(images, targets)


def generation_captioner(model, caption_file, batch_size: int = 96):
    """Captions of images by the caption adapter in ``caption_file``, with the generation code the
    serving engine runs (adapters.generation; the engine's answers equal these, tests/test_engine)."""
    from petserve.adapters.adapter_file import load_adapter
    from petserve.adapters.backbone.model import RowInput
    from petserve.adapters.generation import GenerationRequest, answer_mixed
    from petserve.adapters.runtime.bank import SlotBank
    from petserve.adapters.training.evaluation import default_max_new_tokens
    bank = SlotBank(model, 1)
    bank.set(0, load_adapter(caption_file, model).compile(model))
    prompt = model.row_input("caption", "", None).ids

    def caption(images: list) -> list[str]:
        with torch.inference_mode():
            reqs = [(i, GenerationRequest(RowInput(prompt, model.vision.image_tokens([im])), 0,
                                          default_max_new_tokens("caption")))
                    for i, im in enumerate(images)]
            out = answer_mixed(model, bank, reqs, seed=0, batch_size=batch_size)
        return [model.decode_text(out[(i,)].tokens) for i in range(len(images))]
    return caption


def build_demo_cache(model, towers, caption_file, recipe: CapsRecipe = CAPS_RECIPE):
    """The caps-24 BuiltCache (adapters.caps_build) of ``recipe``."""
    from petserve.adapters.caps_build import build_cache
    from petserve.adapters.data.synthetic import CLASS_LABELS
    support = shifted_split(recipe.support_per_class, recipe.seed)
    val = shifted_split(recipe.val_per_class, recipe.seed + 1)
    with torch.inference_mode():
        return build_cache(model, towers, CLASS_LABELS, support,
                           generation_captioner(model, caption_file), val=val,
                           views=recipe.views, seed=recipe.seed)


@dataclass
class CapsScores:
    """Accuracy on fresh shifted-domain images of each variant, and the weights it used."""

    n_per_class: int
    accuracy: dict[str, float]
    weights: dict[str, dict[str, float]]
    captions: list[str]          # the captioner on the first test images (what it makes of them)

    def shortfalls(self) -> list[str]:
        a = self.accuracy
        out = [] if a["full"] >= a["zero_shot"] + CAPS_MARGIN else [
            f"full CapS {a['full']:.3f} < zero-shot {a['zero_shot']:.3f} + {CAPS_MARGIN}"]
        return out + ([] if a["full"] >= a["image_only"] else [
            f"full CapS {a['full']:.3f} < image-only cache {a['image_only']:.3f}"])


def caps_scores(assets, n: int = 20, seed: int = 9_000_501) -> CapsScores:
    """Every variant (rebuilt from the recipe, so the searches see the validation images the
    shipped file's did; its full head is checked against the shipped file) on ``n`` fresh
    shifted images per class."""
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.cache_file import load_cache, towers_identity
    from petserve.adapters.caps_build import accuracy, image_features
    from petserve.adapters.clip_towers import load_towers
    from petserve.adapters.demo import single_thread
    model = build_backbone(assets.backbone_dir)
    towers = load_towers(assets.clip_text, model)
    with single_thread():
        built = build_demo_cache(model, towers, assets.adapters["caption"])
        shipped, _ = load_cache(assets.caches[CACHE_ID].read_bytes(), towers_identity(towers),
                                towers.cfg.projection_dim)
        if not torch.equal(shipped.images, built.head.images) or \
                (shipped.alpha, shipped.gamma) != (built.head.alpha, built.head.gamma):
            raise ValueError(f"{assets.caches[CACHE_ID]} is not what CAPS_RECIPE builds")
        test = shifted_split(n, seed)
        with torch.inference_mode():
            feats = image_features(model, towers, test.images)
            acc = {name: accuracy(h, feats, test.targets) for name, h in built.variants.items()}
        captions = generation_captioner(model, assets.adapters["caption"])(test.images[:4])
    weights = {name: {"alpha": h.alpha, "beta": h.beta, "gamma": h.gamma, "delta": h.delta}
               for name, h in built.variants.items()}
    return CapsScores(n, acc, weights, captions)


def recipe_spec() -> dict:
    return asdict(CAPS_RECIPE)
