"""Tests for adapters.metrics: VQA normalization/accuracy, exact match, BLEU-4, CIDEr-D."""

from __future__ import annotations

import math

import pytest

from petserve.adapters.data.records import Example
from petserve.adapters.metrics import (
    bleu4,
    cider,
    exact_match,
    normalize_vqa_answer,
    tokenize_caption,
    vqa_accuracy,
    vqa_answer_scores,
    vqa_soft_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("yes!", "yes"),
        ("  YES  ", "yes"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldntve", "couldn't've"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("black/white", "black white"),
        ("yes, it is", "yes it is"),
        ("none", "0"),
        ("ten\tapples", "10 apples"),
        ("its", "its"),  # an ordinary word, must not become "it's"
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def _leave_one_out(matches: int, total: int = 10) -> float:
    """The VQAv2 formula written out independently of the implementation."""
    accs = []
    for i in range(total):
        others = matches - (1 if i < matches else 0)
        accs.append(min(1.0, others / 3))
    return sum(accs) / total


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert _leave_one_out(matches) == pytest.approx(expected)
    assert vqa_accuracy("cat", answers) == pytest.approx(_leave_one_out(matches))


def test_vqa_accuracy_normalizes_both_sides() -> None:
    answers = ["2", "Two", "two.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("TWO!", answers) == pytest.approx(0.9)


def test_vqa_accuracy_fewer_answers_and_errors() -> None:
    # 3 answers, 2 match: the matching ones see 1 other match, the other sees 2.
    assert vqa_accuracy("red", ["red", "red", "blue"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    assert vqa_accuracy("a red.", ["Red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])


def test_vqa_answer_scores() -> None:
    scores = vqa_answer_scores(["Two", "2", "two", "2", "three", "3"])
    assert scores == {"2": 1.0, "3": pytest.approx(2 / 3)}


def test_vqa_soft_accuracy() -> None:
    ten = Example("vqa", "q", "cat", ["cat"] * 3 + ["dog"] * 7)
    single = Example("vqa", "q", "yes", ["yes"])
    assert vqa_soft_accuracy(["cat", "Yes."], [ten, single]) == pytest.approx((0.9 + 1.0) / 2)
    assert vqa_soft_accuracy(["dog", "no"], [ten, single]) == pytest.approx(1.0 / 2)
    with pytest.raises(ValueError):
        vqa_soft_accuracy(["cat"], [ten, single])
    with pytest.raises(ValueError):
        vqa_soft_accuracy(["x"], [Example("vqa", "q", "", [])])


def test_exact_match() -> None:
    assert exact_match(["A  Red circle ", "blue"], ["a red circle", "green"]) == 0.5
    with pytest.raises(ValueError):
        exact_match([], [])


def test_tokenize_caption() -> None:
    assert tokenize_caption("A man's Dog, running!") == "a mans dog running"
    assert tokenize_caption("   ") == ""


def test_bleu4_identical_is_one() -> None:
    refs = [["a red circle and a blue square"], ["a green triangle on the left side"]]
    assert bleu4([r[0] for r in refs], refs) == pytest.approx(1.0, abs=1e-6)
    # Tokenization makes case and punctuation irrelevant.
    assert bleu4(["A red circle, and a blue square."], refs[:1]) == pytest.approx(1.0, abs=1e-6)


def test_bleu4_by_hand() -> None:
    # hyp: a red circle and a blue square / ref: a red circle and a green square
    # clipped matches / candidates: 1-gram 6/7, 2-gram 4/6, 3-gram 3/5, 4-gram 2/4; BP = 1.
    expected = (6 / 7 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    score = bleu4(["a red circle and a blue square"], [["a red circle and a green square"]])
    assert score == pytest.approx(expected, abs=1e-6)


def test_bleu4_brevity_penalty() -> None:
    # Every n-gram of the 4-word hypothesis matches, but the reference has 8 words.
    score = bleu4(["a red circle and"], [["a red circle and a blue square today"]])
    assert score == pytest.approx(math.exp(1 - 8 / 4), abs=1e-6)


def test_bleu4_monotonic_and_empty() -> None:
    refs = [["a red circle and a blue square on the left"]]
    good = bleu4(["a red circle and a blue square on the right"], refs)
    bad = bleu4(["a red square and a blue circle in the middle"], refs)
    assert 0.0 <= bad < good < 1.0
    assert bleu4([""], refs) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        bleu4(["x"], [[]])


_CORPUS_REFS = [
    ["red circle on top"],
    ["blue square at bottom"],
    ["green triangle near middle"],
]


def test_cider_identical_is_ten() -> None:
    # Disjoint vocabularies: every n-gram has idf log(3), all cosines are 1.
    preds = [r[0] for r in _CORPUS_REFS]
    assert cider(preds, _CORPUS_REFS) == pytest.approx(10.0)


def test_cider_by_hand() -> None:
    # Image 0: hyp "red circle" vs ref "red circle on top", equal idf weights:
    # cos(1-gram) = 2 / (sqrt(2) * 2), cos(2-gram) = 1 / sqrt(3), no 3/4-grams;
    # length penalty exp(-(2 - 4)^2 / (2 * 6^2)). Image 1 is identical -> 10.
    refs = _CORPUS_REFS[:2]
    img0 = 10 * (1 / math.sqrt(2) + 1 / math.sqrt(3)) / 4 * math.exp(-4 / 72)
    expected = (img0 + 10.0) / 2
    assert cider(["red circle", "blue square at bottom"], refs) == pytest.approx(expected)


def test_cider_monotonic_and_empty() -> None:
    refs = _CORPUS_REFS
    base = ["blue square at bottom", "green triangle near middle"]
    full = cider(["red circle on top"] + base, refs)
    partial = cider(["red circle"] + base, refs)
    wrong = cider(["yellow square"] + base, refs)
    assert full > partial > wrong
    assert cider([""] + base, refs) == pytest.approx(wrong)
    assert cider(["", ""], [["."], ["!"]]) == 0.0  # no tokens anywhere: no crash
