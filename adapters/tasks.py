"""The tasks petserve knows, defined once: every list of task names in the code derives from here.

A task fixes the text prefix of the prompt (VL-T5's ``vqa:``, ``nlvr:``, ``caption:``), the media
it takes, whether its target is a caption (scored by BLEU/CIDEr, longer default generation) and
whether it is answered by choosing between words (NLVR2: the likelier of ``true`` and ``false`` at
the first decoder position, as the seeds decide it) rather than by free generation. A
video task uses its image task's prefix, so one adapter trained on images and clips answers both.
``text`` is unlabelled text under the backbone's denoising objective (adapters/data/denoise.py), with
no prefix, as T5 pre-trains: what a language SFT learns from; no endpoint serves it.
``audio_classify`` is the audio family's one task (adapters/backbone/audio.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str                                   # prompt text: f"{prefix}: {text}"
    media: Literal["image", "pair", "video", "audio"]   # what the input is
    caption: bool = False                         # target is a caption (else an answer)
    choices: tuple[str, ...] = ()                 # answered by the likeliest of these words

    @property
    def default_new_tokens(self) -> int:
        return 40 if self.caption else 20


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vqa", "vqa", "image"),
    Task("gqa", "gqa", "image"),
    Task("nlvr", "nlvr", "pair", choices=("true", "false")),
    Task("caption", "caption", "image", caption=True),
    Task("video_qa", "vqa", "video"),
    Task("video_caption", "caption", "video", caption=True),
    Task("text", "", "image"),
    Task("audio_classify", "", "audio"),          # the audio family: a head over the labels
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


class InputFormat(BaseModel):
    """How an adapter's training inputs were built; the server builds a request's inputs the same
    way. Recorded in the adapter file's metadata (``inputs``); a file without one was made by
    petserve before this existed and gets these defaults, which are what it was trained with.

    - ``boxes``: ``grid`` = each visual token's real normalised box (ours); ``zero`` = all-zero
      boxes, as VL-Adapter and VL-PET fed grid features.
    - ``prompts``: task -> the exact string the text is appended to (the seeds' multitask code:
      ``"vqa: "``, ``"gpa: "`` (sic) for GQA, ``"nlvr: "``, ``"caption: "``); a video task falls
      back to its image task's entry. None = petserve's ``"{prefix}: {text}"``, stripped.
    - ``max_text_tokens``: task -> the tokenized prompt is truncated to this many tokens, special
      tokens included, keeping the final end-of-sequence token (the seeds: 20 for VQA and GQA, 40
      for captions, NLVR2 untruncated); a task without an entry is not truncated.
    - ``feature_grid``: precomputed features that form a square grid larger than this side are
      max-pooled to it (the seeds' ``--downsample``: CLIP RN101's 7x7 grid to 6x6 = 36 tokens).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    boxes: Literal["grid", "zero"] = "grid"
    prompts: dict[str, str] | None = None
    max_text_tokens: dict[str, Annotated[int, Field(ge=2)]] | None = None
    feature_grid: int | None = Field(None, ge=1)

    def prompt(self, task: str, text: str) -> str:
        """The text the tokenizer sees for ``task`` and the request's ``text``."""
        t = get_task(task)
        if self.prompts is None:
            if not t.prefix:
                return text
            return f"{t.prefix}: {text}".strip() if text else f"{t.prefix}:"
        prefix = self.prompts.get(t.name, self.prompts.get(t.prefix))
        if prefix is None:
            raise ValueError(f"the adapter records no prompt for task {task!r} "
                             f"(it has {sorted(self.prompts)})")
        return f"{prefix}{text}"

    def truncate(self, task: str, ids: list[int]) -> list[int]:
        """``ids`` cut to the task's ``max_text_tokens`` as Hugging Face's ``truncation=True``
        does: the text is cut, the special token that ends the sequence stays."""
        t = get_task(task)
        budgets = self.max_text_tokens or {}
        n = budgets.get(t.name, budgets.get(t.prefix))
        if n is None or len(ids) <= n:
            return ids
        return ids[:n - 1] + ids[-1:]


SEED_PROMPTS = {"vqa": "vqa: ", "gqa": "gpa: ", "nlvr": "nlvr: ", "caption": "caption: "}
SEED_INPUTS = InputFormat(boxes="zero", prompts=SEED_PROMPTS,
                          max_text_tokens={"vqa": 20, "gqa": 20, "caption": 40}, feature_grid=6)
