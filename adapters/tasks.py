"""The tasks petserve knows, defined once: every list of task names in the code derives from here.

A task fixes the text prefix of the prompt (VL-T5's ``vqa:``, ``nlvr:``, ``caption:``), the media
it takes and whether its target is a caption (scored by BLEU/CIDEr, longer default generation). A
video task uses its image task's prefix, so one adapter trained on images and clips answers both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str                                   # prompt text: f"{prefix}: {text}"
    media: Literal["image", "pair", "video"]      # what the visual input is
    caption: bool = False                         # target is a caption (else an answer)

    @property
    def default_new_tokens(self) -> int:
        return 40 if self.caption else 20


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vqa", "vqa", "image"),
    Task("gqa", "gqa", "image"),
    Task("nlvr", "nlvr", "pair"),
    Task("caption", "caption", "image", caption=True),
    Task("video_qa", "vqa", "video"),
    Task("video_caption", "caption", "video", caption=True),
)}
TASK_NAMES = tuple(TASKS)
# the tasks a task-conditioned adapter (Hyperformer, multiple adapters) has entries for by default
ADAPTER_TASKS = ("vqa", "gqa", "nlvr", "caption")
# what /v1/vqa's `task` field may name (a video question is always video_qa)
QUESTION_TASKS = ("vqa", "gqa", "nlvr")


def get_task(name: str) -> Task:
    """The task called ``name``, or a ValueError listing the known ones."""
    task = TASKS.get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return task
