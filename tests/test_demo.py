"""The embedded default: shipped demo assets are valid and the four demo adapters, served together
from one slot bank in mixed batches, do their tasks on held-out images and video clips — and only
their own."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from petserve.adapters import demo
from petserve.adapters.training.pretrain import PretrainConfig

STALE = ("shipped demo assets are stale or missing: rebuild them with "
         "`python -m petserve.adapters.demo --out adapters/demo_assets --check`")


@pytest.fixture(scope="module")
def shipped():
    assets = demo.valid_assets(demo.SHIPPED_DIR)
    assert assets is not None, STALE
    return assets


@pytest.fixture(scope="module")
def scores(shipped):
    return demo.demo_scores(shipped, n=60)


def test_shipped_assets_are_small_and_complete(shipped):
    files = [p for p in demo.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 2**20
    sfts = {r.adapter_id for r in demo.SFT_RECIPES}
    assert set(shipped.adapters) == set(demo.TARGETS) | sfts
    kinds = {i: json.loads(_meta(p))["kind"] for i, p in shipped.adapters.items()}
    assert len({kinds[t] for t in demo.TARGETS}) == 4   # four different kinds
    assert {kinds[i] for i in sfts} == {"sft"}


def _meta(path) -> str:
    from petserve.adapters.adapter_file import parse_header
    header, _ = parse_header(path.read_bytes())
    return header["__metadata__"]["petserve"]


@pytest.mark.parametrize("task", sorted(demo.TARGETS))
def test_each_adapter_reaches_its_target(scores, task):
    assert scores.adapter[task] >= demo.TARGETS[task], scores


@pytest.mark.parametrize("task", sorted(demo.VIDEO_TARGETS))
def test_each_adapter_answers_video_clips_too(scores, task):
    """Served with the video prompt and one token per frame: the same adapter file does both."""
    assert scores.video[task] >= demo.VIDEO_TARGETS[task], scores


@pytest.mark.parametrize("task", sorted(demo.TARGETS))
def test_bare_backbone_and_mismatched_adapter_score_far_lower(scores, task):
    assert scores.bare[task] <= scores.adapter[task] - 0.30, scores
    assert scores.mismatched[task] <= scores.adapter[task] - 0.30, scores


@pytest.fixture(scope="module")
def composition(shipped):
    return demo.composition_scores(shipped, n=60)


def test_composition_demo_each_member_alone_fails_in_french(composition):
    assert composition.language_alone < demo.ALONE_LIMIT, composition
    assert composition.task_alone < demo.ALONE_LIMIT, composition
    assert composition.bare == 0.0, composition


def test_composition_demo_in_english_answers_the_task(composition):
    """colors-sft over lang-en, as it was trained, served as a composite: the English figure."""
    assert composition.english_composed >= 0.95, composition


@pytest.fixture(scope="module")
def generated(shipped):
    return demo.generated_scores(shipped, n=60)          # the queries --check and the README use


def test_generated_adapters_do_the_trained_tasks_from_a_context_alone(generated):
    """What the README claims of the shipped generator, each figure the mean of three draws of a
    context of 8 demonstrations and 60 queries: every trained combination >= 0.85; both held-out
    combinations reach the target; another task's context gives a held-out combination < 0.2 and
    every combination far less than its own context; the bare backbone nothing."""
    held = {f"{a}/{s}" for a, s in demo.GENERATOR_RECIPE.held_out}
    trained = set(generated.own) - held
    assert len(trained) == 10 and len(held) == 2
    assert all(generated.own[c] >= 0.85 for c in trained), generated
    assert all(generated.own[c] >= demo.GENERATED_TARGET for c in held), generated
    assert all(len(generated.own_per_draw[c]) == 3 for c in generated.own)
    assert all(generated.other_context[c] < demo.OTHER_CONTEXT_LIMIT for c in held), generated
    assert all(generated.own[c] - generated.other_context[c] >= 0.25 for c in generated.own)
    assert all(v == 0.0 for v in generated.bare.values()), generated


def test_ensure_prefers_shipped_then_cache_then_builds(shipped, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(demo, "build_demo_assets", lambda out, **_: built.append(out))
    assert demo.ensure_demo_assets(tmp_path / "cache").backbone_dir == shipped.backbone_dir
    cache = tmp_path / "cache"
    shutil.copytree(demo.SHIPPED_DIR, cache)
    monkeypatch.setattr(demo, "SHIPPED_DIR", tmp_path / "nothing")
    assert demo.ensure_demo_assets(cache).backbone_dir == cache / "backbone"
    assert not built
    monkeypatch.setenv("PETSERVE_CACHE", str(tmp_path / "env"))
    demo.ensure_demo_assets(progress=False)
    assert built == [tmp_path / "env" / "demo"]


def test_stale_or_broken_assets_are_not_used(tmp_path):
    copy = tmp_path / "assets"
    shutil.copytree(demo.SHIPPED_DIR, copy)
    assert demo.valid_assets(copy) is not None
    manifest = json.loads((copy / demo.MANIFEST).read_text())
    (copy / demo.MANIFEST).write_text(json.dumps({**manifest, "recipe": "0" * 16}))
    assert demo.valid_assets(copy) is None                          # another recipe
    (copy / demo.MANIFEST).write_text(json.dumps(manifest))
    adapter = copy / manifest["adapters"]["count"]
    adapter.write_bytes(adapter.read_bytes()[:-8])
    assert demo.valid_assets(copy) is None                          # truncated adapter


def test_the_builder_is_deterministic(tmp_path, monkeypatch):
    """A miniature build (same code path, tiny step counts) twice: identical bytes, valid assets."""
    tiny = PretrainConfig(pool_size=128, vision_steps=3, steps=3, batch_size=8)
    monkeypatch.setattr(demo, "BASE", replace(demo.BASE, pretrain=tiny))
    monkeypatch.setattr(demo, "RECIPES", tuple(
        replace(r, train_size=8, steps=2, batch_size=4, video_size=2) for r in demo.RECIPES))
    monkeypatch.setattr(demo, "SFT_RECIPES", tuple(
        replace(r, train_size=8, steps=2, batch_size=4) for r in demo.SFT_RECIPES))
    monkeypatch.setattr(demo, "GENERATOR_RECIPE", replace(demo.GENERATOR_RECIPE, steps=2,
                                                          pool_size=16))
    monkeypatch.setattr(demo, "TOWERS_RECIPE", replace(demo.TOWERS_RECIPE, steps=2, scenes=40))
    first = demo.build_demo_assets(tmp_path / "a", progress=False)
    second = demo.build_demo_assets(tmp_path / "b", progress=False)
    assert demo.valid_assets(tmp_path / "a") is not None
    for task, path in first.adapters.items():
        assert path.read_bytes() == second.adapters[task].read_bytes(), task
    assert first.generator.read_bytes() == second.generator.read_bytes()
    assert first.clip_text.read_bytes() == second.clip_text.read_bytes()
    weights = "model.safetensors"
    assert (first.backbone_dir / weights).read_bytes() == (second.backbone_dir / weights).read_bytes()
