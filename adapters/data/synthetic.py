"""Synthetic "shapes" demo tasks: tiny, deterministic VQA / captioning data.

Each scene is a light-gray canvas with 1-5 non-overlapping coloured shapes. The
demo tasks ask about colour, shape and count, or caption the scene, so an adapter
can be trained and checked end to end in seconds without downloading datasets.
Video variants move the same shapes a little between frames.

All randomness goes through ``random.Random(seed)``: the same seed always gives
the same examples, independent of any global RNG state.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from petserve.adapters.data.records import Example

DEMO_TASKS = ("colors", "shapes", "count", "caption")
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "orange": (245, 140, 0),
    "purple": (140, 40, 170),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (200, 200, 200)
IMAGE_SIZE = 224
MIN_SHAPE, MAX_SHAPE = 40, 90  # pixel sizes at IMAGE_SIZE; scaled for other canvases
NUMBER_WORDS = ("one", "two", "three", "four", "five")
QUESTIONS = {
    "colors": "what color is the shape?",
    "shapes": "what shape is it?",
    "count": "how many shapes are there?",
    "caption": "",
}
# The demo's second language (docs/METHODS.md, "Composition"): the same world in French words.
LANGUAGES = ("en", "fr")
FRENCH = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "orange": "orange",
          "purple": "violet", "white": "blanc", "black": "noir", "circle": "cercle",
          "square": "carre", "triangle": "triangle", "one": "un", "two": "deux", "three": "trois",
          "four": "quatre", "five": "cinq"}
QUESTIONS_FR = {
    "colors": "de quelle couleur est la forme ?",
    "shapes": "quelle est la forme ?",
    "count": "combien de formes y a-t-il ?",
    "caption": "",
}
# The generated-adapter task family (docs/METHODS.md, "Generated adapters"): an attribute (one of
# the QA demo tasks) answered in a style. A code word is an unrelated word of the tiny vocabulary,
# from a fixed random table.
ATTRIBUTES = ("colors", "shapes", "count")
STYLES = ("english", "french", "upper", "code")
_ANSWER_WORDS = COLORS + SHAPES + NUMBER_WORDS
CODE_WORDS = dict(zip(_ANSWER_WORDS, random.Random(20241108).sample(
    ["image", "picture", "photo", "video", "frame", "scene", "thing", "things", "kind", "type",
     "size", "top", "bottom", "middle", "center", "here", "this", "that", "these", "those", "big",
     "small", "large", "little", "zero", "six", "seven", "eight", "nine", "ten", "gray", "brown",
     "pink", "star", "rectangle"], len(_ANSWER_WORDS))))
_GAP = 4  # keeps shapes visibly apart so "count" is unambiguous to a human too
_MAX_TRIES = 200
_MAX_RESTARTS = 50


@dataclass(frozen=True)
class Shape:
    """One shape occupying the square box [x, x+size) x [y, y+size)."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    @property
    def center(self) -> tuple[int, int]:
        return self.x + self.size // 2, self.y + self.size // 2

    def overlaps(self, other: Shape, gap: int = 0) -> bool:
        return not (
            self.x + self.size + gap <= other.x
            or other.x + other.size + gap <= self.x
            or self.y + self.size + gap <= other.y
            or other.y + other.size + gap <= self.y
        )


@dataclass(frozen=True)
class Scene:
    """A canvas of ``size`` x ``size`` pixels with its shapes."""

    size: int
    shapes: tuple[Shape, ...]


def _check_task(task_id: str) -> None:
    if task_id not in DEMO_TASKS:
        raise ValueError(f"unknown demo task {task_id!r}; valid ids: {', '.join(DEMO_TASKS)}")


def _num_shapes(task_id: str, rng: random.Random) -> int:
    if task_id == "count":
        return rng.randint(1, len(NUMBER_WORDS))
    if task_id == "caption":
        return rng.randint(1, 2)
    return 1


