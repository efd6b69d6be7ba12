"""Tests for adapters.data: synthetic demo tasks, JSONL / VQAv2 / COCO loaders."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petserve.adapters.data import (
    COLOR_RGB,
    COLORS,
    DEMO_TASKS,
    SHAPES,
    DataError,
    Example,
    load_coco_captions,
    load_jsonl,
    load_vqav2,
    make_demo_examples,
    make_demo_scenes,
    make_demo_video_examples,
    sample_scene,
    write_jsonl_dataset,
    write_video,
)

NUMBERS = ("one", "two", "three", "four", "five")


# ----------------------------------------------------------------------------- synthetic images


def _pixels(ex: Example) -> np.ndarray:
    return np.asarray(ex.load_images()[0])


@pytest.mark.parametrize("task_id", DEMO_TASKS)
def test_demo_is_deterministic(task_id: str) -> None:
    a, b = make_demo_examples(task_id, 12, seed=7), make_demo_examples(task_id, 12, seed=7)
    assert [e.target for e in a] == [e.target for e in b]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, b))
    c = make_demo_examples(task_id, 12, seed=8)
    assert any(not np.array_equal(_pixels(x), _pixels(y)) for x, y in zip(a, c))


@pytest.mark.parametrize("size", [224, 112])
def test_scenes_inside_and_not_overlapping(size: int) -> None:
    for task_id in DEMO_TASKS:
        for scene in make_demo_scenes(task_id, 60, seed=1, size=size):
            for s in scene.shapes:
                assert 0 <= s.x and s.x + s.size <= size and 0 <= s.y and s.y + s.size <= size
                assert s.shape in SHAPES and s.color in COLORS
            for a, b in combinations(scene.shapes, 2):
                assert not a.overlaps(b)


def test_shape_sizes_in_range() -> None:
    sizes = [s.size for sc in make_demo_scenes("count", 100, seed=2) for s in sc.shapes]
    assert min(sizes) >= 40 and max(sizes) <= 90
    with pytest.raises(ValueError, match="cannot place"):
        sample_scene(random.Random(0), 40)


@pytest.mark.parametrize("task_id", DEMO_TASKS)
def test_pixel_colors_match_scene(task_id: str) -> None:
    scenes = make_demo_scenes(task_id, 30, seed=3)
    examples = make_demo_examples(task_id, 30, seed=3)
    for scene, ex in zip(scenes, examples):
        img = ex.load_images()[0]
        assert img.size == (224, 224) and img.mode == "RGB"
        assert img.getpixel((0, 0)) in [(200, 200, 200)] + list(COLOR_RGB.values())
        for s in scene.shapes:
            assert img.getpixel(s.center) == COLOR_RGB[s.color]


def test_colors_distinct_from_background() -> None:
    rgb = list(COLOR_RGB.values())
    assert len(set(rgb)) == len(COLORS) == 8 and (200, 200, 200) not in rgb
    assert COLOR_RGB["white"] == (255, 255, 255) and COLOR_RGB["black"] == (0, 0, 0)


def test_task_questions_and_answers() -> None:
    for ex, scene in zip(make_demo_examples("colors", 40, 4), make_demo_scenes("colors", 40, 4)):
        assert (ex.task, ex.text) == ("vqa", "what color is the shape?")
        assert len(scene.shapes) == 1 and ex.target == scene.shapes[0].color
        assert ex.references == [ex.target]
    for ex, scene in zip(make_demo_examples("shapes", 40, 4), make_demo_scenes("shapes", 40, 4)):
        assert (ex.task, ex.text) == ("vqa", "what shape is it?")
        assert len(scene.shapes) == 1 and ex.target == scene.shapes[0].shape


def test_count_task_covers_one_to_five() -> None:
    examples = make_demo_examples("count", 200, seed=5)
    scenes = make_demo_scenes("count", 200, seed=5)
    for ex, scene in zip(examples, scenes):
        assert (ex.task, ex.text) == ("vqa", "how many shapes are there?")
        assert ex.target == NUMBERS[len(scene.shapes) - 1]
    assert set(Counter(e.target for e in examples)) == set(NUMBERS)


def test_caption_task_left_to_right() -> None:
    one = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    pattern = re.compile(rf"^{one}( and {one})?$")
    seen = set()
    for ex, scene in zip(make_demo_examples("caption", 60, 6), make_demo_scenes("caption", 60, 6)):
        assert (ex.task, ex.text) == ("caption", "")
        ordered = sorted(scene.shapes, key=lambda s: s.center)
        assert ex.target == " and ".join(f"a {s.color} {s.shape}" for s in ordered)
        assert pattern.match(ex.target)
        seen.add(len(scene.shapes))
    assert seen == {1, 2}


def test_unknown_task_lists_valid_ids() -> None:
    with pytest.raises(ValueError, match="colors, shapes, count, caption"):
        make_demo_examples("sizes", 1, 0)
    with pytest.raises(ValueError):
        make_demo_video_examples("sizes", 1, 0)


# ----------------------------------------------------------------------------- synthetic video


def test_video_examples(tmp_path: Path) -> None:
    import decord

    examples = make_demo_video_examples("count", 4, seed=9, num_frames=6, size=96)
    again = make_demo_video_examples("count", 4, seed=9, num_frames=6, size=96)
    for ex, ex2 in zip(examples, again):
        assert ex.task == "video_qa" and ex.text == "how many shapes are there?"
        assert ex.frames.shape == (6, 96, 96, 3) and ex.frames.dtype == np.uint8
        assert np.array_equal(ex.frames, ex2.frames) and ex.target in NUMBERS
    assert any(not np.array_equal(ex.frames[0], ex.frames[-1]) for ex in examples)
    caption = make_demo_video_examples("caption", 1, seed=9)[0]
    assert caption.task == "video_caption" and caption.frames.shape == (8, 112, 112, 3)
    path = write_video(tmp_path / "clip.mp4", examples[0].frames)
    reader = decord.VideoReader(str(path))
    assert len(reader) == 6 and reader[0].shape == (96, 96, 3)


def test_write_video_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError):
        write_video(tmp_path / "x.mp4", np.zeros((2, 7, 8, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- JSONL


def _extra_examples() -> list[Example]:
    red = Image.new("RGB", (32, 24), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    return [
        Example("nlvr", "the left image is red", "true", ["true"], images=[red, blue], example_id="n1"),
        Example("gqa", "what color?", "red", ["red"], images=[red]),
        Example("vqa", "how many?", "2", ["2", "2", "two", "3"], images=[blue],
                answer_scores={"2": 1.0, "3": 1 / 3}),
        Example("caption", "", "a red box", ["a red box", "red rectangle"], images=[red]),
    ]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    originals = [e for t in DEMO_TASKS for e in make_demo_examples(t, 3, seed=11)] + _extra_examples()
    loaded = load_jsonl(write_jsonl_dataset(tmp_path / "ds", originals))
    assert len(loaded) == len(originals)
    for orig, back in zip(originals, loaded):
        assert (back.task, back.text, back.target, back.references) == (
            orig.task, orig.text, orig.target, orig.references)
        assert all(isinstance(p, Path) and p.is_file() for p in back.images)
        for a, b in zip(orig.load_images(), back.load_images()):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert loaded[-2].answer_scores == {"2": 1.0, "3": pytest.approx(1 / 3)}
    assert loaded[-4].example_id == "n1"


def test_jsonl_video_round_trip(tmp_path: Path) -> None:
    import decord

    originals = make_demo_video_examples("colors", 2, 3, num_frames=5) + make_demo_video_examples(
        "caption", 1, 3, num_frames=5)
    loaded = load_jsonl(write_jsonl_dataset(tmp_path, originals))
    for orig, back in zip(originals, loaded):
        assert (back.task, back.text, back.target) == (orig.task, orig.text, orig.target)
        assert isinstance(back.frames, Path) and len(decord.VideoReader(str(back.frames))) == 5


def test_jsonl_answers_pick_majority_and_blank_lines(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    record = {"image": "img.png", "question": "q?", "answers": ["Two", "2", "3"]}
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n\n   \n")
    (ex,) = load_jsonl(path)
    assert ex.target == "2" and ex.references == ["Two", "2", "3"] and ex.task == "vqa"
    assert ex.answer_scores == {"2": pytest.approx(2 / 3), "3": pytest.approx(1 / 3)}
    assert ex.images == [tmp_path / "img.png"]


_GOOD = {"image": "img.png", "question": "what?", "answer": "red"}
_BAD_RECORDS = {
    "invalid json": ('{"image": "img.png", ', "not valid JSON"),
    "not an object": ('["img.png", "what?"]', "expected a JSON object"),
    "missing field": (json.dumps({"image": "img.png", "question": "q?"}), "'answer'"),
    "missing media": (json.dumps({"question": "q?", "answer": "a"}), "'image'"),
    "wrong type": (json.dumps({"image": "img.png", "question": 5, "answer": "a"}), "must be a string"),
    "question and caption": (json.dumps({"image": "img.png", "question": "q", "caption": "c"}),
                             "unknown combination"),
    "image and video": (json.dumps({"image": "img.png", "video": "v.mp4", "caption": "c"}),
                        "unknown combination"),
    "unknown field": (json.dumps({**_GOOD, "colour": "red"}), "unknown combination"),
    "statement on single image": (json.dumps({"image": "img.png", "statement": "s", "label": True}),
                                  "missing required field"),
    "file missing": (json.dumps({**_GOOD, "image": "nope.png"}), "nope.png"),
    "video missing": (json.dumps({"video": "nope.mp4", "caption": "c"}), "nope.mp4"),
    "empty answer": (json.dumps({**_GOOD, "answer": "  "}), "'answer' is empty"),
    "empty caption": (json.dumps({"image": "img.png", "caption": ""}), "'caption' is empty"),
    "empty captions": (json.dumps({"image": "img.png", "captions": []}), "'captions' is empty"),
    "label not bool": (json.dumps({"images": ["img.png", "img.png"], "statement": "s", "label": "yes"}),
                       "boolean"),
    "one nlvr image": (json.dumps({"images": ["img.png"], "statement": "s", "label": True}), "exactly 2"),
    "bad task": (json.dumps({**_GOOD, "task": "ocr"}), "'task'"),
}


@pytest.mark.parametrize("case", sorted(_BAD_RECORDS))
def test_jsonl_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "img.png")
    line, message = _BAD_RECORDS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_GOOD) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_jsonl_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*empty"):
        load_jsonl(path)
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_load_images_errors(tmp_path: Path) -> None:
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    for name in ("missing.png", "corrupt.png"):
        ex = Example("vqa", "q", "a", ["a"], images=[tmp_path / name])
        with pytest.raises(DataError, match=re.escape(str(tmp_path / name))):
            ex.load_images()
    gray = Example("caption", "", "c", ["c"], images=[Image.new("L", (3, 3))])
    assert gray.load_images()[0].mode == "RGB"


# ----------------------------------------------------------------------------- VQAv2


def _vqa_files(tmp_path: Path, questions: list[dict], annotations: list[dict]) -> tuple[Path, Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("COCO_val2014_000000000042.jpg", "000000000007.jpg", "13.jpg", "notes.txt"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(images / name, format="JPEG")
    q = tmp_path / "questions.json"
    q.write_text(json.dumps({"task_type": "Open-Ended", "questions": questions}))
    a = tmp_path / "annotations.json"
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a, images


def _ann(qid: int, image_id: int, answers: list[str], mc: str) -> dict:
    return {"question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": "other",
            "multiple_choice_answer": mc,
            "answers": [{"answer": s, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, s in enumerate(answers)]}


def _questions() -> list[dict]:
    return [{"image_id": 42, "question": "How many dogs?", "question_id": 420},
            {"image_id": 7, "question": "What color?", "question_id": 70},
            {"image_id": 13, "question": "Is it red?", "question_id": 130}]


def _annotations() -> list[dict]:
    return [_ann(420, 42, ["Two"] * 4 + ["2", "3", "3", "1", "three", "2."], "two"),
            _ann(70, 7, ["red"] * 10, "red"),
            _ann(130, 13, ["yes"] * 2 + ["no"] * 8, "no")]


def test_load_vqav2(tmp_path: Path) -> None:
    q, a, images = _vqa_files(tmp_path, _questions(), _annotations())
    examples = load_vqav2(q, a, images)
    assert [e.example_id for e in examples] == ["420", "70", "130"]
    first = examples[0]
    assert (first.task, first.text, first.target) == ("vqa", "How many dogs?", "2")
    assert len(first.references) == 10 and first.references[0] == "Two"
    assert first.answer_scores == {"2": 1.0, "3": 1.0, "1": pytest.approx(1 / 3)}
    assert first.images == [images / "COCO_val2014_000000000042.jpg"]
    assert examples[1].images == [images / "000000000007.jpg"]
    assert examples[2].images == [images / "13.jpg"]
    assert examples[2].answer_scores == {"yes": pytest.approx(2 / 3), "no": 1.0}
    test_split = load_vqav2(q, None, images)
    assert all(e.target == "" and e.references == [] and e.answer_scores == {} for e in test_split)


def test_vqav2_errors(tmp_path: Path) -> None:
    questions = _questions() + [{"image_id": 99, "question": "Where?", "question_id": 990}]
    q, a, images = _vqa_files(tmp_path, questions, _annotations())
    with pytest.raises(DataError, match=r"image id 99 not found in folder .*images"):
        load_vqav2(q, None, images)
    q.write_text(json.dumps({"questions": _questions() + [
        {"image_id": 42, "question": "Extra?", "question_id": 421}]}))
    with pytest.raises(DataError, match=r"question_id 421 has no annotation"):
        load_vqav2(q, a, images)
    a.write_text('{"annotations": [')
    with pytest.raises(DataError, match=re.escape(str(a)) + ".*malformed JSON"):
        load_vqav2(q, a, images)
    q.write_text(json.dumps({"questions": [{"image_id": 42, "question_id": 1}]}))
    with pytest.raises(DataError, match=r"questions\[0\].*'question'"):
        load_vqav2(q, None, images)
    q.write_text(json.dumps({"info": {}}))
    with pytest.raises(DataError, match="'questions'"):
        load_vqav2(q, None, images)
    with pytest.raises(DataError, match="not found"):
        load_vqav2(tmp_path / "absent.json", None, images)
    q.write_text(json.dumps({"questions": _questions()}))
    with pytest.raises(DataError, match="image folder not found"):
        load_vqav2(q, None, tmp_path / "no_such_dir")


# ----------------------------------------------------------------------------- COCO captions


def _coco_file(tmp_path: Path, annotations: list[dict]) -> tuple[Path, Path]:
    images = tmp_path / "val2014"
    images.mkdir(exist_ok=True)
    for name in ("COCO_val2014_000000000001.jpg", "000000000002.jpg"):
        Image.new("RGB", (8, 8)).save(images / name, format="JPEG")
    data = {"info": {}, "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"}],
            "annotations": annotations}
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(data))
    return path, images


def test_load_coco_captions(tmp_path: Path) -> None:
    anns = [{"image_id": 1, "id": 10, "caption": "A dog runs. "},
            {"image_id": 2, "id": 11, "caption": "A cat."},
            {"image_id": 1, "id": 12, "caption": "a running dog"}]
    path, images = _coco_file(tmp_path, anns)
    first, second = load_coco_captions(path, images)
    assert (first.task, first.text, first.target) == ("caption", "", "A dog runs.")
    assert first.references == ["A dog runs.", "a running dog"] and first.example_id == "1"
    assert first.images == [images / "COCO_val2014_000000000001.jpg"]
    # file_name absent on disk: found through the id-based name instead.
    assert second.images == [images / "000000000002.jpg"] and second.references == ["A cat."]


def test_coco_errors(tmp_path: Path) -> None:
    good = [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]
    path, images = _coco_file(tmp_path, good)
    (images / "000000000002.jpg").unlink()
    with pytest.raises(DataError, match=r"image id 2 .*not found in folder .*val2014"):
        load_coco_captions(path, images)
    path, images = _coco_file(tmp_path, good + [{"image_id": 5, "caption": "z"}])
    with pytest.raises(DataError, match=r"annotations\[2\].*image_id 5"):
        load_coco_captions(path, images)
    path, images = _coco_file(tmp_path, good[:1])
    with pytest.raises(DataError, match="image id 2 has no captions"):
        load_coco_captions(path, images)
    path, images = _coco_file(tmp_path, [{"image_id": 1}])
    with pytest.raises(DataError, match=r"annotations\[0\].*'caption'"):
        load_coco_captions(path, images)
    path.write_text("{not json")
    with pytest.raises(DataError, match="malformed JSON"):
        load_coco_captions(path, images)


def test_the_shifted_domain_outlines_shapes_on_a_dark_noisy_background() -> None:
    from petserve.adapters.data.synthetic import SHIFTED_BACKGROUND, Scene, Shape, render_shifted
    scene = Scene(112, (Shape("square", "red", 20, 20, 60),))
    a, b = np.asarray(render_shifted(scene, 3)), np.asarray(render_shifted(scene, 3))
    assert (a == b).all() and not (a == np.asarray(render_shifted(scene, 4))).all()
    corner, inside, edge = a[2:10, 2:10], a[40:60, 40:60], a[20, 30:70]
    for patch in (corner, inside):             # unfilled: the inside is background too
        assert abs(patch.mean(axis=(0, 1)) - np.array(SHIFTED_BACKGROUND)).max() < 8
    assert edge[:, 0].mean() > 150 and edge[:, 1].mean() < 100      # the red outline
    assert a.std() > 5                                             # noise
