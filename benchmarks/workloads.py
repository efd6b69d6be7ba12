"""Workloads shared by the serving benchmarks: backbones, adapters, popularity, prompts, arrivals.

A workload is N requests over A adapters with a popularity law:

* ``uniform``: every request draws one of the A adapters uniformly;
* ``zipf``: adapter i (1-based) is drawn with probability proportional to i ** -1.5;
* ``single``: every request uses adapter 0 (the single-adapter reference).

Requests are text-only (``vqa: <question>``) so the same token ids reach our backbone and a Hugging
Face T5 (the PEFT baseline); their backbones are random Hugging Face T5 checkpoints
(:func:`hf_t5_checkpoint`) in two sizes. The checkpoint's output row of ``</s>`` is zero, so the
end-of-sequence logit is 0 while some other logit is positive: greedy decoding never stops early,
every request generates exactly ``max_new_tokens`` tokens in every system, and requests/s and
tokens/s are proportional.

Adapter kinds: ``lora`` (rank 8 on q and v of every attention, as PEFT's default targets) or
``mixed`` (LoRA of ranks 4 / 8 / 16, Houlsby adapters, VL-PET, Compacter, prompt tuning in turn).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ZIPF_EXPONENT = 1.5
POPULARITIES = ("uniform", "zipf", "single")

# Hugging Face T5Config fields of the two benchmark backbones (random weights).
BACKBONES = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),   # the tiny preset
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                     vocab_size=32128),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    vocab_size=32128),                                  # GPU runs
}

LORA = ("lora", {"r": 8, "alpha": 16, "dropout": 0.0, "train_biases": False,
                 "train_visual_embedding": False})
MIXED = (
    LORA,
    ("lora", {"r": 4, "alpha": 8, "train_biases": False, "train_visual_embedding": False}),
    ("adapter", {"train_visual_embedding": False}),
    ("lora", {"r": 16, "alpha": 32, "train_biases": False, "train_visual_embedding": False}),
    ("vlpet", {"gate": "small", "train_visual_embedding": False}),
    ("compacter", {"train_visual_embedding": False}),
    ("prompt", {"length": 4, "mid_dim": 32, "train_visual_embedding": False}),
)
_WORDS = ("what color is the shape how many objects are there which kind of thing left right "
          "top bottom red green blue circle square big small is it a picture of two three").split()


@dataclass(frozen=True)
class Workload:
    popularity: str = "uniform"     # uniform | zipf | single
    adapters: int = 32              # distinct adapters in the store (1..1000)
    kinds: str = "lora"             # lora | mixed
    requests: int = 256
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}")
        if self.kinds not in ("lora", "mixed"):
            raise ValueError("kinds must be 'lora' or 'mixed'")

    def setup(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestSpec:
    adapter: str | None             # None: the backbone alone
    text: str
    max_new_tokens: int


def adapter_id(i: int, kinds: str = "lora") -> str:
    """Id of adapter i of a workload: a0000.. (LoRA), m0000.. (mixed kinds); one store or server
    can then hold both sets."""
    return f"{'a' if kinds == 'lora' else 'm'}{i:04d}"


def kind_of(i: int, kinds: str) -> tuple[str, dict]:
    """(kind, options) of adapter i."""
    return LORA if kinds == "lora" else MIXED[i % len(MIXED)]


def draw_adapters(popularity: str, adapters: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter index of each of ``n`` requests."""
    if popularity == "single" or adapters == 1:
        return np.zeros(n, dtype=np.int64)
    if popularity == "uniform":
        return rng.integers(0, adapters, n)
    p = 1.0 / np.arange(1, adapters + 1) ** ZIPF_EXPONENT
    return rng.choice(adapters, size=n, p=p / p.sum())


