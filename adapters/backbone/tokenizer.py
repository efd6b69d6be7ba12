"""Tokenizers: a local Hugging Face tokenizer directory, or the built-in tiny word-level one.

The tiny tokenizer needs no download: a fixed word list covering the task prefixes, the demo tasks
(colors, shapes, counts, captions), common English question words and the demo's second language
(French words for the same world, docs/METHODS.md "Composition"). Unknown words map to <unk>. Like
the real T5 / BART / VL-T5 vocabularies it ends with special tokens: T5's span-corruption sentinels
``<extra_id_k>``, BART's ``<mask>``, and VL-T5's ``<vis_extra_id_k>`` rows (visual token k of an image
adds the embedding of row V-1-k), so no word's row doubles as an object-order embedding. It
lowercases, so an all-caps word travels as the marker ``^`` and the word (``RED`` <-> ``^ red``; the
tokenizer's ``caps_marker``, applied by VLModel on the way in and out).
"""
from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]          # ids 0, 1, 2, 3
_WORDS = """
vqa gqa nlvr caption : ? . , ! ' - true false yes no
what which who whose where when why how many much is are was were do does did can could
the a an of in on at to and or with without there here this that these those it its
color colour shape shapes kind type size number count left right top bottom middle center
image picture photo video frame scene object objects thing things
red green blue yellow orange purple white black gray grey brown pink
circle square triangle rectangle star
zero one two three four five six seven eight nine ten
big small large little
""".split()
_FRENCH = """
de quelle quel quels est la le les forme formes couleur objets objet y t il qu ce qui gauche droite
du d et un une deux trois quatre cinq rouge vert bleu jaune orange violet blanc noir cercle carre
triangle combien oui non image
""".split()
SENTINELS = [f"<extra_id_{k}>" for k in range(10)]   # T5 span corruption
MASK = "<mask>"                                        # BART text infilling
VIS_EXTRA = [f"<vis_extra_id_{k}>" for k in range(64)][::-1]   # row V-1-k is <vis_extra_id_k>
CAPS = "^"
_ENGLISH = sorted(set(_WORDS + [CAPS]) - set(SPECIALS))
TINY_VOCAB = (SPECIALS + _ENGLISH + sorted(set(_FRENCH) - set(_ENGLISH)) + SENTINELS + [MASK]
              + VIS_EXTRA)
TINY_VOCAB_SIZE = len(TINY_VOCAB)


def tiny_tokenizer(family: str = "t5"):
    """A PreTrainedTokenizerFast over TINY_VOCAB: lowercase, split words and punctuation.

    T5 style appends ``</s>``; BART style wraps the text as ``<s> ... </s>``.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_VOCAB)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    extra = SENTINELS + [MASK] + VIS_EXTRA
    tok.add_special_tokens(extra)       # matched whole, before the text is split into words
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 1)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>", mask_token=MASK,
                                   additional_special_tokens=extra, caps_marker=CAPS)


_ALL_CAPS = re.compile(r"\b[A-Z][A-Z0-9]+\b")


def caps_marker(tokenizer) -> str | None:
    """The marker a lowercasing tokenizer spells all-caps words with (None: it keeps case)."""
    return getattr(tokenizer, "init_kwargs", {}).get("caps_marker")


def mark_caps(text: str, marker: str | None) -> str:
    """``RED circle`` -> ``^ red circle`` (words of two or more capitals; unchanged without a
    marker)."""
    return text if marker is None else _ALL_CAPS.sub(lambda m: f"{marker} {m.group(0).lower()}", text)


def unmark_caps(text: str, marker: str | None) -> str:
    """The inverse of :func:`mark_caps` on decoded text."""
    if marker is None or marker not in text:
        return text
    return re.sub(rf"{re.escape(marker)}\s*(\S+)", lambda m: m.group(1).upper(), text)


def load_tokenizer(directory: Path | None, family: str):
    """The tokenizer saved in ``directory`` (save_pretrained layout), else the tiny one."""
    if directory is not None and Path(directory).is_dir() and any(
            (Path(directory) / f).exists()
            for f in ("tokenizer.json", "spiece.model", "vocab.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return tiny_tokenizer(family)
