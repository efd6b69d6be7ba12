"""The composition demo's inputs: the second language of the demo world, the tiny tokenizer's
special tokens, the bilingual grounding questions, and the denoising objectives language SFTs
learn from."""
from __future__ import annotations

import random

import pytest

from petserve.adapters.backbone.tokenizer import MASK, SENTINELS, TINY_VOCAB, tiny_tokenizer
from petserve.adapters.data import make_demo_examples
from petserve.adapters.data.denoise import corrupt, denoising_examples
from petserve.adapters.data.synthetic import FRENCH, Scene, Shape, answer_for
from petserve.adapters.training.pretrain import grounding_question


def test_french_examples_share_the_scenes_and_say_them_in_french():
    en, fr = make_demo_examples("colors", 20, 7), make_demo_examples("colors", 20, 7, lang="fr")
    assert [FRENCH[e.target] for e in en] == [f.target for f in fr]
    assert fr[0].text == "de quelle couleur est la forme ?"
    two = (Shape("circle", "red", 0, 0, 10), Shape("square", "blue", 50, 0, 10))
    assert answer_for("caption", two, "fr") == "un cercle rouge et un carre bleu"
    assert answer_for("caption", two) == "a red circle and a blue square"
    with pytest.raises(ValueError, match="unknown demo language 'de'"):
        make_demo_examples("colors", 1, 0, lang="de")


def test_every_demo_word_of_both_languages_is_in_the_tiny_vocabulary():
    tok = tiny_tokenizer("t5")
    unk = tok.convert_tokens_to_ids("<unk>")
    for lang in ("en", "fr"):
        for task in ("colors", "shapes", "count", "caption"):
            for ex in make_demo_examples(task, 30, 3, lang):
                assert unk not in tok(f"vqa: {ex.text} {ex.target}")["input_ids"], (lang, ex)
    scene = Scene(56, (Shape("triangle", "purple", 0, 0, 9), Shape("circle", "black", 30, 0, 9)))
    rng = random.Random(0)
    for _ in range(50):
        q, a = grounding_question(scene, rng, "fr")
        assert unk not in tok(f"gqa: {q} {a}")["input_ids"], (q, a)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_special_tokens_are_single_tokens_and_skipped_when_decoding(family):
    tok = tiny_tokenizer(family)
    ids = tok(f"un {SENTINELS[0]} rouge {MASK}", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["un", SENTINELS[0], "rouge", MASK]
    assert tok.decode(ids, skip_special_tokens=True) == "un rouge"
    assert TINY_VOCAB[-1] == "<vis_extra_id_0>"          # VL-T5's object-order rows come last


def test_french_grounding_questions_mirror_the_english_ones():
    scene = Scene(56, (Shape("circle", "red", 0, 0, 9), Shape("square", "blue", 30, 0, 9)))
    pairs = {lang: [grounding_question(scene, random.Random(s), lang) for s in range(40)]
             for lang in ("en", "fr")}
    answers = {"yes": "oui", "no": "non", "red circle": "cercle rouge", "blue square": "carre bleu",
               "red circle , blue square": "cercle rouge , carre bleu", "two objects": "deux objets"}
    assert [answers[a] for _, a in pairs["en"]] == [a for _, a in pairs["fr"]]
    assert ("quels objets y a-t-il ?", "cercle rouge , carre bleu") in pairs["fr"]


@pytest.mark.parametrize("seed", range(20))
def test_span_corruption_hides_spans_behind_sentinels_and_the_target_restores_them(seed):
    text = "un cercle rouge et un carre bleu"
    inp, target = corrupt(text, random.Random(seed), "t5")
    assert SENTINELS[0] in inp and target.split()[0] not in SENTINELS
    spans, current = {SENTINELS[0]: []}, SENTINELS[0]
    for w in target.split():
        if w in SENTINELS:
            current = w
            spans[w] = []
        else:
            spans[current].append(w)
    restored = " ".join(" ".join(spans[w]) if w in spans else w for w in inp.split())
    assert restored == text
    assert 1 <= sum(map(len, spans.values())) < len(text.split())   # some hidden, some kept


@pytest.mark.parametrize("seed", range(10))
def test_text_infilling_masks_spans_and_targets_the_whole_text(seed):
    text = "a red circle and a blue square"
    inp, target = corrupt(text, random.Random(seed), "bart")
    assert target == text and MASK in inp
    kept = [w for w in inp.split() if w != MASK]
    assert 0 < len(kept) < len(text.split())
    it = iter(text.split())
    assert all(w in it for w in kept)                     # kept words in order


def test_denoising_examples_keep_task_and_media_and_are_deterministic():
    exs = make_demo_examples("caption", 6, 1, lang="fr")
    a, b = denoising_examples(exs, "t5", 5), denoising_examples(exs, "t5", 5)
    assert [(x.text, x.target) for x in a] == [(x.text, x.target) for x in b]
    assert all(x.task == "text" and x.images == e.images for x, e in zip(a, exs))
    assert all(x.references == [x.target] for x in a)
    with pytest.raises(ValueError, match="empty"):
        corrupt("  ", random.Random(0), "t5")


def test_all_caps_words_survive_the_lowercasing_tiny_tokenizer(tiny_t5):
    ids = tiny_t5.target_ids("RED circle and A blue SQUARE")
    assert tiny_t5.tokenizer.convert_ids_to_tokens(ids)[:3] == ["^", "red", "circle"]
    assert tiny_t5.decode_text(ids) == "RED circle and a blue SQUARE"
    assert tiny_t5.decode_text(tiny_t5.target_ids("what color is it?")) == "what color is it?"