def make_requests(w: Workload, adapter: bool = True) -> list[RequestSpec]:
    """The workload's requests in arrival order (``adapter=False``: the same texts, no adapter)."""
    rng = np.random.default_rng(w.seed)
    idx = draw_adapters(w.popularity, w.adapters, w.requests, rng)
    lengths = rng.integers(4, 11, w.requests)
    out = []
    for i, n in zip(idx.tolist(), lengths.tolist()):
        text = " ".join(rng.choice(_WORDS, n).tolist()) + " ?"
        out.append(RequestSpec(adapter_id(i, w.kinds) if adapter else None, text,
                               w.max_new_tokens))
    return out


def used_adapters(requests: list[RequestSpec]) -> int:
    return len({r.adapter for r in requests if r.adapter is not None})


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of ``n`` requests arriving as a Poisson process."""
    rng = np.random.default_rng(seed + 7919)
    return np.cumsum(rng.exponential(1.0 / rate, n))


# ---- backbones and adapters --------------------------------------------------------------
def hf_t5_checkpoint(size: str, directory: Path, seed: int = 0) -> Path:
    """Write a random Hugging Face T5 checkpoint of ``size`` (see BACKBONES) with the end-of-
    sequence output row zeroed (module doc); returns ``directory``."""
    import transformers as tf

    from petserve.adapters.backbone.tokenizer import TINY_VOCAB_SIZE
    fields = {"vocab_size": TINY_VOCAB_SIZE, **BACKBONES[size]}
    cfg = tf.T5Config(**fields, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[cfg.eos_token_id].zero_()
    model.save_pretrained(directory)
    return Path(directory)


def serving_backbone(size: str, directory: Path, feat_dim: int = 16) -> Path:
    """A petserve backbone directory for the HTTP benchmark: the language model of
    :func:`hf_t5_checkpoint` plus a visual embedding for ``feat_dim``-wide precomputed features
    (the HTTP API needs a visual input: each request sends one small feature row)."""
    from dataclasses import replace

    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.backbone.config import VisionConfig
    from petserve.adapters.backbone.loading import init_weights, save_backbone
    from petserve.adapters.backbone.model import VLModel
    lm = build_backbone(hf_t5_checkpoint(size, Path(directory) / "hf"))
    cfg = replace(lm.cfg, name=f"bench-{size}", vision=VisionConfig(kind="features",
                                                                   feat_dim=feat_dim))
    torch.manual_seed(0)
    model = VLModel(cfg, lm.tokenizer)
    init_weights(model)
    model.lm.load_state_dict(lm.lm.state_dict())
    save_backbone(model, Path(directory) / "backbone")
    return Path(directory) / "backbone"


def random_adapter_bytes(model, kind: str, options: dict, seed: int, noise: float = 0.05) -> bytes:
    """A petserve adapter file of ``kind``: its paper initialisation plus Gaussian noise."""
    from petserve.adapters.adapter_file import adapter_bytes
    from petserve.adapters.kinds import get_kind
    k = get_kind(kind)
    cfg = k.resolve(k.Config(**options), model)
    params = k.init_params(cfg, model, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    params = {n: v + noise * torch.randn(v.shape, generator=g).to(v) for n, v in params.items()}
    return adapter_bytes(kind, cfg, params, model, "vqa", name=f"bench-{kind}-{seed}")


def workload_adapter_bytes(model, w: Workload, i: int) -> bytes:
    kind, options = kind_of(i, w.kinds)
    return random_adapter_bytes(model, kind, options, seed=i)


def fill_store(store, model, w: Workload, blobs: dict[str, bytes] | None = None) -> list[str]:
    """Put the workload's adapters into ``store`` (validated like an upload); ``blobs`` (id ->
    bytes, e.g. imported PEFT LoRAs) override the generated ones. Returns the ids."""
    from petserve.serving.uploads import prepare_upload
    ids = []
    for i in range(w.adapters):
        aid = adapter_id(i, w.kinds)
        data = (blobs or {}).get(aid) or workload_adapter_bytes(model, w, i)
        blob, meta = prepare_upload(data, model, max_bytes=1 << 30)
        store.put(aid, blob, meta)
        ids.append(aid)
    return ids
