"""The generator of adapters/generative.py: its math against a literal re-computation, chunking and
batching invariance, the artifact's checks, and that its output is an ordinary LoRA file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.data import make_demo_examples
from petserve.adapters.generative import (
    Generator,
    GeneratorConfig,
    GeneratorError,
    context_hash,
    context_states,
    generate_loras,
    load_generator,
    lora_file_bytes,
)
from petserve.adapters.training import BatchBuilder, ExampleFeatures


def _items(model, task_id: str, n: int, seed: int):
    exs = make_demo_examples(task_id, n, seed)
    rows, targets = BatchBuilder(model, exs, ExampleFeatures(model), "vqa").batch(list(range(n)))
    return list(zip(rows, targets))


def _random_generator(model, norm="frobenius", seed=0, pairing="same") -> Generator:
    g = Generator.init(GeneratorConfig(r=4, norm=norm, pairing=pairing), model, seed)
    torch.manual_seed(seed)
    for k, v in g.params.items():               # B starts at zero: give it something to carry
        g.params[k] = v + 0.1 * torch.randn_like(v)
    return g


@pytest.mark.parametrize("pairing", ["same", "next"])
@pytest.mark.parametrize("site", ["dec.0.self.v", "enc.0.self.q"])
def test_s_is_the_literal_sum_over_context_tokens(tiny_t5, pairing, site):
    """same: sum over tokens t of (A2 h_t)(A3 h_t)^T. next, on decoder tokens: sum over pairs of
    tokens (t, t + 1) of (A2 h_t)(A3 h_t+1)^T; encoder tokens pair with themselves either way."""
    gen = _random_generator(tiny_t5, pairing=pairing)
    items = _items(tiny_t5, "colors", 3, 1)
    states, masks = context_states(tiny_t5, gen.sites, [i[0] for i in items], [i[1] for i in items])
    S = gen.accumulate(None, {site: states[site]}, masks, torch.zeros(3, dtype=torch.long), 1)[site][0]
    x = states[site].double().numpy()
    m = masks["dec" if site.startswith("dec") else "enc"].numpy()
    g, A2, A3 = (gen.p(site, n).double().numpy() for n in ("g", "A2", "A3"))
    shift = 1 if pairing == "next" and site.startswith("dec") else 0

    def h(b, t):
        return x[b, t] / np.sqrt((x[b, t] ** 2).mean() + gen.cfg.eps) * g
    want = np.zeros((4, 4))
    for b in range(3):
        for t in range(x.shape[1] - shift):
            if m[b, t] and m[b, t + shift]:
                want += np.outer(A2 @ h(b, t), A3 @ h(b, t + shift))
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(S.double().numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["frobenius", "svd"])
def test_normalisation(tiny_t5, norm):
    gen = _random_generator(tiny_t5, norm)
    S = torch.randn(2, 4, 4)
    n = gen.normalise(S)
    if norm == "frobenius":
        torch.testing.assert_close(n.flatten(1).norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(n @ n.transpose(1, 2), torch.eye(4).expand(2, 4, 4), atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("pairing", ["same", "both"])
def test_chunks_and_batched_contexts_give_the_same_loras(tiny_t5, pairing):
    """Padded together or alone, in one chunk or many: the same LoRAs (under `both` a pair never
    reaches a padding token)."""
    gen = _random_generator(tiny_t5, pairing=pairing)
    a, b = _items(tiny_t5, "colors", 5, 2), _items(tiny_t5, "caption", 3, 3)   # longer targets
    together = generate_loras(tiny_t5, gen, [a, b], chunk_rows=16)
    one_by_one = generate_loras(tiny_t5, gen, [a], chunk_rows=1) + generate_loras(tiny_t5, gen, [b],
                                                                               chunk_rows=2)
    for x, y in zip(together, one_by_one):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0]["lora.enc.0.self.q.A"], together[1]["lora.enc.0.self.q.A"])


def test_the_output_is_an_ordinary_lora_file(tiny_t5):
    gen = _random_generator(tiny_t5)
    items = _items(tiny_t5, "colors", 4, 4)
    params = generate_loras(tiny_t5, gen, [items])[0]
    keyed = [(row.ids, f"image-{i}", target) for i, (row, target) in enumerate(items)]
    digest = context_hash(keyed)
    data = lora_file_bytes(gen, params, tiny_t5, "vqa", "demo-gen", digest, name="made")
    adapter = load_adapter(data, tiny_t5)
    assert adapter.kind == "lora" and adapter.config.r == 4
    assert adapter.meta.generated == {"generator": "demo-gen", "context_sha256": digest}
    assert context_hash(keyed) == digest != context_hash(keyed[:3])


def test_a_fresh_generator_generates_a_no_op(tiny_t5):
    """B starts at zero, as the paper's generator: a fresh one changes nothing."""
    gen = Generator.init(GeneratorConfig(r=4), tiny_t5)
    params = generate_loras(tiny_t5, gen, [_items(tiny_t5, "shapes", 2, 5)])[0]
    assert all(float(v.abs().max()) == 0 for k, v in params.items() if k.endswith(".B"))