def sample_scene(rng: random.Random, num_shapes: int, size: int = IMAGE_SIZE) -> Scene:
    """Place ``num_shapes`` random shapes fully inside the canvas without overlap.

    Rejection sampling: each failed placement redraws the size too, so smaller
    shapes get tried when the canvas is crowded; a stuck scene restarts. Raises
    ValueError when the shapes cannot fit (far more than the demo's 5 per canvas).
    """
    lo = max(4, round(MIN_SHAPE * size / IMAGE_SIZE))
    hi = max(lo, round(MAX_SHAPE * size / IMAGE_SIZE))
    for _ in range(_MAX_RESTARTS):
        placed: list[Shape] = []
        for _ in range(num_shapes):
            shape = _place_one(rng, placed, size, lo, hi)
            if shape is None:
                break
            placed.append(shape)
        if len(placed) == num_shapes:
            return Scene(size=size, shapes=tuple(placed))
    raise ValueError(f"cannot place {num_shapes} non-overlapping shapes on a {size}px canvas")


def _place_one(rng: random.Random, placed: list[Shape], size: int, lo: int, hi: int) -> Shape | None:
    kind, color = rng.choice(SHAPES), rng.choice(COLORS)
    for _ in range(_MAX_TRIES):
        side = rng.randint(lo, hi)
        cand = Shape(kind, color, rng.randint(0, size - side), rng.randint(0, size - side), side)
        if not any(cand.overlaps(other, _GAP) for other in placed):
            return cand
    return None


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image on the gray background."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = COLOR_RGB[s.color]
        box = (s.x, s.y, s.x + s.size - 1, s.y + s.size - 1)
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # apex up: the box centre is inside, which the tests rely on
            draw.polygon([(box[0], box[3]), (box[2], box[3]), (s.center[0], box[1])], fill=fill)
    return img


def word(english: str, lang: str = "en") -> str:
    """A colour, shape or number word of the demo world in ``lang``."""
    return english if lang == "en" else FRENCH[english]


def object_name(s: Shape, lang: str = "en") -> str:
    """``red circle`` / ``cercle rouge`` (French puts the colour after the noun)."""
    if lang == "en":
        return f"{s.color} {s.shape}"
    return f"{FRENCH[s.shape]} {FRENCH[s.color]}"


def question_for(task_id: str, lang: str = "en") -> str:
    _check_task(task_id)
    _check_lang(lang)
    return (QUESTIONS if lang == "en" else QUESTIONS_FR)[task_id]


# The shifted target domain of the cache-classification demo (docs/METHODS.md, "Cache
# classification"): outlined, unfilled shapes on a dark background, with Gaussian pixel noise.
SHIFTED_BACKGROUND = (40, 40, 40)
SHIFTED_NOISE_STD = 12.0


