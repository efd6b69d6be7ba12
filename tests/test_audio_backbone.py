"""The audio family's backbone and its new runtime forms (PETL for AST): our AST equals
transformers' ASTModel, the conformer block equals its torch modules, and rows of every audio
adapter configuration mixed in one batch equal each row alone."""
from __future__ import annotations

import pytest
import torch
from transformers import ASTModel

from petserve.adapters.backbone.audio import build_audio_backbone, save_audio_backbone
from petserve.adapters.kinds import get_kind
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import SingleAdapterWeights
from petserve.kernels import ConformerStack, conformer_reference, conformer_residual

LABELS = ("a", "b", "c")


@pytest.fixture(scope="module")
def ast():
    return build_audio_backbone("tiny-ast", seed=3)


def fbank(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 100, 64, generator=torch.Generator().manual_seed(seed))


def test_our_ast_equals_transformers_and_round_trips(ast, tmp_path) -> None:
    save_audio_backbone(ast, tmp_path)
    hf = ASTModel.from_pretrained(str(tmp_path)).eval()
    again = build_audio_backbone(tmp_path)
    assert again.fingerprint == ast.fingerprint
    x = fbank(3)
    with torch.no_grad():
        want = hf(x).last_hidden_state
        got, valid = again.encode(x, StepContext.backbone_only(3, "cpu"))
    assert valid.all() and got.shape == want.shape == (3, ast.cfg.num_tokens, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_directory_of_another_model_is_refused(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_audio_backbone(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="not an audio-spectrogram-transformer"):
        build_audio_backbone(tmp_path)


def _stack(ranks, kernels, from_input, d=16, R=6, K=7, seed=0) -> ConformerStack:
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    W1, b1, dw, bdw = rnd(S, 2 * R, d), rnd(S, 2 * R), torch.zeros(S, R, K), rnd(S, R)
    for s, (r, k) in enumerate(zip(ranks, kernels)):
        dw[s, :r, (K - k) // 2:(K - k) // 2 + k] = rnd(r, k)
        for t in (W1[s, r:R], W1[s, R + r:], b1[s, r:R], b1[s, R + r:], bdw[s, r:]):
            t.zero_()
    W2 = rnd(S, d, R)
    bn_w, bn_b, mean, var = rnd(S, R), rnd(S, R), rnd(S, R), rnd(S, R).abs() + 0.5
    for s, r in enumerate(ranks):
        for t in (W2[s, :, r:], bn_w[s, r:], bn_b[s, r:], mean[s, r:], var[s, r:]):
            t.zero_()
    return ConformerStack(W1, b1, dw, bdw, bn_w, bn_b, mean, var, W2, rnd(S, d), list(ranks),
                          list(kernels), list(from_input), [1e-5] * S)


def test_conformer_block_equals_its_torch_modules_on_padded_mixed_rows() -> None:
    w = _stack(ranks=(6, 3, 0, 4), kernels=(7, 3, 1, 5), from_input=(True, False, False, True))
    g = torch.Generator().manual_seed(1)
    h, x = torch.randn(6, 11, 16, generator=g), torch.randn(6, 11, 16, generator=g)
    valid = torch.arange(11)[None] < torch.tensor([11, 9, 11, 5, 11, 8])[:, None]
    slots = [0, 1, -1, 3, 2, 0]
    got = conformer_residual(h, x, valid, w, slots)
    want = conformer_reference(h, x, valid, w, slots)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[2], h[2]) and torch.equal(got[4], h[4])     # no block: untouched
    for i, s in enumerate(slots):                                       # a row alone
        n = int(valid[i].sum())
        alone = conformer_residual(h[i:i + 1, :n], x[i:i + 1, :n], None, w, [s])
        torch.testing.assert_close(got[i:i + 1, :n], alone, atol=1e-5, rtol=1e-5)


def _adapters(model):
    """One adapter of every audio configuration, each with its head (random, so each acts)."""
    specs = [("adapter", {"block": "conformer", "placement": "pfeiffer", "mode": "parallel",
                          "reduction_factor": 8, "kernel_size": 5}),
             ("adapter", {"block": "conformer", "placement": "houlsby", "mode": "sequential",
                          "reduction_factor": 16, "kernel_size": 3}),
             ("adapter", {"placement": "houlsby", "mode": "sequential", "reduction_factor": 8}),
             ("adapter", {"placement": "pfeiffer", "mode": "parallel", "reduction_factor": 4}),
             ("lora", {"r": 4, "alpha": 4, "targets": ("enc.self.q", "enc.self.v"),
                       "train_biases": False}),
             ("prompt", {"length": 3, "mid_dim": 8}),
             ("prompt", {"length": 5, "mid_dim": 8})]
    out = []
    for i, (kind, opts) in enumerate(specs):
        k = get_kind(kind)
        cfg = k.Config(**opts, train_visual_embedding=False, labels=LABELS[:2 + i % 2])
        params = k.init_params(cfg, model, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        for name, v in params.items():        # move off the identity start so every form acts
            if name.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.is_floating_point() and not name.startswith("vec."):
                v.add_(0.3 * torch.randn(v.shape, generator=g))
        out.append(k.compile(cfg, params, model))
    return out


def test_audio_rows_of_every_configuration_mixed_equal_each_alone(ast) -> None:
    compiled = _adapters(ast)
    bank = SlotBank(ast, len(compiled))
    for s, c in enumerate(compiled):
        bank.set(s, c)
    slots = [0, 5, 1, 2, 6, 3, 4, 0, 6]
    x = fbank(len(slots), seed=2)
    with torch.no_grad():
        mixed = ast.classify(x, StepContext(bank, BatchMeta.build(slots, bank.num_slots, "cpu")))
        bare = ast.pooled(x, StepContext.backbone_only(len(slots), "cpu"))
        for i, s in enumerate(slots):
            one = SlotBank(ast, 1)
            one.set(0, compiled[s])
            alone = ast.classify(x[i:i + 1], StepContext(one, BatchMeta.build([0], 1, "cpu")))
            C = bank.head().classes_host[s]
            assert C == 2 + s % 2
            torch.testing.assert_close(mixed[i, :C], alone[0, :C], atol=1e-5, rtol=1e-5)
            # the adapter's modules act: its head on the bare features gives other logits
            head = compiled[s].head
            assert (bare[i] @ head.W.T + head.b - alone[0, :C]).abs().max() > 1e-2


def test_conformer_training_statistics_follow_batchnorm(ast) -> None:
    k = get_kind("adapter")
    cfg = k.Config(block="conformer", placement="pfeiffer", mode="parallel", kernel_size=3,
                   train_visual_embedding=False, labels=LABELS)
    params = k.init_params(cfg, ast, seed=0)
    site = "enc.0.ffn"
    bn = torch.nn.BatchNorm1d(8)
    compiled = k.compile(cfg, params, ast)
    f = compiled.conformer[site]
    w = SingleAdapterWeights(compiled, ast.lm.vector_params(), {}, batch_stats=True)
    h, x = torch.randn(4, 10, 64), torch.randn(4, 10, 64)
    stack = w.conformer(site)
    out = conformer_residual(h, x, None, stack, [0] * 4)
    # the same block as modules in train mode
    z = torch.nn.functional.glu(x @ f.W1.T + f.b1, dim=-1).transpose(1, 2)
    z = torch.nn.functional.conv1d(z, f.dw.unsqueeze(1), f.bdw, padding=1, groups=8)
    want = h + torch.nn.functional.silu(bn.train()(z)).transpose(1, 2) @ f.W2.T + f.b2
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(params[f"adapter.{site}.conformer.bn.running_mean"], bn.running_mean)
    torch.testing.assert_close(params[f"adapter.{site}.conformer.bn.running_var"], bn.running_var)
    assert k.buffers(cfg, ast) >= {f"adapter.{site}.conformer.bn.running_mean"}


def test_audio_adapter_configs_refuse_what_they_cannot_be() -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="odd"):
        get_kind("adapter").Config(block="conformer", kernel_size=4)
    with pytest.raises(ValidationError, match="sharing"):
        get_kind("adapter").Config(block="conformer", sharing="multiple", tasks=("a", "b"))
    with pytest.raises(ValidationError, match="no 'conformer' block"):
        get_kind("compacter").Config(block="conformer")
    with pytest.raises(ValidationError, match="distinct"):
        get_kind("lora").Config(labels=("a", "a"))


def _legacy_name(k: str) -> str:
    """transformers 4.x's ASTForAudioClassification name of a transformers 5 ASTModel name."""
    import re
    qkv = {"q": "query", "k": "key", "v": "value"}
    k = re.sub(r"^layers\.(\d+)\.attention\.([qkv])_proj",
               lambda g: f"encoder.layer.{g[1]}.attention.attention.{qkv[g[2]]}", k)
    k = re.sub(r"^layers\.(\d+)\.attention\.o_proj", r"encoder.layer.\1.attention.output.dense", k)
    k = re.sub(r"^layers\.(\d+)\.mlp\.fc1", r"encoder.layer.\1.intermediate.dense", k)
    k = re.sub(r"^layers\.(\d+)\.mlp\.fc2", r"encoder.layer.\1.output.dense", k)
    k = re.sub(r"^layers\.(\d+)\.layernorm", r"encoder.layer.\1.layernorm", k)
    return "audio_spectrogram_transformer." + k


def test_an_older_checkpoints_names_are_converted(ast, tmp_path) -> None:
    """MIT/ast-finetuned-audioset-* was saved by transformers 4.x (attention.attention.query,
    intermediate.dense, the classification model's prefix): transformers' loader converts it."""
    from safetensors.torch import load_file, save_file
    save_audio_backbone(ast, tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file({_legacy_name(k): v for k, v in load_file(str(weights)).items()}, str(weights))
    assert build_audio_backbone(tmp_path).fingerprint == ast.fingerprint
