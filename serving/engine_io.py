"""What the engine takes and gives: `InferenceRequest` and `InferenceResult`.

Apart from serving/engine.py (which imports torch) because the ingress builds requests and reads
results: Ray pickles them by module, and a torch-free module keeps torch out of that process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ContextInput:
    """One item of a context a generator turns into an adapter (Generative Adapter): a
    demonstration (image, question, answer) or plain ``text``."""

    question: str = ""
    answer: str = ""
    image: object = None             # a PIL RGB image for a demonstration
    text: str | None = None          # a text-only item


@dataclass
class InferenceRequest:
    adapter: str | tuple[str, ...] | None   # adapter id, a tuple of ids composed; None = backbone
    task: str                        # "vqa" | "gqa" | "nlvr" | "caption" | "video_qa" | "video_caption"
    text: str                        # question / statement / caption prompt ("" allowed for captions)
    images: list = field(default_factory=list)       # 0, 1 or 2 PIL RGB images (2 = NLVR2 style)
    frames: np.ndarray | None = None                # video: (T, H, W, 3) uint8 frames already sampled
    features: np.ndarray | None = None              # precomputed visual features (N, feat_dim) fp32
    boxes: np.ndarray | None = None                 # optional (N, 4) boxes for features
    max_new_tokens: int | None = None               # None: the task's default, clamped to the cap
    num_beams: int = 1
    context: list[ContextInput] | None = None       # instead of adapter: generate one from this


@dataclass
class ClassifyRequest:
    adapter: str | None              # a cache adapter's id; None: zero-shot over ``labels``
    labels: tuple[str, ...] | None   # zero-shot: the class prompts
    image: object                    # a PIL RGB image
    top_k: int = 5


@dataclass
class ClassifyResult:
    label: str
    scores: list[tuple[str, float]]  # the top_k (label, probability), best first
    adapter: str | None
    adapter_version: int | None
    timings_ms: dict[str, float]


@dataclass
class InferenceResult:
    text: str
    logprob: float                   # sum of the generated tokens' log-probabilities
    adapter: str | tuple[str, ...] | None
    adapter_version: int | tuple[int, ...] | None    # a composite: each member's version
    timings_ms: dict[str, float]     # queue, vision, prefill, decode, total
    tokens: list[int] = field(default_factory=list)   # generated ids, end-of-sequence excluded
    context_sha256: str | None = None   # the inline context whose generated adapter answered
    prompt_tokens: int = 0           # encoder tokens: the prompt's and the visual ones
    finish_reason: str = "stop"      # "stop": end of sequence; "length": max_new_tokens reached