def test_the_artifact_round_trips_and_refuses_what_it_cannot_use(tiny_t5, tiny_bart, tmp_path):
    gen = _random_generator(tiny_t5, "svd")
    path = gen.save(tmp_path / "g.safetensors", name="g")
    back = load_generator(path, tiny_t5)
    assert back.cfg == gen.cfg and back.sites == gen.sites
    for k, v in gen.params.items():
        torch.testing.assert_close(back.params[k], v)
    with pytest.raises(GeneratorError, match="made for backbone"):
        load_generator(path, tiny_bart)
    (tmp_path / "junk").write_bytes(b"not a generator")
    with pytest.raises(GeneratorError, match="not a petserve generator file"):
        load_generator(tmp_path / "junk", tiny_t5)
    with pytest.raises(GeneratorError, match="no such generator file"):
        load_generator(tmp_path / "missing", tiny_t5)
    with pytest.raises(GeneratorError, match="at least one item"):
        generate_loras(tiny_t5, gen, [[]])


def test_train_generator_from_the_command_line(tmp_path, capsys):
    """Meta-training on the demo family (a few updates), the held-out scores printed as JSON."""
    import json

    from petserve.serving.cli import main
    out, threads_before = tmp_path / "g.safetensors", torch.get_num_threads()
    assert main(["train-generator", "--backbone", "tiny", "--out", str(out), "--steps", "2",
                 "--r", "4", "--relabel", "1.0", "--pairing", "next", "--threads", "1", "--score-n",
                 "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(summary["held_out"]) == ["count/french", "shapes/upper"]
    assert set(summary["own"]) == set(summary["bare"]) == {"count/french", "shapes/upper"}
    from petserve.adapters.backbone import build_backbone
    cfg = load_generator(out, build_backbone("tiny")).cfg
    assert (cfg.r, cfg.alpha, cfg.pairing) == (4, 8.0, "next")
    assert torch.get_num_threads() == threads_before        # --threads holds for the run only
    assert main(["train-generator", "--out", str(out), "--steps", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert main(["train-generator", "--out", str(out), "--relabel", "1.5"]) == 2
    assert "--relabel must be between 0 and 1" in capsys.readouterr().err
    assert main(["train-generator", "--out", str(out), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("style_mixed", [0.0, 0.5, 1.0])
def test_meta_training_tasks_keep_out_held_out_combinations(style_mixed):
    """A drawn task is one trained combination, or (style-mixed) several trained combinations of
    one answer style; a held-out combination never reaches meta-training."""
    import random

    from petserve.adapters.training.generator_training import (
        HELD_OUT,
        GeneratorTrainConfig,
        draw_task,
        task_family,
    )

    class Pool:                       # items are (combination, index): what the draw picked
        def items(self, combo, indices):
            return [(combo, i) for i in indices]

    trained, held = task_family()
    tc = GeneratorTrainConfig(style_mixed=style_mixed, pool_size=50)
    rng, mixed = random.Random(0), 0
    for _ in range(200):
        context, queries = draw_task(Pool(), trained, tc, rng)
        assert len(context) == tc.demos and len(queries) == tc.queries
        combos = {c for c, _ in context + queries}
        assert combos <= set(trained) and not combos & set(HELD_OUT)
        assert len({style for _, style in combos}) == 1
        mixed += len({attribute for attribute, _ in combos}) > 1
    assert (mixed > 0) == (style_mixed > 0)
    if style_mixed == 1.0:            # every style has two or more trained attributes
        assert mixed > 190


def test_relabelled_tasks_answer_in_words_the_context_shows():
    """A relabelled task maps one attribute's answers to other words of the family, one word per
    answer for the whole task, never a word that attribute answers with in English or French, and
    asks only answers its context shows; its share falls from `relabel` to `relabel_floor`."""
    import random

    from petserve.adapters.data.synthetic import COLORS, FRENCH, NUMBER_WORDS, SHAPES
    from petserve.adapters.training.generator_training import (
        GeneratorTrainConfig,
        draw_task,
        relabel_share,
        task_family,
    )
    words_of = {"colors": COLORS, "shapes": SHAPES, "count": NUMBER_WORDS}

    class Pool:                       # items are (combination, index, the word it answers with)
        def answer(self, combo, index):
            return words_of[combo[0]][index % len(words_of[combo[0]])]

        def relabelled(self, combo, indices, words):
            return [(combo, i, words[self.answer(combo, i)]) for i in indices]

    trained, _ = task_family()
    tc = GeneratorTrainConfig(relabel=1.0, relabel_floor=1.0, pool_size=50)
    rng, pool, attributes = random.Random(0), Pool(), set()
    for _ in range(200):
        context, queries = draw_task(pool, trained, tc, rng)
        assert len(context) == tc.demos and len(queries) == tc.queries
        (combo,) = {c for c, _, _ in context + queries}
        assert combo in trained and combo[1] == "english"
        attributes.add(combo[0])
        words = {}
        for _, i, word in context + queries:
            assert words.setdefault(pool.answer(combo, i), word) == word
        assert len(set(words.values())) == len(words)
        own = set(words_of[combo[0]]) | {FRENCH[w] for w in words_of[combo[0]]}
        assert not set(words.values()) & own
        assert {w for _, _, w in queries} <= {w for _, _, w in context}
    assert attributes == {"colors", "shapes", "count"}
    schedule = GeneratorTrainConfig(steps=100, relabel=0.6)
    assert [relabel_share(schedule, s) for s in (0, 50, 100)] == pytest.approx([0.6, 0.3, 0.0])
    floored = GeneratorTrainConfig(steps=100, relabel=0.6, relabel_floor=0.25)
    assert relabel_share(floored, 100) == 0.25