def render_shifted(scene: Scene, seed: int, outline: int | None = None) -> Image.Image:
    """The scene in the shifted domain; the noise is drawn from ``seed`` (same seed, same
    pixels)."""
    img = Image.new("RGB", (scene.size, scene.size), SHIFTED_BACKGROUND)
    draw = ImageDraw.Draw(img)
    width = outline or max(2, scene.size // 14)       # 16 px at 224, 4 px at the tiny ViT's 56
    for sh in scene.shapes:
        color = COLOR_RGB[sh.color]
        box = (sh.x, sh.y, sh.x + sh.size - 1, sh.y + sh.size - 1)
        if sh.shape == "circle":
            draw.ellipse(box, outline=color, width=width)
        elif sh.shape == "square":
            draw.rectangle(box, outline=color, width=width)
        else:
            pts = [(box[0], box[3]), (box[2], box[3]), (sh.center[0], box[1])]
            draw.line([*pts, pts[0]], fill=color, width=width, joint="curve")
    noise = np.random.default_rng(seed).normal(0.0, SHIFTED_NOISE_STD, (scene.size, scene.size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def answer_for(task_id: str, shapes: tuple[Shape, ...], lang: str = "en") -> str:
    """The target string of ``task_id`` for a scene in ``lang`` (captions list shapes left to
    right: ``a red circle and a blue square``, ``un cercle rouge et un carre bleu``)."""
    _check_task(task_id)
    _check_lang(lang)
    if task_id == "colors":
        return word(shapes[0].color, lang)
    if task_id == "shapes":
        return word(shapes[0].shape, lang)
    if task_id == "count":
        return word(NUMBER_WORDS[len(shapes) - 1], lang)
    ordered = sorted(shapes, key=lambda s: (s.center[0], s.center[1]))
    article, conj = ("a", " and ") if lang == "en" else ("un", " et ")
    return conj.join(f"{article} {object_name(s, lang)}" for s in ordered)


def styled(answer: str, style: str) -> str:
    """A demo answer word in a style of the generated-adapter family."""
    if style == "english":
        return answer
    if style == "french":
        return FRENCH[answer]
    if style == "upper":
        return answer.upper()
    if style == "code":
        return CODE_WORDS[answer]
    raise ValueError(f"unknown answer style {style!r}; valid: {', '.join(STYLES)}")


def make_styled_examples(attribute: str, style: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of a QA demo task (``attribute``) whose answers are in ``style``."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    out = []
    for ex in make_demo_examples(attribute, n, seed):
        a = styled(ex.target, style)
        out.append(replace(ex, target=a, references=[a], example_id=f"{ex.example_id}-{style}"))
    return out


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(f"unknown demo language {lang!r}; valid: {', '.join(LANGUAGES)}")


def make_demo_scenes(task_id: str, n: int, seed: int, size: int = IMAGE_SIZE) -> list[Scene]:
    """The scenes behind ``make_demo_examples(task_id, n, seed)`` (same seed, same scenes)."""
    _check_task(task_id)
    rng = random.Random(seed)
    return [sample_scene(rng, _num_shapes(task_id, rng), size) for _ in range(n)]


CLASS_LABELS = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)    # the caps-24 classes


def make_class_scenes(label: str, n: int, seed: int, size: int = IMAGE_SIZE) -> list[Scene]:
    """``n`` one-shape scenes of the class ``label`` ("{color} {shape}", :data:`CLASS_LABELS`),
    placed and sized at random, deterministic in ``seed``."""
    color, _, shape = label.partition(" ")
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"unknown class {label!r}; classes are '<color> <shape>' of "
                         f"{', '.join(COLORS)} x {', '.join(SHAPES)}")
    rng = random.Random(f"{seed}:{label}")
    return [Scene(size, (replace(sample_scene(rng, 1, size).shapes[0], shape=shape, color=color),))
            for _ in range(n)]


def make_demo_examples(task_id: str, n: int, seed: int, lang: str = "en") -> list[Example]:
    """``n`` image examples of a demo task, deterministic in ``seed``; questions and answers in
    ``lang`` (the same seed draws the same scenes in every language).

    ``task_id`` is one of :data:`DEMO_TASKS`; anything else raises ValueError.
    """
    task = "caption" if task_id == "caption" else "vqa"
    question, out = question_for(task_id, lang), []
    suffix = "" if lang == "en" else f"-{lang}"
    for i, scene in enumerate(make_demo_scenes(task_id, n, seed)):
        answer = answer_for(task_id, scene.shapes, lang)
        out.append(Example(
            task=task, text=question, target=answer, references=[answer],
            images=[render_scene(scene)], example_id=f"{task_id}{suffix}-{seed}-{i}",
        ))
    return out


def make_demo_video_examples(
    task_id: str, n: int, seed: int, num_frames: int = 8, size: int = 112
) -> list[Example]:
    """``n`` video examples: ``frames`` is a (num_frames, size, size, 3) uint8 array.

    Shapes start without overlap and translate smoothly (constant velocity,
    clamped to the frame). Caption order is left to right in the first frame.
    """
    _check_task(task_id)
    rng = random.Random(seed)
    task = "video_caption" if task_id == "caption" else "video_qa"
    out = []
    for i in range(n):
        scene = sample_scene(rng, _num_shapes(task_id, rng), size)
        frames = _animate(scene, num_frames, rng)
        answer = answer_for(task_id, scene.shapes)
        out.append(Example(
            task=task, text=QUESTIONS[task_id], target=answer, references=[answer],
            frames=frames, example_id=f"video-{task_id}-{seed}-{i}",
        ))
    return out


def _animate(scene: Scene, num_frames: int, rng: random.Random) -> np.ndarray:
    max_speed = max(1.0, scene.size / 48)  # "a little": a few pixels per frame
    velocities = [(rng.uniform(-max_speed, max_speed), rng.uniform(-max_speed, max_speed))
                  for _ in scene.shapes]
    frames = np.empty((num_frames, scene.size, scene.size, 3), dtype=np.uint8)
    for t in range(num_frames):
        moved = tuple(_move(s, vx * t, vy * t, scene.size) for s, (vx, vy) in zip(scene.shapes, velocities))
        frames[t] = np.asarray(render_scene(Scene(scene.size, moved)))
    return frames


def _move(s: Shape, dx: float, dy: float, size: int) -> Shape:
    limit = size - s.size
    return replace(s, x=min(max(round(s.x + dx), 0), limit), y=min(max(round(s.y + dy), 0), limit))


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Encode (T, H, W, 3) uint8 ``frames`` as an mp4 (h264 when PyAV has it, else mpeg4).

    H and W must be even (yuv420p). Returns the path written.
    """
    import av  # optional dependency: only needed to write demo videos

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {frames.shape[1:3]}")
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(_video_codec(av), rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))  # flush delayed packets
    return path


def _video_codec(av_module) -> str:
    for name in ("libx264", "h264"):
        try:
            av_module.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises different types per version for unknown codecs
            continue
    return "mpeg4"


def write_jsonl_dataset(directory: str | Path, examples: list[Example]) -> Path:
    """Save media files and a ``data.jsonl`` readable by ``load_jsonl``; return its path.

    Images become PNGs and array videos mp4s (paths in the JSONL are relative).
    Examples must carry exactly the fields their task's JSONL record shape needs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        images = []
        for k, img in enumerate(ex.load_images()):
            name = f"{i:06d}_{k}.png"
            img.save(directory / name)
            images.append(name)
        record = _record_for(ex, images, _save_video(directory, i, ex.frames))
        lines.append(json.dumps(record, ensure_ascii=False))
    out = directory / "data.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _save_video(directory: Path, index: int, frames: np.ndarray | Path | None) -> str | None:
    if frames is None:
        return None
    if isinstance(frames, np.ndarray):
        return write_video(directory / f"{index:06d}.mp4", frames).name
    name = f"{index:06d}{Path(frames).suffix}"
    shutil.copyfile(frames, directory / name)
    return name


def _record_for(ex: Example, images: list[str], video: str | None) -> dict:
    # Keep the target first so load_jsonl's "target = first caption" round-trips.
    refs = [ex.target] + [r for r in ex.references if r != ex.target]
    needs_image = ex.task in ("vqa", "gqa", "caption")
    if (needs_image and not images) or (ex.task.startswith("video") and video is None):
        raise ValueError(f"example {ex.example_id!r} ({ex.task}) has no media to write")
    record: dict = {"id": ex.example_id} if ex.example_id else {}
    if ex.task in ("vqa", "gqa"):
        record.update(image=images[0], question=ex.text, answer=ex.target)
        if ex.references and ex.references != [ex.target]:
            record["answers"] = list(ex.references)
        if ex.task == "gqa":
            record["task"] = "gqa"
    elif ex.task == "nlvr":
        record.update(images=images, statement=ex.text, label=ex.target == "true")
    elif ex.task == "caption":
        record.update(image=images[0], captions=refs)
    elif ex.task == "video_qa":
        record.update(video=video, question=ex.text, answer=ex.target)
    else:
        record.update(video=video, captions=refs)
    return record
