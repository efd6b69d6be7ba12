"""The record type shared by every dataset loader, the demo generator and the metrics.

An :class:`Example` is deliberately model-agnostic: it carries the raw question /
statement text and the target string, and the model adds its own task prefix
("vqa: ...", "caption:", ...). Media can stay on disk (``pathlib.Path``) until
the batch is built, so loading a large annotation file does not decode images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from petserve.adapters.tasks import TASK_NAMES as TASKS

# NLVR2 pairs two images; every other task uses at most one.
MAX_IMAGES = 2


class DataError(ValueError):
    """A dataset file or record is unusable.

    The message always names the offending file (and line / record index when
    there is one) and what is wrong, so a user can fix the data without a debugger.
    """


@dataclass
class Example:
    """One training / evaluation example.

    Contract:
      * ``task`` is one of :data:`TASKS`.
      * ``text`` is the question or statement; ``""`` for captioning.
      * ``target`` is the single string to train on; ``references`` lists every
        acceptable answer / reference caption (used by the metrics). ``target`` may
        be ``""`` and ``references`` empty for unlabelled test splits.
      * ``images`` holds 0-2 items, each an RGB ``PIL.Image.Image`` or a ``Path``.
      * ``frames`` is a ``(T, H, W, 3)`` uint8 array, a video file path, or None.
      * ``answer_scores`` maps normalized answers to VQAv2 soft scores in [0, 1].
    """

    task: str
    text: str
    target: str
    references: list[str]
    images: list = field(default_factory=list)
    frames: np.ndarray | Path | None = None
    answer_scores: dict[str, float] = field(default_factory=dict)
    example_id: str = ""

    def __post_init__(self) -> None:
        # Programming errors, not data errors: fail at construction, not deep in a batch.
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if len(self.images) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images per example, got {len(self.images)}")

    def load_images(self) -> list[Image.Image]:
        """Return the images as RGB PIL images, opening paths from disk.

        Raises DataError naming the path when a file is missing or not a readable image.
        """
        return [_as_rgb(item) for item in self.images]


def _as_rgb(item: Image.Image | Path | str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    path = Path(item)
    try:
        with Image.open(path) as img:
            # convert() forces a full decode inside the try, so truncated files fail here.
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
