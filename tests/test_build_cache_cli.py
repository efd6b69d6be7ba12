"""``petserve build-cache`` (serving/commands/build_cache.py) on the embedded demo assets: a small
support folder captioned through the serving engine into a cache file, and the user errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from petserve.adapters.backbone import build_backbone
from petserve.adapters.cache_file import load_cache, towers_identity
from petserve.adapters.caps_build import VARIANTS
from petserve.adapters.caps_demo import generation_captioner
from petserve.adapters.clip_towers import load_towers
from petserve.adapters.data.synthetic import make_class_scenes, render_shifted
from petserve.adapters.demo import ensure_demo_assets
from petserve.serving.cli import main

LABELS = ("red circle", "blue square", "green triangle")
PER_CLASS = 3


@pytest.fixture(scope="module")
def assets():
    return ensure_demo_assets()


@pytest.fixture
def support(tmp_path):
    """(classes file, support dir) of LABELS, PER_CLASS shifted-domain PNGs each."""
    root = tmp_path / "support"
    for c, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        for j, scene in enumerate(make_class_scenes(label, PER_CLASS, seed=11)):
            render_shifted(scene, 1000 * c + j).save(root / label / f"{j}.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("# three demo classes\n" + "\n".join(LABELS) + "\n\n")
    return classes, root


def build(tmp_path, classes, support_dir, *more: str, captioner: str = "caption") -> int:
    return main(["build-cache", "--classes", str(classes), "--support", str(support_dir),
                 "--captioner", captioner, "--out", str(tmp_path / "out" / "mine.safetensors"),
                 "--store", str(tmp_path / "store"), "--views", "2", *more])


def test_builds_a_loadable_cache_captioned_by_the_engine(tmp_path, support, assets, capsys):
    classes, root = support
    assert build(tmp_path, classes, root) == 0
    report = json.loads(capsys.readouterr().out.strip())
    assert (report["classes"], report["supports"]) == (len(LABELS), len(LABELS) * PER_CLASS)
    assert set(report["validation"]) == set(VARIANTS)
    model = build_backbone(assets.backbone_dir)
    towers = load_towers(assets.clip_text, model)
    data = (tmp_path / "out" / "mine.safetensors").read_bytes()
    head, meta = load_cache(data, towers_identity(towers), towers.cfg.projection_dim)
    assert head.labels == list(LABELS) and meta["name"] == "mine"
    assert head.targets.tolist() == [c for c in range(len(LABELS)) for _ in range(PER_CLASS)]
    assert report["weights"] == {"alpha": head.alpha, "beta": head.beta, "gamma": head.gamma,
                                 "delta": head.delta}
    # the caption features are those of what the caption adapter says of each support image
    pil = [Image.open(p).convert("RGB") for label in LABELS
           for p in sorted((root / label).glob("*.png"))]
    with torch.inference_mode():
        captions = generation_captioner(model, assets.adapters["caption"])(pil)
        want = F.normalize(towers.text_embeds(captions), dim=-1)
    torch.testing.assert_close(head.captions, want, atol=1e-4, rtol=1e-4)


def test_empty_classes_file(tmp_path, support, capsys):
    classes, root = support
    classes.write_text("# nothing here\n\n")
    assert build(tmp_path, classes, root) == 2
    assert "has no classes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_duplicate_class(tmp_path, support, capsys):
    classes, root = support
    classes.write_text("red circle\nred circle\n")
    assert build(tmp_path, classes, root) == 2
    assert "'red circle' is listed twice" in capsys.readouterr().err


def test_missing_class_folder(tmp_path, support, capsys):
    classes, root = support
    classes.write_text("\n".join(LABELS + ("white square",)))
    assert build(tmp_path, classes, root) == 2
    assert "class 'white square' has no folder" in capsys.readouterr().err


def test_folder_that_is_not_a_class(tmp_path, support, capsys):
    classes, root = support
    classes.write_text("\n".join(LABELS[:2]))
    assert build(tmp_path, classes, root) == 2
    assert "folder 'green triangle' is not a class" in capsys.readouterr().err


def test_class_without_images(tmp_path, support, capsys):
    classes, root = support
    for p in (root / "blue square").iterdir():
        p.unlink()
    assert build(tmp_path, classes, root) == 2
    assert "class 'blue square' has no images" in capsys.readouterr().err


def test_too_few_images_to_hold_out(tmp_path, support, capsys):
    classes, root = support
    assert build(tmp_path, classes, root, "--val-per-class", str(PER_CLASS)) == 2
    assert "at least one must stay" in capsys.readouterr().err


def test_unknown_captioner(tmp_path, support, capsys):
    classes, root = support
    assert build(tmp_path, classes, root, captioner="no-such-captioner") == 2
    err = capsys.readouterr().err
    assert f"no adapter 'no-such-captioner' in store {tmp_path / 'store'}" in err
    assert not (tmp_path / "out").exists()


def test_backbone_without_clip(tmp_path, support, assets, capsys):
    classes, root = support
    assert build(tmp_path, classes, root, "--backbone", str(assets.backbone_dir)) == 2
    assert "--backbone needs --clip" in capsys.readouterr().err


def test_captioner_that_cannot_caption(tmp_path, support, assets, capsys):
    """The engine's refusal (a cache classifier has no caption task) is the command's error."""
    from petserve.serving.deployments import seed_store
    from petserve.serving.store import LocalDirStore
    store = LocalDirStore(tmp_path / "store")
    seed_store(store, {"caps-24": assets.caches["caps-24"]}, str(assets.backbone_dir),
               store.max_bytes, assets.clip_text)
    classes, root = support
    assert build(tmp_path, classes, root, captioner="caps-24") == 2
    assert "--captioner caps-24: adapter 'caps-24' is a cache classifier" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()
