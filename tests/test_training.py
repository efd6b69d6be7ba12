"""The trainer: every registered kind learns, only its own tensors move, files reload exactly,
runs are reproducible and resumable, and the schedule is the papers'."""
from __future__ import annotations

import pytest
import torch

from petserve.adapters.adapter_file import load_adapter
from petserve.adapters.data import DataError, Example, make_demo_examples
from petserve.adapters.kinds import KINDS
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.training import (
    BatchBuilder,
    ExampleFeatures,
    TrainConfig,
    adapter_loss,
    adapter_weights,
    lr_at,
    save_trained,
    score,
    train_adapter,
    trained_adapter_bytes,
    warmup_steps,
)
from petserve.adapters.training.schedule import batch_indices

# Small but real options, so every kind trains in a second on the tiny backbone.
SMALL_OPTIONS = {"lora": {"r": 4}, "adapter": {"reduction_factor": 8},
                 "vlpet": {"r": 16, "gate_rank": 8, "decoder_r": 8},
                 # sft: random supports on the tied embedding and the decoder FFN outputs
                 "sft": {"entries": {"lm.tokens.weight": 4096,
                                     **{f"lm.dec_layers.{i}.ffn.wo.weight": 4096 for i in range(2)}}}}


def small_config(model, kind: str):
    cls = KINDS[kind]
    fields = cls.Config.model_fields
    options = {k: v for k, v in SMALL_OPTIONS.get(kind, {}).items() if k in fields}
    return cls.resolve(cls.Config(**options), model)


@pytest.fixture(scope="module")
def examples():
    return make_demo_examples("colors", 8, seed=11)


@pytest.fixture(scope="module")
def cache(tiny_t5):
    return ExampleFeatures(tiny_t5)


def quick(**overrides) -> TrainConfig:
    base = dict(steps=8, batch_size=4, lr=1e-2, progress=False, seed=3)
    return TrainConfig(**{**base, **overrides})


def loss_of(model, kind, cfg, params, examples, cache) -> float:
    rows, targets = BatchBuilder(model, examples, cache, "vqa").batch(list(range(len(examples))))
    with torch.no_grad():
        return float(adapter_loss(model, adapter_weights(model, KINDS[kind], cfg, params, "vqa"),
                                  rows, targets))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_lowers_the_loss(tiny_t5, examples, cache, kind):
    cfg = small_config(tiny_t5, kind)
    before = loss_of(tiny_t5, kind, cfg, KINDS[kind].init_params(cfg, tiny_t5, 3), examples, cache)
    result = train_adapter(tiny_t5, kind, cfg, examples, quick(steps=12, batch_size=8), cache=cache)
    after = loss_of(tiny_t5, kind, cfg, result.params, examples, cache)
    assert after < 0.7 * before, (kind, before, after)


def test_trainable_set_is_init_params_and_backbone_is_untouched(tiny_t5, examples, cache):
    snapshot = {k: v.clone() for k, v in tiny_t5.state_dict().items()}
    cfg = small_config(tiny_t5, "vlpet")
    init = KINDS["vlpet"].init_params(cfg, tiny_t5, 3)
    result = train_adapter(tiny_t5, "vlpet", cfg, examples, quick(), cache=cache)
    assert {k: v.shape for k, v in result.params.items()} == {k: v.shape for k, v in init.items()}
    assert any(not torch.equal(result.params[k], init[k]) for k in init)
    for k, v in tiny_t5.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert not any(p.requires_grad for p in tiny_t5.parameters())


def test_an_unfrozen_backbone_is_refused(tiny_t5, examples, cache):
    p = tiny_t5.lm.tokens.weight
    p.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="frozen"):
            train_adapter(tiny_t5, "lora", None, examples, quick(), cache=cache)
    finally:
        p.requires_grad_(False)


def _teacher_forced(model, weights, rows, slots):
    ctx = StepContext(weights, BatchMeta.build(slots, weights.num_slots, model.device))
    enc, valid = model.encode(rows, ctx)
    cache = model.init_cache(enc, valid, ctx)
    dec = torch.tensor([[model.cfg.lm.decoder_start_id, 11, 24, 7]] * len(rows))
    return model.decode(dec, torch.arange(4).expand_as(dec), cache, ctx)


