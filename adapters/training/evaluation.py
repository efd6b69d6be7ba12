"""Held-out evaluation: generate answers with adapters.generation and score them.

QA tasks (vqa, gqa, video_qa): VQA soft accuracy and exact match; NLVR2: accuracy; captions: BLEU-4,
CIDEr-D and exact match (adapters.metrics).
"""
from __future__ import annotations

from petserve.adapters.backbone.model import VLModel
from petserve.adapters.data.records import Example
from petserve.adapters.generation import GenerationRequest, generate
from petserve.adapters.metrics import bleu4, cider, exact_match, vqa_soft_accuracy
from petserve.adapters.runtime.weights import RuntimeWeights
from petserve.adapters.tasks import get_task
from petserve.adapters.training.batches import BatchBuilder, ExampleFeatures


def default_max_new_tokens(task: str) -> int:
    """The papers' generation lengths: 40 tokens for captions, 20 otherwise."""
    return get_task(task).default_new_tokens


def predict(model: VLModel, weights: RuntimeWeights, examples: list[Example], task: str,
            cache: ExampleFeatures, slot: int = 0, batch_size: int = 64, num_beams: int = 1,
            max_new_tokens: int | None = None) -> list[str]:
    """Generated text for each example, every row on adapter ``slot`` (-1: the backbone alone)."""
    builder = BatchBuilder(model, examples, cache, task)
    limit = max_new_tokens or default_max_new_tokens(task)
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        rows = builder.rows(list(range(start, min(start + batch_size, len(examples)))))
        results = generate(model, weights, [GenerationRequest(r, slot, limit, num_beams) for r in rows])
        out += [r.text for r in results]
    return out


def score(task: str, predictions: list[str], examples: list[Example]) -> dict[str, float]:
    """Metrics of ``task`` (see the module docstring); every example needs references."""
    missing = [ex.example_id or str(i) for i, ex in enumerate(examples) if not ex.references]
    if missing:
        raise ValueError(f"{len(missing)} evaluation example(s) have no reference answer, "
                         f"e.g. {missing[0]!r}")
    targets = [ex.target or ex.references[0] for ex in examples]
    if get_task(task).caption:
        refs = [ex.references for ex in examples]
        return {"bleu4": bleu4(predictions, refs), "cider": cider(predictions, refs),
                "exact_match": exact_match(predictions, targets)}
    if get_task(task).media == "pair":       # nlvr: true / false
        return {"accuracy": exact_match(predictions, targets)}
    return {"vqa_accuracy": vqa_soft_accuracy(predictions, examples),
            "exact_match": exact_match(predictions, targets)}


def evaluate(model: VLModel, weights: RuntimeWeights, examples: list[Example], task: str,
             cache: ExampleFeatures, slot: int = 0, **generation) -> dict[str, float]:
    """``score`` of ``predict``: the metrics of one adapter slot on labelled examples."""
    return score(task, predict(model, weights, examples, task, cache, slot, **generation), examples)
