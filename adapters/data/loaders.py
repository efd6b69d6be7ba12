"""Dataset loaders: the project's JSONL format, official VQAv2 and COCO captions.

Every loader validates eagerly and raises :class:`DataError` whose message names
the file, the line / record index and the problem; media paths are checked for
existence at load time but decoded lazily (``Example.images`` holds ``Path``s).

JSONL record shapes (one JSON object per line, media paths relative to the file):
  * VQA:      {"image", "question", "answer"} and/or "answers": [...]; optional "task": "gqa"
  * NLVR2:    {"images": [p1, p2], "statement", "label": true|false}
  * caption:  {"image", "caption"} or {"image", "captions": [...]}
  * video:    {"video", "question", "answer"} or {"video", "caption" | "captions"}
All shapes accept an optional "id" (string or integer).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from petserve.adapters.data.records import DataError, Example
from petserve.adapters.metrics import normalize_vqa_answer, vqa_answer_scores

_ALLOWED = {
    "vqa": {"image", "question", "answer", "answers", "task", "id"},
    "nlvr": {"images", "statement", "label", "id"},
    "caption": {"image", "caption", "captions", "id"},
    "video_qa": {"video", "question", "answer", "id"},
    "video_caption": {"video", "caption", "captions", "id"},
}
_MEDIA_KEYS = ("image", "images", "video")
# COCO_{split}2014_{id:012d}.jpg, {id:012d}.jpg and {id}.jpg all end in "<digits>.jpg".
_IMAGE_NAME = re.compile(r"^(?:.*_)?(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


# ----------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | Path) -> list[Example]:
    """Load a JSONL dataset (see the module docstring for the record shapes).

    Blank lines are skipped; a file without records is an error.
    """
    path = Path(path)
    examples = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        examples.append(_parse_record(record, path.parent, where, f"{path.stem}:{lineno}"))
    if not examples:
        raise DataError(f"{path}: empty file (no records)")
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from None


def _parse_record(record: dict, base: Path, where: str, default_id: str) -> Example:
    kind = _classify(record, where)
    extra = sorted(set(record) - _ALLOWED[kind])
    if extra:
        raise DataError(f"{where}: unknown combination of fields: {extra} not allowed in a "
                        f"{kind} record (allowed: {sorted(_ALLOWED[kind])})")
    ex = _BUILDERS[kind](record, base, where)
    ex.example_id = _record_id(record, where, default_id)
    return ex


def _classify(record: dict, where: str) -> str:
    media = [k for k in _MEDIA_KEYS if k in record]
    if not media:
        raise DataError(f"{where}: missing required field: one of 'image', 'images', 'video'")
    if len(media) > 1:
        raise DataError(f"{where}: unknown combination of fields: {media} in one record")
    has_q = "question" in record
    has_cap = "caption" in record or "captions" in record
    if media[0] == "images":
        return "nlvr"
    if has_q and has_cap:
        raise DataError(f"{where}: unknown combination of fields: both a question and a caption")
    if not (has_q or has_cap):
        raise DataError(f"{where}: missing required field: 'question' or 'caption'/'captions' "
                        f"for an {media[0]!r} record")
    if media[0] == "image":
        return "vqa" if has_q else "caption"
    return "video_qa" if has_q else "video_caption"


def _record_id(record: dict, where: str, default: str) -> str:
    value = record.get("id", default)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field 'id' must be a string or integer, got {type(value).__name__}")
    return str(value)


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing required field {key!r}")
    return record[key]


def _text(record: dict, key: str, where: str) -> str:
    """A required, non-empty string field (stripped)."""
    value = _field(record, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value.strip()


def _text_list(record: dict, key: str, where: str) -> list[str]:
    """A required, non-empty list of non-empty strings (stripped)."""
    value = _field(record, key, where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings")
    if not value or not all(v.strip() for v in value):
        raise DataError(f"{where}: field {key!r} is empty or contains an empty string")
    return [v.strip() for v in value]


def _media(value: Any, key: str, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty path string")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: {key} file not found: {path}")
    return path


def _captions(record: dict, where: str) -> list[str]:
    if "caption" in record and "captions" in record:
        raise DataError(f"{where}: unknown combination of fields: both 'caption' and 'captions'")
    if "caption" in record:
        return [_text(record, "caption", where)]
    return _text_list(record, "captions", where)


def _build_vqa(record: dict, base: Path, where: str) -> Example:
    task = record.get("task", "vqa")
    if task not in ("vqa", "gqa"):
        raise DataError(f"{where}: field 'task' must be 'vqa' or 'gqa', got {task!r}")
    image = _media(_field(record, "image", where), "image", base, where)
    question = _text(record, "question", where)
    if "answers" not in record:
        answer = _text(record, "answer", where)
        return Example(task, question, answer, [answer], images=[image])
    answers = _text_list(record, "answers", where)
    # An explicit "answer" wins (e.g. VQAv2's multiple_choice_answer); else the majority.
    target = _text(record, "answer", where) if "answer" in record else _most_frequent(answers)
    return Example(task, question, target, answers, images=[image],
                   answer_scores=vqa_answer_scores(answers))


def _most_frequent(answers: list[str]) -> str:
    # Counter keeps first-seen order on ties, so the result is deterministic.
    return Counter(normalize_vqa_answer(a) for a in answers).most_common(1)[0][0]


def _build_nlvr(record: dict, base: Path, where: str) -> Example:
    paths = _field(record, "images", where)
    if not isinstance(paths, list) or len(paths) != 2:
        raise DataError(f"{where}: field 'images' must be a list of exactly 2 paths")
    images = [_media(p, "images", base, where) for p in paths]
    statement = _text(record, "statement", where)
    label = _field(record, "label", where)
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be a boolean (true/false), got {label!r}")
    target = "true" if label else "false"
    return Example("nlvr", statement, target, [target], images=images)


def _build_caption(record: dict, base: Path, where: str) -> Example:
    image = _media(_field(record, "image", where), "image", base, where)
    caps = _captions(record, where)
    return Example("caption", "", caps[0], caps, images=[image])


def _build_video_qa(record: dict, base: Path, where: str) -> Example:
    video = _media(_field(record, "video", where), "video", base, where)
    question, answer = _text(record, "question", where), _text(record, "answer", where)
    return Example("video_qa", question, answer, [answer], frames=video)


def _build_video_caption(record: dict, base: Path, where: str) -> Example:
    video = _media(_field(record, "video", where), "video", base, where)
    caps = _captions(record, where)
    return Example("video_caption", "", caps[0], caps, frames=video)


_BUILDERS = {
    "vqa": _build_vqa,
    "nlvr": _build_nlvr,
    "caption": _build_caption,
    "video_qa": _build_video_qa,
    "video_caption": _build_video_caption,
}


# ----------------------------------------------------------------------------- shared JSON helpers


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise DataError(f"{path}: malformed JSON at {where}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


def _list_of_dicts(data: dict, key: str, path: Path) -> list[dict]:
    value = data.get(key)
    if value is None:
        raise DataError(f"{path}: missing top-level key {key!r}")
    if not isinstance(value, list):
        raise DataError(f"{path}: top-level {key!r} must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"{path}: {key}[{i}] must be an object")
    return value


def _typed(item: dict, key: str, kind: type, where: str) -> Any:
    if key not in item:
        raise DataError(f"{where}: missing key {key!r}")
    value = item[key]
    # bool is an int subclass; an id of `true` is a data bug, not an id.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"{where}: key {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _image_index(image_dir: Path) -> dict[int, Path]:
    """Map image id -> file by listing ``image_dir`` once (sorted, first name wins)."""
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    index: dict[int, Path] = {}
    for path in sorted(image_dir.iterdir()):
        match = _IMAGE_NAME.match(path.name)
        if match and path.is_file():
            index.setdefault(int(match.group(1)), path)
    return index


# ----------------------------------------------------------------------------- VQAv2


def load_vqav2(
    questions_json: str | Path, annotations_json: str | Path | None, image_dir: str | Path
) -> list[Example]:
    """Load official VQAv2 question (+ annotation) files; one Example per question.

    ``annotations_json=None`` means an unlabelled test split: target "" and no scores.
    Otherwise target is the normalized ``multiple_choice_answer``, references the
    human answers and answer_scores ``min(1, count / 3)`` per normalized answer.
    """
    qpath, image_dir = Path(questions_json), Path(image_dir)
    questions = _list_of_dicts(_read_json(qpath), "questions", qpath)
    annotations = None if annotations_json is None else _vqa_annotations(Path(annotations_json))
    images = _image_index(image_dir)
    out = []
    for i, q in enumerate(questions):
        where = f"{qpath}: questions[{i}]"
        qid = _typed(q, "question_id", int, where)
        image_id = _typed(q, "image_id", int, where)
        text = _typed(q, "question", str, where)
        if image_id not in images:
            raise DataError(f"{where}: image id {image_id} not found in folder {image_dir} "
                            f"(looked for *_{image_id:012d}.jpg, {image_id:012d}.jpg, {image_id}.jpg)")
        ex = Example("vqa", text.strip(), "", [], images=[images[image_id]], example_id=str(qid))
        if annotations is not None:
            if qid not in annotations:
                raise DataError(f"{where}: question_id {qid} has no annotation in {annotations_json}")
            ex.target, ex.references = annotations[qid]
            ex.answer_scores = vqa_answer_scores(ex.references)
        out.append(ex)
    return out


def _vqa_annotations(path: Path) -> dict[int, tuple[str, list[str]]]:
    """question_id -> (normalized multiple-choice answer, human answers)."""
    result = {}
    for i, ann in enumerate(_list_of_dicts(_read_json(path), "annotations", path)):
        where = f"{path}: annotations[{i}]"
        qid = _typed(ann, "question_id", int, where)
        mc = _typed(ann, "multiple_choice_answer", str, where)
        answers = _typed(ann, "answers", list, where)
        if not answers:
            raise DataError(f"{where}: 'answers' is empty")
        result[qid] = (normalize_vqa_answer(mc), _human_answers(answers, where))
    return result


def _human_answers(answers: list, where: str) -> list[str]:
    out = []
    for j, item in enumerate(answers):
        if not isinstance(item, dict):
            raise DataError(f"{where}: answers[{j}] must be an object")
        out.append(_typed(item, "answer", str, f"{where}: answers[{j}]"))
    return out


# ----------------------------------------------------------------------------- COCO captions


def load_coco_captions(captions_json: str | Path, image_dir: str | Path) -> list[Example]:
    """Load a COCO captions file; one Example per image (in ``images`` order).

    target is the image's first caption, references all its captions. Images are
    found by ``file_name`` in ``image_dir``, falling back to the id-based names.
    """
    path, image_dir = Path(captions_json), Path(image_dir)
    files, captions = _coco_tables(_read_json(path), path)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found")
    index: dict[int, Path] | None = None
    out = []
    for image_id, name in files.items():
        if image_id not in captions:
            raise DataError(f"{path}: image id {image_id} has no captions in 'annotations'")
        image = image_dir / name
        if not image.is_file():
            index = _image_index(image_dir) if index is None else index
            if image_id not in index:
                raise DataError(f"{path}: image id {image_id} ({name}) not found in folder {image_dir}")
            image = index[image_id]
        caps = captions[image_id]
        out.append(Example("caption", "", caps[0], caps, images=[image], example_id=str(image_id)))
    return out


def _coco_tables(data: dict, path: Path) -> tuple[dict[int, str], dict[int, list[str]]]:
    """(image id -> file name, image id -> captions in file order), validated."""
    files: dict[int, str] = {}
    for i, img in enumerate(_list_of_dicts(data, "images", path)):
        where = f"{path}: images[{i}]"
        files[_typed(img, "id", int, where)] = _typed(img, "file_name", str, where)
    captions: dict[int, list[str]] = {}
    for i, ann in enumerate(_list_of_dicts(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image_id, caption = _typed(ann, "image_id", int, where), _typed(ann, "caption", str, where)
        if image_id not in files:
            raise DataError(f"{where}: image_id {image_id} is not listed in 'images'")
        if not caption.strip():
            raise DataError(f"{where}: empty caption")
        captions.setdefault(image_id, []).append(caption.strip())
    return files, captions