def test_saved_adapter_reloads_to_identical_outputs(tiny_t5, examples, cache, tmp_path):
    cfg = small_config(tiny_t5, "lora")
    result = train_adapter(tiny_t5, "lora", cfg, examples, quick(), cache=cache)
    path = save_trained(tmp_path / "a.safetensors", result, tiny_t5)
    loaded = load_adapter(path, tiny_t5)
    assert (loaded.kind, loaded.meta.task, loaded.config) == ("lora", "vqa", cfg)
    rows = BatchBuilder(tiny_t5, examples[:3], cache, "vqa").rows([0, 1, 2])
    from_file, in_memory = SlotBank(tiny_t5, 2), SlotBank(tiny_t5, 2)
    from_file.set(1, loaded.compile(tiny_t5))
    in_memory.set(1, KINDS["lora"].compile(cfg, result.params, tiny_t5, "vqa"))
    with torch.no_grad():
        served = _teacher_forced(tiny_t5, from_file, rows, [1, 1, 1])
        assert torch.equal(served, _teacher_forced(tiny_t5, in_memory, rows, [1, 1, 1]))
        trained = _teacher_forced(tiny_t5, adapter_weights(tiny_t5, KINDS["lora"], cfg, result.params,
                                                           "vqa"), rows, [0, 0, 0])
    torch.testing.assert_close(served, trained, atol=1e-5, rtol=1e-5)


def test_same_seed_gives_the_same_bytes(tiny_t5, examples, cache):
    def run(seed):
        r = train_adapter(tiny_t5, "adapter", None, examples, quick(seed=seed), cache=cache)
        return trained_adapter_bytes(r, tiny_t5)
    first = run(5)
    assert run(5) == first
    assert run(6) != first


def test_resume_matches_an_uninterrupted_run(tiny_t5, examples, cache, tmp_path):
    whole = train_adapter(tiny_t5, "vlpet", small_config(tiny_t5, "vlpet"), examples,
                          quick(checkpoint_dir=tmp_path / "a"), cache=cache)
    part = quick(checkpoint_dir=tmp_path / "b", until_step=3)
    first = train_adapter(tiny_t5, "vlpet", small_config(tiny_t5, "vlpet"), examples, part, cache=cache)
    assert first.history.steps == [1, 2, 3]
    rest = train_adapter(tiny_t5, "vlpet", small_config(tiny_t5, "vlpet"), examples,
                         quick(checkpoint_dir=tmp_path / "b", resume=True), cache=cache)
    assert rest.history.steps == list(range(4, 9))
    assert rest.history.losses == whole.history.losses[3:]
    for k, v in whole.params.items():
        assert torch.equal(v, rest.params[k]), k


def test_resume_refuses_a_checkpoint_of_another_run(tiny_t5, examples, cache, tmp_path):
    train_adapter(tiny_t5, "lora", None, examples, quick(checkpoint_dir=tmp_path, until_step=2),
                  cache=cache)
    with pytest.raises(ValueError, match="another run: lr"):
        train_adapter(tiny_t5, "lora", None, examples,
                      quick(checkpoint_dir=tmp_path, resume=True, lr=5e-3), cache=cache)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable petserve checkpoint"):
        train_adapter(tiny_t5, "lora", None, examples, quick(checkpoint_dir=tmp_path, resume=True),
                      cache=cache)


def test_warmup_then_linear_decay():
    total, base = 100, 1e-3
    warm = warmup_steps(total, 0.1)
    lrs = [lr_at(s, total, warm, base) for s in range(total)]
    assert warm == 10
    assert lrs[0] == pytest.approx(base / 10) and lrs[9] == pytest.approx(base)
    assert lrs[10] == pytest.approx(base) and lrs[55] == pytest.approx(base * 45 / 90)
    assert lrs[-1] == pytest.approx(base / 90)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    with pytest.raises(ValueError):
        lr_at(100, total, warm, base)


def test_epochs_count_the_short_last_batch():
    assert TrainConfig(epochs=2, batch_size=3).total_steps(10) == 8
    assert TrainConfig(steps=5, epochs=2).total_steps(10) == 5


def test_each_epoch_visits_every_example_once():
    seen = [i for step in range(4) for i in batch_indices(step, 10, 3, seed=1)]
    assert sorted(seen) == list(range(10))                       # 4 batches: 3 + 3 + 3 + 1
    assert batch_indices(4, 10, 3, 1) != batch_indices(0, 10, 3, 1)  # next epoch reshuffles


