"""The vision side: frozen CLIP features (or precomputed ones) and the visual embedding.

Visual embedding (VL-T5 / VL-Adapter, trainable per task so each adapter may carry its own)::

    v_i = LN_f(W_f f_i + b_f) + LN_p(W_p [x1, y1, x2, y2, area] + b_p) + E_img[image_order_i]

Boxes are normalised to [0, 1]. ViT patches get their real grid boxes and the CLS token the whole
image (VL-Adapter fed all-zero boxes; real boxes are ours). A video frame's token gets a *temporal*
box: frame t of n spans x in [t/n, (t+1)/n], so frame order reaches the model through W_p without
adding parameters (ours).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from petserve.adapters.backbone.clip import ClipConfig, ClipVision
from petserve.adapters.backbone.config import VisionConfig
from petserve.adapters.backbone.layers import make_norm
from petserve.adapters.runtime.context import StepContext
from petserve.kernels import grouped_linear

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisualTokens:
    """One request's visual tokens: feats (N, f), boxes (N, 4) in [0, 1], order (N,) int64."""

    feats: torch.Tensor
    boxes: torch.Tensor
    order: torch.Tensor

    @staticmethod
    def concat(parts: list[VisualTokens]) -> VisualTokens:
        return VisualTokens(torch.cat([p.feats for p in parts]), torch.cat([p.boxes for p in parts]),
                            torch.cat([p.order for p in parts]))


def grid_boxes(side: int) -> torch.Tensor:
    """(side*side, 4) boxes of a row-major grid over the unit square."""
    edges = torch.arange(side + 1, dtype=torch.float32) / side
    y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(edges[1:], edges[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], -1).reshape(-1, 4)


def temporal_boxes(n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float32)
    return torch.stack([t / n, torch.zeros(n), (t + 1) / n, torch.ones(n)], -1)


