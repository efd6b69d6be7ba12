"""Denoising examples from unlabelled text: what a language SFT learns from (docs/METHODS.md §3).

The objective is the backbone family's own pre-training one:

- T5 *span corruption*: spans of the text are dropped, each replaced in the input by a sentinel
  (``<extra_id_0>``, ``<extra_id_1>``, ...); the target lists the words each hides, every span after
  the first behind its sentinel. ``a red circle`` -> input ``a <extra_id_0> circle``, target ``red``.
  T5 also opens the target with ``<extra_id_0>``; we leave that one implied, as a masked LM predicts
  only the hidden words: a language SFT that learns to open every answer with a sentinel makes a
  composed task SFT do the same (measured on the composition demo: every composed French answer
  began with ``<extra_id_0>`` and then filled a caption span; 0.23 accuracy).
- BART *text infilling*: each span becomes one ``<mask>`` in the input (a span may be empty: then a
  mask is inserted); the target is the whole original text.

Spans are whole words (whitespace-separated), so the same corruption suits the tiny word-level
tokenizer and the real sub-word ones, whose vocabularies hold these special tokens. The examples keep
their media (an image-conditioned caption counts as unlabelled text here) and become the ``text``
task: no prefix, as T5 pre-trains.
"""
from __future__ import annotations

import random
from dataclasses import replace

from petserve.adapters.data.records import Example

NOISE = 0.3          # share of a text's words hidden (short captions: more than T5's 15%)
MEAN_SPAN = 2.0      # mean words per hidden span
SENTINEL = "<extra_id_{}>"
MASK = "<mask>"
TEXT_TASK = "text"


def corrupt(text: str, rng: random.Random, family: str, noise: float = NOISE,
            mean_span: float = MEAN_SPAN) -> tuple[str, str]:
    """(input, target) of one text under ``family``'s objective ("t5" or "bart"). At least one
    word is hidden and one kept (a one-word text has that word hidden)."""
    words = text.split()
    if not words:
        raise ValueError("cannot corrupt an empty text")
    n = len(words)
    hidden = max(1, min(n - 1, round(n * noise))) if n > 1 else 1
    kept = n - hidden
    spans = max(1, min(hidden, kept + 1, round(hidden / mean_span)))
    lengths = _split(hidden, spans, rng)
    starts = sorted(rng.sample(range(kept + 1), spans))   # a span goes before kept word starts[i]
    inp, tgt, w, k = [], [], 0, 0
    for i, length in enumerate(lengths):
        while k < starts[i]:                                # kept words before this span
            inp.append(words[w])
            w, k = w + 1, k + 1
        span = words[w:w + length]
        w += length
        if family == "t5":
            inp.append(SENTINEL.format(i))
            tgt += [SENTINEL.format(i), *span] if i else span
        else:
            inp.append(MASK)
    inp += words[w:]
    if family == "t5":
        return " ".join(inp), " ".join(tgt)
    return " ".join(inp), text


def _split(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive integers summing to ``total``, uniformly over such compositions."""
    cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def denoising_examples(examples: list[Example], family: str, seed: int,
                       noise: float = NOISE) -> list[Example]:
    """Each example's target (a caption, an answer) as unlabelled text, corrupted once: the
    corrupted text becomes the input of a ``text`` example, the objective's target its target.
    Media stay."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        text, target = corrupt(ex.target, rng, family, noise)
        out.append(replace(ex, task=TEXT_TASK, text=text, target=target, references=[target],
                           answer_scores={}))
    return out
