"""LiT-style training of the embedded default's text tower (Zhai et al., 2022, "LiT: Zero-Shot
Transfer with Locked-image text Tuning"): the image tower stays locked, a fresh text tower and the
image-side projection learn a contrastive (InfoNCE, both directions, learned temperature) match
of the synthetic scenes and their captions, so zero-shot classification works offline.

The image tower is the backbone's frozen CLIP ViT (its post-layernormed CLS, as CLIP pools);
captions are the demo's (``a red circle and a blue square``) over one- and two-shape scenes, drawn
once and encoded once.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from petserve.adapters.backbone.clip import ClipTextConfig
from petserve.adapters.clip_towers import ClipTowers
from petserve.adapters.data.synthetic import answer_for, make_demo_scenes, render_scene
from petserve.adapters.training.schedule import lr_at, warmup_steps


@dataclass(frozen=True)
class LiTConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    scenes: int = 1500            # per scene kind (one shape, one or two shapes)
    width: int = 64
    layers: int = 2
    heads: int = 4
    max_positions: int = 32
    projection_dim: int = 64
    seed: int = 0
    progress: bool = False


def text_config(model, lc: LiTConfig) -> ClipTextConfig:
    return ClipTextConfig(vocab_size=len(model.tokenizer), hidden_size=lc.width,
                          intermediate_size=2 * lc.width, num_hidden_layers=lc.layers,
                          num_attention_heads=lc.heads, max_position_embeddings=lc.max_positions,
                          projection_dim=lc.projection_dim,
                          eos_token_id=model.tokenizer.eos_token_id)


@torch.no_grad()
def cls_features(model, images: list, batch: int = 128) -> torch.Tensor:
    """(n, f) post-layernormed CLS features of the frozen vision tower."""
    return torch.cat([model.vision.encode(images[i:i + batch])[:, 0]
                      for i in range(0, len(images), batch)])


def train_lit(model, lc: LiTConfig = LiTConfig()) -> tuple[ClipTowers, list[float]]:
    """Fresh towers trained against ``model``'s locked image tower; returns them (frozen, eval)
    and the losses."""
    torch.manual_seed(lc.seed)
    towers = ClipTowers(text_config(model, lc), model.vision.cfg.feat_dim, model.tokenizer,
                        model.fingerprint).to(model.device)
    scenes = make_demo_scenes("colors", lc.scenes, lc.seed + 11) + \
        make_demo_scenes("caption", lc.scenes, lc.seed + 12)
    feats = cls_features(model, [render_scene(s) for s in scenes])
    captions = [answer_for("caption", s.shapes) for s in scenes]
    params = list(towers.parameters())
    opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=lc.weight_decay)
    rng, warm, losses = random.Random(lc.seed), warmup_steps(lc.steps, 0.05), []
    target = torch.arange(lc.batch_size, device=model.device)
    for step in tqdm(range(lc.steps), disable=not lc.progress, desc="LiT text tower", leave=False):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lc.steps, warm, lc.lr)
        idx = rng.sample(range(len(scenes)), lc.batch_size)
        img = towers.image_embeds(feats[idx])
        txt = towers.text_embeds([captions[k] for k in idx])
        scores = towers.logit_scale.exp().clamp(max=100) * img @ txt.T
        loss = (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return towers.eval().requires_grad_(False), losses


def zero_shot(towers: ClipTowers, cls: torch.Tensor, labels: list[str],
              template: str = "a {}") -> torch.Tensor:
    """(n,) index of the likeliest label for CLS features ``cls`` (n, f), prompts ``template``."""
    with torch.no_grad():
        W = towers.text_embeds([template.format(label) for label in labels])
        return (towers.image_embeds(cls) @ W.T).argmax(-1)
