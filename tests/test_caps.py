"""CapS-Adapter's logits (adapters/caps.py): the formula against a literal numpy re-computation,
many heads batched equal each alone, the weights' search, and the cache file's checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from petserve.adapters import caps
from petserve.adapters.cache_file import CacheFileError, cache_bytes, load_cache


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def random_head(seed: int, classes: int = 5, supports: int = 12, dim: int = 16) -> caps.CacheHead:
    g = torch.Generator().manual_seed(seed)
    return caps.CacheHead(
        labels=[f"c{i}" for i in range(classes)],
        text=unit(torch.randn(classes, dim, generator=g, dtype=torch.float64)),
        images=unit(torch.randn(supports, dim, generator=g, dtype=torch.float64)),
        captions=unit(torch.randn(supports, dim, generator=g, dtype=torch.float64)),
        targets=torch.arange(supports) % classes,
        alpha=1.7, beta=5.5, gamma=2.3, delta=0.3)


def literal(f: np.ndarray, h: caps.CacheHead) -> np.ndarray:
    """The formula as written (docs/METHODS.md §3.9), one test image at a time, in numpy."""
    W, Fi, Fc = h.text.numpy(), h.images.numpy(), h.captions.numpy()
    L = np.eye(h.num_classes)[h.targets.numpy()]
    out = []
    for x in f:
        A = (1 - h.delta) * Fi @ x + h.delta * Fc @ x                  # (N,)
        def soft(v):
            e = np.exp(v / 0.5 - (v / 0.5).max())
            return e / e.sum()
        p = soft(x)
        kl = np.array([np.sum(p * (np.log(p) - np.log(soft(s)))) for s in Fi])
        scaled = (kl - kl.min()) / (kl.max() - kl.min()) * (A.max() - A.min()) + A.min()
        out.append(100 * W @ x + h.alpha * np.exp(-h.beta * (1 - A)) @ L
                   + h.gamma * (-scaled) @ L)
    return np.stack(out)


def test_logits_are_the_formula():
    h = random_head(0)
    f = unit(torch.randn(7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    np.testing.assert_allclose(caps.logits(f, h).numpy(), literal(f.numpy(), h), rtol=1e-9,
                               atol=1e-9)


def test_the_image_only_cache_is_tip_adapter():
    """delta = gamma = 0: zero-shot plus the image cache alone (Tip-Adapter's logits)."""
    h = random_head(2).with_weights(alpha=3.0, beta=7.0, gamma=0.0, delta=0.0)
    f = unit(torch.randn(4, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    L = F.one_hot(h.targets, h.num_classes).double()
    tip = 100 * f @ h.text.T + 3.0 * torch.exp(-7.0 * (1 - f @ h.images.T)) @ L
    torch.testing.assert_close(caps.logits(f, h), tip)


def test_many_heads_batched_equal_each_alone():
    heads = [random_head(s, classes=c, supports=n) for s, (c, n) in enumerate([(5, 12), (3, 7),
                                                                                (8, 20)])]
    stack = caps.CacheStack.of(heads)
    g = torch.Generator().manual_seed(9)
    f = unit(torch.randn(10, 16, generator=g, dtype=torch.float64))
    slots = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1, 1])
    got = caps.grouped_logits(f, stack, slots)
    for b, s in enumerate(slots.tolist()):
        alone = caps.logits(f[b:b + 1], heads[s])[0]
        c = heads[s].num_classes
        torch.testing.assert_close(got[b, :c], alone, rtol=1e-9, atol=1e-9)
        assert torch.isinf(got[b, c:]).all()


def test_a_row_does_not_depend_on_its_batch():
    h = random_head(4)
    f = unit(torch.randn(6, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    together = caps.logits(f, h)
    for b in range(6):
        torch.testing.assert_close(caps.logits(f[b:b + 1], h)[0], together[b])


def test_the_search_finds_weights_at_least_as_good_as_zero_shot():
    h = random_head(6, classes=4, supports=16)
    g = torch.Generator().manual_seed(7)
    # validation images near their class's supports: the cache helps
    idx = torch.randint(0, 16, (40,), generator=g)
    val = unit(h.images[idx] + 0.05 * torch.randn(40, 16, generator=g, dtype=torch.float64))
    y = h.targets[idx]
    zero_shot = float(((100 * val @ h.text.T).argmax(-1) == y).float().mean())
    grid = caps.SearchGrid(beta_steps=4, alpha_steps=4, gamma_steps=3, delta_steps=3)
    best, acc = caps.search_weights(h, val, y, grid)
    assert acc >= zero_shot and acc > 0.8
    assert float((caps.logits(val, best).argmax(-1) == y).float().mean()) == pytest.approx(acc)
    image_only, _ = caps.search_weights(h, val, y, grid, image_only=True)
    assert image_only.gamma == 0.0 and image_only.delta == 0.0


# ---- the cache adapter file ---------------------------------------------------------------------


def test_a_cache_file_round_trips():
    h = random_head(11)
    head, meta = load_cache(cache_bytes(h, clip="abc", name="n"), clip="abc", dim=16)
    assert head.labels == h.labels and meta["name"] == "n" and meta["kind"] == "cache"
    f = unit(torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    torch.testing.assert_close(caps.logits(f.float(), head), caps.logits(f, h).float(),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("change, code, fragment", [
    (dict(labels=[]), "invalid_cache", "1-4096 classes"),
    (dict(labels=["a", "a", "b", "c", "d"]), "invalid_cache", "distinct"),
    (dict(targets=torch.full((12,), 7)), "invalid_cache", "class indices"),
    (dict(images=torch.zeros(12, 8, dtype=torch.float64)), "invalid_cache", "'images' has shape"),
    (dict(delta=1.5), "invalid_cache", "delta must be in"),
])
def test_bad_cache_heads_are_refused(change, code, fragment):
    from dataclasses import replace
    with pytest.raises(CacheFileError, match=fragment) as e:
        cache_bytes(replace(random_head(12), **change), clip="abc")
    assert e.value.code == code


def test_a_cache_for_another_clip_or_width_is_refused():
    data = cache_bytes(random_head(13), clip="abc")
    with pytest.raises(CacheFileError, match="made with CLIP towers abc") as e:
        load_cache(data, clip="xyz", dim=16)
    assert e.value.code == "clip_mismatch"
    with pytest.raises(CacheFileError, match="16 wide") as e:
        load_cache(data, clip="abc", dim=64)
    assert e.value.code == "feature_dim_mismatch"
    with pytest.raises(CacheFileError, match="not a petserve cache file"):
        load_cache(b"junk junk junk", clip="abc", dim=16)