class VisionEncoder(nn.Module):
    """Frozen CLIP ViT: images -> (CLS + patch) features with their boxes."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.clip = ClipVision(ClipConfig.from_dict(cfg.clip))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        side = cfg.image_size // cfg.clip["patch_size"]
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        self.register_buffer("boxes", torch.cat([whole, grid_boxes(side)]), persistent=False)

    def pixels(self, images: list) -> torch.Tensor:
        """PIL images or (H, W, 3) uint8 arrays -> normalised (n, 3, S, S): resize the short side to
        S (bicubic), centre-crop. Same-size images (video frames, image pairs) are resized in one
        call: the result is the same, the per-call overhead is paid once."""
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        if len({a.shape for a in arrays}) == 1:
            x = self._resize_crop(torch.from_numpy(np.stack(arrays)))
        else:
            x = torch.cat([self._resize_crop(torch.from_numpy(a.copy())[None]) for a in arrays])
        x = x.to(self.mean.device)
        return ((x - self.mean) / self.std).to(self.clip.dtype)

    def _resize_crop(self, a: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, S, S) in [0, 1]."""
        S = self.cfg.image_size
        t = a.permute(0, 3, 1, 2).float() / 255.0
        h, w = t.shape[-2:]
        scale = S / min(h, w)
        t = F.interpolate(t, size=(max(S, round(h * scale)), max(S, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (t.shape[-2] - S) // 2, (t.shape[-1] - S) // 2
        return t[..., top:top + S, left:left + S].clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """(n, 1 + patches, f) features, post-layernormed (boxes: ``self.boxes``)."""
        return self.clip.post_layernorm(self.clip(self.pixels(images)))

    def image_tokens(self, images: list) -> VisualTokens:
        """One or two images (NLVR2): every token of each, image order 0 / 1."""
        feats = self.encode(images)
        n, N, _ = feats.shape
        return VisualTokens(feats.reshape(n * N, -1), self.boxes.repeat(n, 1),
                            torch.arange(n, device=feats.device).repeat_interleave(N))

    def video_tokens(self, frames: list) -> VisualTokens:
        """Video frames: one token (CLS) per frame, with temporal boxes."""
        feats = self.encode(frames)[:, 0]
        n = feats.shape[0]
        return VisualTokens(feats, temporal_boxes(n).to(feats.device),
                            torch.zeros(n, dtype=torch.long, device=feats.device))


def feature_tokens(feats, boxes=None, order: int = 0) -> VisualTokens:
    """Precomputed features (N, f). Without boxes: a square N gets grid boxes (grid features),
    anything else all-zero boxes (as VL-Adapter fed them)."""
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array (tokens, dim), got shape {tuple(f.shape)}")
    n = f.shape[0]
    if boxes is not None:
        b = torch.as_tensor(np.asarray(boxes), dtype=torch.float32)
        if b.shape != (n, 4):
            raise ValueError(f"boxes must have shape ({n}, 4), got {tuple(b.shape)}")
    else:
        side = int(round(n ** 0.5))
        b = grid_boxes(side) if side * side == n else torch.zeros(n, 4)
    return VisualTokens(f, b, torch.full((n,), order, dtype=torch.long))


def grid_side(n: int) -> int | None:
    """The side of a square grid of ``n`` tokens, or None."""
    side = math.isqrt(n)
    return side if side * side == n else None


def pool_grid(tokens: VisualTokens, side: int) -> VisualTokens:
    """A square grid of features max-pooled to ``side`` x ``side`` (adaptive windows), as the
    seeds' ``--downsample`` (``nn.AdaptiveMaxPool2d``); their boxes and order keep the first
    side*side entries, as theirs do. Tokens that are no larger square grid come back unchanged."""
    n, f = tokens.feats.shape
    s0 = grid_side(n)
    if s0 is None or s0 <= side:
        return tokens
    grid = tokens.feats.T.reshape(1, f, s0, s0)
    pooled = F.adaptive_max_pool2d(grid, side).reshape(f, side * side).T.contiguous()
    k = side * side
    return VisualTokens(pooled, tokens.boxes[:k], tokens.order[:k])


class VisualEmbedding(nn.Module):
    """The backbone's own visual embedding; adapters may replace it per slot.

    ``norm`` "layer" (LayerNorm, BART) or "rms" (T5's RMS norm: scale only, no bias), eps ``eps``.
    With ``object_order`` visual token i of each image also gets the frozen token embedding's row
    V-1-i (the seeds' object-order embedding; i restarts at 0 for a second image).
    """

    def __init__(self, feat_dim: int, d_model: int, n_images: int, norm: str = "layer",
                 eps: float = 1e-5, object_order: bool = False):
        super().__init__()
        if norm not in ("layer", "rms"):
            raise ValueError(f"visual norm must be 'layer' or 'rms', not {norm!r}")
        self.object_order = object_order
        self.feat = nn.Linear(feat_dim, d_model)
        self.feat_norm = make_norm(norm, d_model, eps)
        self.box = nn.Linear(5, d_model)
        self.box_norm = make_norm(norm, d_model, eps)
        self.img_order = nn.Embedding(n_images, d_model)

    def forward(self, feats, boxes, order, obj, tokens: nn.Embedding, ctx: StepContext) -> torch.Tensor:
        """feats (B, N, f), boxes (B, N, 4), image order and object index (B, N) -> (B, N, d), with
        per-row weights. ``tokens`` is the language model's token embedding (V rows; a row's sparse
        delta on it, an SFT's, applies here too)."""
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        pos = torch.cat([boxes, area], -1).to(feats.dtype)
        extra = ctx.embed(tokens.num_embeddings - 1 - obj, tokens, "visual") if self.object_order else 0.0
        vs = ctx.weights.visual()
        if vs is None:
            return (self.feat_norm(self.feat(feats)) + self.box_norm(self.box(pos))
                    + self.img_order(order) + extra)
        B, N, _ = feats.shape
        seg, idx = ctx.meta.base_seg(N), ctx.meta.vector_index()
        f = grouped_linear(feats.reshape(B * N, -1), vs.feat, seg).view(B, N, -1)
        p = grouped_linear(pos.reshape(B * N, -1), vs.box, seg).view(B, N, -1)
        norm = self.feat_norm.forward_with
        return (norm(f, vs.feat_norm_w[idx, None], _rows(vs.feat_norm_b, idx))
                + norm(p, vs.box_norm_w[idx, None], _rows(vs.box_norm_b, idx))
                + vs.img_order[idx.unsqueeze(1), order] + extra)


def _rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx, None]


def object_index(order: torch.Tensor) -> torch.Tensor:
    """(N,) index of each visual token within its image: one request's tokens come image by image
    (``order`` non-decreasing), so i = position - position of its image's first token."""
    order = order.contiguous()
    return torch.arange(order.shape[0], device=order.device) - torch.searchsorted(order, order)
