"""Meta-training a generator (Generative Adapter, adapters/generative.py): ``petserve
train-generator``.

Each update draws a few tasks of the family (an attribute x an answer style, holding some
combinations out), for each a context of demonstrations and fresh queries of the same task. The
context runs through the frozen backbone once, the generator turns it into a LoRA, and the loss is
the backbone's with that LoRA on the queries (the task) and on the demonstrations themselves
(reconstructing the context, the self-supervised half of the paper's objective). Only the
generator's parameters learn; the backbone stays frozen.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from petserve.adapters.backbone.model import VLModel
from petserve.adapters.data.synthetic import (
    ATTRIBUTES,
    COLORS,
    FRENCH,
    NUMBER_WORDS,
    SHAPES,
    STYLES,
    make_styled_examples,
)
from petserve.adapters.generative import Generator, GeneratorConfig, generate_loras
from petserve.adapters.kinds.lora import LoRA
from petserve.adapters.training.batches import BatchBuilder, ExampleFeatures
from petserve.adapters.training.schedule import lr_at, warmup_steps
from petserve.adapters.training.trainer import adapter_loss, adapter_weights

# held out of meta-training, scored after it (the issue pins these two)
HELD_OUT = (("count", "french"), ("shapes", "upper"))
# what a relabelled task may answer with: the family's words in English and French (not the
# code table, which a trained style already fixes)
RELABEL_WORDS = tuple(sorted(set(COLORS + SHAPES + NUMBER_WORDS) | set(FRENCH.values())))


def task_family(held_out=HELD_OUT) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(trained, held-out) combinations of attribute x style."""
    every = [(a, s) for a in ATTRIBUTES for s in STYLES]
    held = [c for c in every if c in held_out]
    return [c for c in every if c not in held_out], held


@dataclass(frozen=True)
class GeneratorTrainConfig:
    steps: int = 600
    tasks_per_step: int = 4
    demos: int = 8
    queries: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    pool_size: int = 300             # distinct scenes per attribute, drawn once
    # share of tasks whose context and queries mix the trained attributes of one style: the
    # adapter must then answer whichever question is asked, in the context's style
    style_mixed: float = 0.0
    # share of relabelled tasks at the first update, falling linearly to relabel_floor at the last
    # (draw_relabelled): they teach the generator to carry whatever words a context answers with
    relabel: float = 0.0
    relabel_floor: float = 0.0
    seed: int = 0
    held_out: tuple[tuple[str, str], ...] = HELD_OUT
    progress: bool = False


@dataclass
class GeneratorHistory:
    losses: list[float] = field(default_factory=list)


class TaskPool:
    """Pre-drawn examples of every combination (the scenes drawn once per attribute, so their
    visual tokens are encoded once), and the rows / targets of any subset."""

    def __init__(self, model: VLModel, combos, size: int, seed: int,
                 cache: ExampleFeatures | None = None):
        self.model, self.cache = model, cache or ExampleFeatures(model)
        self.examples = {c: make_styled_examples(c[0], c[1], size, seed + ATTRIBUTES.index(c[0]))
                         for c in combos}
        self.builders = {c: BatchBuilder(model, exs, self.cache, "vqa")
                         for c, exs in self.examples.items()}

    def items(self, combo, indices: list[int]):
        rows, targets = self.builders[combo].batch(indices)
        return list(zip(rows, targets))

    def answer(self, combo, index: int) -> str:
        return self.examples[combo][index].target

    def relabelled(self, combo, indices: list[int], words: dict[str, str]):
        """``items`` with each answer replaced by ``words[answer]``."""
        rows = self.builders[combo].rows(indices)
        return [(row, self.model.target_ids(words[self.answer(combo, i)]))
                for row, i in zip(rows, indices)]


def relabel_share(tc: GeneratorTrainConfig, step: int) -> float:
    return max(tc.relabel_floor, tc.relabel * (1 - step / tc.steps))


def draw_task(pool: TaskPool, trained, tc: GeneratorTrainConfig, rng: random.Random,
              step: int = 0):
    """One task's (context, queries) items: a relabelled task (with probability
    ``relabel_share``), one trained combination, or (with probability ``tc.style_mixed``) every
    item from a random trained combination of one style."""
    if tc.relabel > 0 and rng.random() < relabel_share(tc, step):
        return draw_relabelled(pool, trained, tc, rng)
    n = tc.demos + tc.queries
    combo = rng.choice(trained)
    if rng.random() >= tc.style_mixed:
        items = pool.items(combo, rng.sample(range(tc.pool_size), n))
    else:
        same_style = [c for c in trained if c[1] == combo[1]]
        picks = [rng.choice(same_style) for _ in range(n)]
        items = [pool.items(c, [rng.randrange(tc.pool_size)])[0] for c in picks]
    return items[:tc.demos], items[tc.demos:]


def draw_relabelled(pool: TaskPool, trained, tc: GeneratorTrainConfig, rng: random.Random):
    """A task of the kind "answer in the words the context shows": one attribute's questions,
    each answer mapped (for this task only) to a random word of RELABEL_WORDS that the attribute
    never answers with in English or French; the queries ask only answers the context shows. No
    combination of the family is drawn, so nothing held out is seen."""
    combo = rng.choice([c for c in trained if c[1] == "english"])
    answers = sorted({pool.answer(combo, i) for i in range(tc.pool_size)})
    own = set(answers) | {FRENCH[a] for a in answers}
    words = dict(zip(answers, rng.sample([w for w in RELABEL_WORDS if w not in own],
                                         len(answers))))
    picks = rng.sample(range(tc.pool_size), tc.demos + tc.queries)
    context = picks[:tc.demos]
    shown = {pool.answer(combo, i) for i in context}
    unseen = [i for i in range(tc.pool_size) if i not in context and pool.answer(combo, i) in shown]
    queries = rng.sample(unseen, min(tc.queries, len(unseen)))      # fewer only in a tiny pool
    items = pool.relabelled(combo, context + queries, words)
    return items[:tc.demos], items[tc.demos:]


