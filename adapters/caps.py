"""CapS-Adapter (Wang et al., 2024; public code WLuLi/CapS-Adapter): training-free CLIP
classification with a multimodal support-set cache (docs/METHODS.md §3.9).

With f the L2-normalised CLIP image feature of a test image, W (C x D) the class text embeddings
(prompt ensembles), F_img / F_cap (N x D) the support images' features and the CLIP text features
of their captions, L (N x C) their one-hot labels::

    A      = (1 - delta) f F_img^T + delta f F_cap^T
    logits = 100 f W^T + alpha exp(-beta (1 - A)) L + gamma (-rescale(KL)) L

KL[i] = KL(p || q_i) between softened distributions of the test feature and of support image i,
``softmax(x / 0.5)`` over the feature dimensions (the seed's ``compute_image_text_distributions``
softens the features themselves, not their class logits); ``rescale`` maps the KL values to the
range of A by min-max. The seed rescales over a whole batch of test images at once; here each test
image's row is rescaled on its own, so a request's answer never depends on what it is batched with
(docs/METHODS.md §9).

``grouped_logits`` serves many cache heads in one batch with batched matmuls over the rows' heads
(padded to the largest class and support counts), not a loop over heads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

KL_TEMPERATURE = 0.5
ZERO_SHOT_SCALE = 100.0


@dataclass
class CacheHead:
    """One cache adapter: its classes and support set (features L2-normalised) and the weights
    of its three terms."""

    labels: list[str]
    text: torch.Tensor          # (C, D) class text embeddings
    images: torch.Tensor        # (N, D) support image features (mean of augmented views)
    captions: torch.Tensor      # (N, D) CLIP text features of the support images' captions
    targets: torch.Tensor       # (N,) int64 class of each support image
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    delta: float = 0.0

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def with_weights(self, alpha: float, beta: float, gamma: float, delta: float) -> CacheHead:
        return replace(self, alpha=alpha, beta=beta, gamma=gamma, delta=delta)

    def restricted(self, classes: list[int]) -> CacheHead:
        """The head over ``classes`` only (in that order), with their support images."""
        keep = [i for i, t in enumerate(self.targets.tolist()) if t in classes]
        remap = {c: k for k, c in enumerate(classes)}
        return replace(self, labels=[self.labels[c] for c in classes], text=self.text[classes],
                       images=self.images[keep], captions=self.captions[keep],
                       targets=torch.tensor([remap[t] for t in self.targets[keep].tolist()]))


def softened(x: torch.Tensor, temperature: float = KL_TEMPERATURE) -> torch.Tensor:
    return torch.softmax(x / temperature, dim=-1)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, N): KL(p_b || q_n) of distributions p (B, D) and q (N, D)."""
    return (p * p.log()).sum(-1, keepdim=True) - p @ q.log().T