def test_each_image_is_encoded_once(tiny_t5, examples):
    cache = ExampleFeatures(tiny_t5)
    copies = [Example(e.task, e.text, e.target, e.references, images=[e.images[0].copy()])
              for e in examples]                                 # same pixels, other objects
    train_adapter(tiny_t5, "lora", None, examples + copies, quick(steps=6), cache=cache)
    assert cache.encoded == len(examples)


def test_bad_training_data_is_reported(tiny_t5, examples, cache, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter(tiny_t5, "lora", None, [], quick(), cache=cache)
    captions = make_demo_examples("caption", 2, seed=1)
    with pytest.raises(ValueError, match="mix tasks"):
        train_adapter(tiny_t5, "lora", None, examples + captions, quick(), cache=cache)
    with pytest.raises(ValueError, match="holds vqa examples, but the task is caption"):
        train_adapter(tiny_t5, "lora", None, examples, quick(), task="caption", cache=cache)
    missing = Example("vqa", "what?", "red", ["red"], images=[tmp_path / "gone.png"])
    with pytest.raises(DataError, match="gone.png"):
        train_adapter(tiny_t5, "lora", None, [missing], quick(), cache=cache)


def test_scores_by_task():
    qa = make_demo_examples("count", 2, seed=1)
    assert score("vqa", [e.target for e in qa], qa) == {"vqa_accuracy": 1.0, "exact_match": 1.0}
    caps = make_demo_examples("caption", 3, seed=1)
    metrics = score("caption", [e.target for e in caps], caps)
    assert set(metrics) == {"bleu4", "cider", "exact_match"} and metrics["exact_match"] == 1.0
    assert score("caption", ["a"] * 3, caps)["exact_match"] == 0.0


def test_cached_tokens_equal_the_encoders_own(tiny_t5):
    pair = make_demo_examples("shapes", 2, seed=4)
    nlvr = Example("nlvr", "the left one is round", "true", ["true"],
                   images=[pair[0].images[0], pair[1].images[0]])
    cache = ExampleFeatures(tiny_t5)
    (tokens,) = cache.example_tokens([nlvr])
    direct = tiny_t5.vision.image_tokens(nlvr.load_images())
    for name in ("feats", "boxes", "order"):
        assert torch.equal(getattr(tokens, name), getattr(direct, name)), name
    assert cache.encoded == 2


def test_video_examples_train_from_arrays_and_files(tiny_t5, tmp_path):
    from petserve.adapters.data import load_jsonl, make_demo_video_examples, write_jsonl_dataset
    videos = make_demo_video_examples("count", 3, seed=2, num_frames=4, size=64)
    from_files = load_jsonl(write_jsonl_dataset(tmp_path, videos))
    cache = ExampleFeatures(tiny_t5)
    for data in (videos, from_files):
        result = train_adapter(tiny_t5, "lora", None, data, quick(steps=2, batch_size=3), cache=cache)
        assert result.task == "video_qa" and len(result.history.losses) == 2
    (tokens,) = cache.example_tokens(videos[:1])
    assert tokens.feats.shape[0] == 8                   # VIDEO_FRAMES, sampled from 4 frames


def test_lora_dropout_acts_in_training_only():
    """LoRA's dropout (0.1 in VL-Adapter) perturbs the training loss and nothing at inference."""
    import torch as _torch

    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.data import make_demo_examples
    from petserve.adapters.kinds import get_kind
    from petserve.adapters.training.trainer import adapter_loss, adapter_weights
    model = build_backbone("tiny-t5")
    kind = get_kind("lora")
    cfg = kind.Config(r=4, dropout=0.5)
    params = kind.init_params(cfg, model, seed=0)
    params = {k: v + 0.1 * _torch.randn_like(v) for k, v in params.items()}
    exs = make_demo_examples("colors", 2, 0)
    rows = [model.row_input(e.task, e.text, model.vision.image_tokens(e.load_images())) for e in exs]
    targets = [model.target_ids(e.target) for e in exs]
    w = adapter_weights(model, kind, cfg, params, "vqa")
    plain = [float(adapter_loss(model, w, rows, targets)) for _ in range(2)]
    dropped = [float(adapter_loss(model, w, rows, targets, dropout=0.5)) for _ in range(2)]
    assert plain[0] == plain[1]
    assert dropped[0] != dropped[1] and dropped[0] != plain[0]
