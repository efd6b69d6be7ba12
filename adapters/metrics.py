"""Evaluation metrics: VQAv2 soft accuracy, exact match, BLEU-4 and CIDEr-D.

VQA normalization follows the rules of the official VQA evaluation script
(punctuation handling, number words to digits, articles dropped, missing
apostrophes restored). BLEU-4 and CIDEr-D use the scorers of the COCO caption
evaluation (``pycocoevalcap``) with our own tokenizer, because its PTBTokenizer
needs Java: lowercase, drop apostrophes, other punctuation becomes whitespace.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # runtime import would be circular: the loaders import this module
    from petserve.adapters.data.records import Example

# The official script's punctuation list; "'" is absent on purpose (contractions) and
# "." is handled separately so decimals such as "2.5" survive.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions that annotators often type without the apostrophe. Forms whose
# apostrophe-less spelling is an ordinary word ("were", "well", "its", "shed") are left out.
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd "
    "he's how'd how'll how's i'm i've isn't it'd it'll let's ma'am mightn't might've mustn't "
    "must've needn't o'clock shan't should've shouldn't somebody's someone's something's "
    "that's there's they'd they'll they're they've wasn't weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'll who's who've why'll why're why's "
    "won't would've wouldn't y'all you'd you'll you're you've"
).split()
_CONTRACTIONS = {form.replace("'", ""): form for form in _CONTRACTED}
# Double contractions ("couldntve", "couldn'tve") map to the fully apostrophed form.
_CONTRACTIONS.update({
    variant: f"{stem}n't've"
    for stem in ("could", "should", "would", "might", "must")
    for variant in (f"{stem}ntve", f"{stem}n'tve", f"{stem}nt've")
})


def normalize_vqa_answer(answer: str) -> str:
    """Normalize an answer the way the official VQA evaluation does.

    Examples: "Two" -> "2", "a dog." -> "dog", "yes!" -> "yes", "dont" -> "don't".
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip_punctuation(text: str) -> str:
    # A mark touching a space or a digit-comma-digit number is deleted outright
    # ("1,000" -> "1000"); otherwise it separates words ("black/white" -> "black white").
    out = text
    glue = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if glue or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def vqa_answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """VQAv2 soft targets: ``min(1, count / 3)`` for each distinct normalized answer."""
    counts = Counter(normalize_vqa_answer(a) for a in answers)
    return {ans: min(1.0, n / 3.0) for ans, n in counts.items()}


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQAv2 accuracy of one prediction against its human answers.

    The mean over leave-one-out subsets of ``min(1, matches among the others / 3)``;
    10 answers with 3 matches give 0.9, 1 match gives 0.3. With a single answer
    there are no "others", so it degenerates to exact match after normalization.
    Raises ValueError for an empty answer list.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(a) == pred for a in human_answers]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3.0) for hit in hits) / len(hits)


def vqa_soft_accuracy(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Mean :func:`vqa_accuracy` of ``predictions`` against each example's ``references``.

    Raises ValueError on a length mismatch, no examples, or an example without references.
    """
    _check_lengths(predictions, examples)
    total = 0.0
    for i, (pred, ex) in enumerate(zip(predictions, examples)):
        if not ex.references:
            raise ValueError(f"example {i} ({ex.example_id!r}) has no reference answers")
        total += vqa_accuracy(pred, ex.references)
    return total / len(examples)


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target after lowercasing and collapsing spaces."""
    _check_lengths(predictions, targets)
    same = sum(_simple(p) == _simple(t) for p, t in zip(predictions, targets))
    return same / len(targets)


def _simple(text: str) -> str:
    return " ".join(text.lower().split())


def _check_lengths(predictions: Sequence, targets: Sequence) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not targets:
        raise ValueError("cannot score an empty set of predictions")


def tokenize_caption(text: str) -> str:
    """Caption tokenization used for BLEU / CIDEr (a Java-free stand-in for PTBTokenizer)."""
    text = text.lower().replace("'", "")
    return " ".join(re.sub(r"[^\w\s]|_", " ", text).split())


def _caption_corpus(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Tokenized (gts, res) dicts in the shape the COCO scorers expect."""
    _check_lengths(predictions, references)
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"prediction {i} has no reference captions")
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(p)] for i, p in enumerate(predictions)}
    return gts, res


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus-level BLEU-4 (closest reference length brevity penalty) as in COCO eval.

    Identical prediction and references score 1.0 (up to ~1e-9 smoothing). An empty
    prediction contributes zero matches but does not fail.
    """
    from pycocoevalcap.bleu.bleu import Bleu  # deferred: only caption evaluation needs it

    gts, res = _caption_corpus(predictions, references)
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(scores[3])


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (n=1..4, idf over the reference corpus, clipping, sigma=6, x10).

    idf comes from the references of this call, so scores are only meaningful over a
    corpus: an n-gram present in every image's references carries no weight (a
    one-image corpus always scores 0).
    """
    from pycocoevalcap.cider.cider import Cider  # deferred: only caption evaluation needs it

    gts, res = _caption_corpus(predictions, references)
    if not any(ref for refs in gts.values() for ref in refs):
        return 0.0  # the scorer divides by the largest document frequency, absent here
    score, _ = Cider().compute_score(gts, res)
    return float(score)