def rescale_rows(x: torch.Tensor, like: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of ``x`` min-max mapped onto the range of the same row of ``like`` (over the
    ``valid`` entries; a constant row maps to that range's minimum)."""
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    big = torch.finfo(x.dtype).max
    def lo(t):
        return torch.where(valid, t, big).amin(-1, keepdim=True)

    def hi(t):
        return torch.where(valid, t, -big).amax(-1, keepdim=True)
    span = hi(x) - lo(x)
    unit = torch.where(span > 0, (x - lo(x)) / span.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    return unit * (hi(like) - lo(like)) + lo(like)


def terms(f: torch.Tensor, head: CacheHead) -> dict[str, torch.Tensor]:
    """The three (B, C) terms of ``head`` for normalised features f (B, D), unweighted by alpha
    and gamma (delta and beta shape them): zero_shot, cache, kl. A head without supports (CLIP
    zero-shot) has zero cache and kl terms."""
    zero_shot = ZERO_SHOT_SCALE * f @ head.text.T
    if head.images.shape[0] == 0:
        return {"zero_shot": zero_shot, "cache": torch.zeros_like(zero_shot),
                "kl": torch.zeros_like(zero_shot)}
    A = (1 - head.delta) * f @ head.images.T + head.delta * f @ head.captions.T       # (B, N)
    L = F.one_hot(head.targets, head.num_classes).to(f.dtype)                         # (N, C)
    kl = kl_rows(softened(f), softened(head.images))
    return {"zero_shot": zero_shot,
            "cache": torch.exp(-head.beta * (1 - A)) @ L,
            "kl": -rescale_rows(kl, A) @ L}


def logits(f: torch.Tensor, head: CacheHead) -> torch.Tensor:
    """(B, C) CapS logits of normalised image features f (B, D)."""
    t = terms(f, head)
    return t["zero_shot"] + head.alpha * t["cache"] + head.gamma * t["kl"]


@dataclass
class CacheStack:
    """Several heads padded to common sizes (S heads, Cmax classes, Nmax supports)."""

    text: torch.Tensor          # (S, Cmax, D)
    images: torch.Tensor        # (S, Nmax, D)
    captions: torch.Tensor      # (S, Nmax, D)
    onehot: torch.Tensor        # (S, Nmax, Cmax), zero rows for padding supports
    support_valid: torch.Tensor  # (S, Nmax) bool
    class_valid: torch.Tensor   # (S, Cmax) bool
    weights: torch.Tensor       # (S, 4): alpha, beta, gamma, delta

    @classmethod
    def of(cls, heads: list[CacheHead]) -> CacheStack:
        S, D = len(heads), heads[0].text.shape[1]
        C = max(h.num_classes for h in heads)
        N = max(1, *(h.images.shape[0] for h in heads))    # zero-shot heads have no supports
        dt = heads[0].text.dtype
        text, images, captions = (torch.zeros(S, n, D, dtype=dt) for n in (C, N, N))
        onehot = torch.zeros(S, N, C, dtype=dt)
        support_valid = torch.zeros(S, N, dtype=torch.bool)
        class_valid = torch.zeros(S, C, dtype=torch.bool)
        for s, h in enumerate(heads):
            c, n = h.num_classes, h.images.shape[0]
            text[s, :c], images[s, :n], captions[s, :n] = h.text, h.images, h.captions
            onehot[s, :n, :c] = F.one_hot(h.targets, c).to(dt)
            support_valid[s, :n], class_valid[s, :c] = True, True
        images = torch.where(support_valid.unsqueeze(-1), images, 1.0)   # padding: any finite row
        weights = torch.tensor([[h.alpha, h.beta, h.gamma, h.delta] for h in heads], dtype=dt)
        return cls(text, images, captions, onehot, support_valid, class_valid, weights)


def grouped_logits(f: torch.Tensor, stack: CacheStack, slots: torch.Tensor) -> torch.Tensor:
    """(B, Cmax) logits of rows f (B, D), row b on head ``slots[b]``, in batched matmuls; classes a
    row's head lacks are -inf."""
    text, images, captions = stack.text[slots], stack.images[slots], stack.captions[slots]
    onehot, valid = stack.onehot[slots], stack.support_valid[slots]
    alpha, beta, gamma, delta = stack.weights[slots].unbind(-1)
    fb = f.unsqueeze(1)                                                            # (B, 1, D)
    A = ((1 - delta)[:, None] * (fb @ images.transpose(1, 2)).squeeze(1)
         + delta[:, None] * (fb @ captions.transpose(1, 2)).squeeze(1))            # (B, N)
    p, q = softened(f), softened(images)                                          # (B, D), (B, N, D)
    kl = (p * p.log()).sum(-1, keepdim=True) - (p.unsqueeze(1) @ q.log().transpose(1, 2)).squeeze(1)
    cache = torch.where(valid, torch.exp(-beta[:, None] * (1 - A)), 0.0)
    neg = torch.where(valid, -rescale_rows(kl, A, valid), 0.0)
    out = (ZERO_SHOT_SCALE * (fb @ text.transpose(1, 2)).squeeze(1)
           + alpha[:, None] * (cache.unsqueeze(1) @ onehot).squeeze(1)
           + gamma[:, None] * (neg.unsqueeze(1) @ onehot).squeeze(1))
    return torch.where(stack.class_valid[slots], out, float("-inf"))


# ---- the weights' search ------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchGrid:
    """The seed's grid (``hparam_search``: beta 200 steps over [1, 50), alpha 20 over [0.1, 50),
    gamma 50 over [0.1, 30), delta 0, 0.1, ..., 1) with fewer steps by default."""

    beta_steps: int = 20
    alpha_steps: int = 20
    gamma_steps: int = 20
    delta_steps: int = 11

    def values(self):
        def span(lo, hi, n):
            return [i * (hi - lo) / n + lo for i in range(n)]
        return (span(0.1, 50, self.alpha_steps), span(1, 50, self.beta_steps),
                span(0.1, 30, self.gamma_steps), [i / 10 for i in range(self.delta_steps)])


def search_weights(head: CacheHead, val_features: torch.Tensor, val_targets: torch.Tensor,
                   grid: SearchGrid = SearchGrid(), image_only: bool = False,
                   caption_only: bool = False) -> tuple[CacheHead, float]:
    """The head with the (alpha, beta, gamma, delta) of ``grid`` that classify ``val_features``
    best, and that accuracy (ties: the first found, delta, beta, alpha, gamma varying from the
    outermost loop in). ``image_only``: delta = gamma = 0 (a Tip-Adapter-like cache);
    ``caption_only``: delta = 1, gamma = 0. Each term is computed once per value it depends on."""
    alphas, betas, gammas, deltas = grid.values()
    if image_only:
        gammas, deltas = [0.0], [0.0]
    if caption_only:
        gammas, deltas = [0.0], [1.0]
    best, best_acc = head, -1.0
    for delta in deltas:
        for beta in betas:
            t = terms(val_features, head.with_weights(0.0, beta, 0.0, delta))
            for alpha in alphas:
                base = t["zero_shot"] + alpha * t["cache"]
                for gamma in gammas:
                    acc = float(((base + gamma * t["kl"]).argmax(-1) == val_targets).float().mean())
                    if acc > best_acc:
                        best, best_acc = head.with_weights(alpha, beta, gamma, delta), acc
    return best, best_acc