def train_generator(model: VLModel, gcfg: GeneratorConfig, tc: GeneratorTrainConfig,
                    cache: ExampleFeatures | None = None) -> tuple[Generator, GeneratorHistory]:
    """Meta-train a fresh generator on the trained combinations of the demo task family."""
    trained, _ = task_family(tc.held_out)
    gen = Generator.init(gcfg, model, tc.seed).requires_grad_(True)
    params = list(gen.params.values())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, eps=1e-6)
    pool = TaskPool(model, trained, tc.pool_size, tc.seed, cache)
    lcfg, rng, history = gcfg.lora_config(), random.Random(tc.seed), GeneratorHistory()
    warm = warmup_steps(tc.steps, 0.05)
    bar = tqdm(range(tc.steps), disable=not tc.progress, desc="train generator", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.steps, warm, tc.lr)
        tasks = [draw_task(pool, trained, tc, rng, step) for _ in range(tc.tasks_per_step)]
        contexts = [context for context, _ in tasks]
        loras = generate_loras(model, gen, contexts, chunk_rows=len(tasks) * tc.demos, detach=False)
        loss = 0.0
        for (context, queries), lora in zip(tasks, loras):
            queries = queries + context
            weights = adapter_weights(model, LoRA, lcfg, lora, "vqa")
            loss = loss + adapter_loss(model, weights, [q[0] for q in queries],
                                       [q[1] for q in queries])
        loss = loss / len(tasks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{history.losses[-1]:.3f}", refresh=False)
    gen.requires_grad_(False)
    gen.params = {k: v.detach() for k, v in gen.params.items()}
    return gen, history


# ---- scoring ------------------------------------------------------------------------------------
SCORE_SEED = 9_100_001          # fresh draws: no training pool uses these seeds
SCORE_DRAWS = 3                 # independent (context, queries) draws a reported figure averages


@dataclass
class GeneratorScores:
    """Exact answers (case-sensitive) on fresh queries of each combination "attribute/style":
    with a generated adapter from its own context of ``demos`` demonstrations, from the context of
    another task (``other_task``), and on the bare backbone; each the mean over ``draws``
    independent draws of contexts and queries, whose own-context figures ``own_per_draw`` lists."""

    own: dict[str, float]
    other_context: dict[str, float]
    bare: dict[str, float]
    own_per_draw: dict[str, list[float]] = field(default_factory=dict)


def other_task(combo, trained):
    """A trained combination sharing neither the attribute nor the style (the mismatched
    context)."""
    return next(c for c in trained if c[0] != combo[0] and c[1] != combo[1])


def generator_scores(model: VLModel, gen: Generator, combos, n: int = 60, demos: int = 8,
                     seed: int = SCORE_SEED, cache: ExampleFeatures | None = None,
                     draws: int = 1) -> GeneratorScores:
    """The scores of ``draws`` independent draws (seeds ``seed``, ``seed + 1000``, ...) of a
    context and ``n`` queries per combination, averaged: one draw's figures swing with which
    demonstrations it shows."""
    combos, cache = list(combos), cache or ExampleFeatures(model)
    tables = [_one_draw(model, gen, combos, n, demos, seed + 1000 * k, cache) for k in range(draws)]
    mean = {v: {c: sum(t[v][c] for t in tables) / draws for c in tables[0][v]}
            for v in ("own", "other_context", "bare")}
    return GeneratorScores(**mean, own_per_draw={c: [t["own"][c] for t in tables]
                                                 for c in tables[0]["own"]})


def _one_draw(model: VLModel, gen: Generator, combos, n: int, demos: int, seed: int,
              cache: ExampleFeatures) -> dict[str, dict[str, float]]:
    """Generate one adapter per context (all contexts in shared backbone passes), serve them from
    one SlotBank and answer every combination's queries in mixed batches."""
    from petserve.adapters.generation import GenerationRequest, answer_mixed
    from petserve.adapters.runtime.bank import SlotBank
    trained, _ = task_family()
    context_pool = TaskPool(model, sorted(set(trained) | set(combos)), demos, seed, cache)
    query_pool = TaskPool(model, combos, n, seed + 17, cache)
    sources = sorted({c for c in combos} | {other_task(c, trained) for c in combos})
    loras = generate_loras(model, gen, [context_pool.items(c, list(range(demos))) for c in sources])
    bank = SlotBank(model, len(sources))
    for slot, lora in enumerate(loras):
        bank.set(slot, LoRA.compile(gen.cfg.lora_config(), lora, model, "vqa"))
    requests = []
    for c in combos:
        rows = query_pool.builders[c].rows(list(range(n)))
        for variant, slot in (("own", sources.index(c)), ("other_context", sources.index(
                other_task(c, trained))), ("bare", -1)):
            requests += [(variant, c, i, GenerationRequest(r, slot, 8)) for i, r in enumerate(rows)]
    hits = {(variant, c, i): res.text.strip() == query_pool.examples[c][i].target
            for (variant, c, i), res in answer_mixed(model, bank, requests, seed).items()}
    return {v: {f"{c[0]}/{c[1]}": sum(hits[v, c, i] for i in range(n)) / n for c in combos}
            for v in ("own", "other_context", "bare")}
