"""prepare_upload: petserve files pass through, zipped PEFT LoRA dirs become petserve files, and
every broken upload is a 4xx ApiError carrying the AdapterFileError code."""
from __future__ import annotations

import io
import json
import zipfile

import peft
import pytest
import torch

from petserve.adapters.adapter_file import adapter_bytes, load_adapter
from petserve.adapters.backbone import build_backbone
from petserve.adapters.peft_import import import_peft_lora
from petserve.serving.errors import ApiError
from petserve.serving.uploads import prepare_upload
from tests.conftest import random_adapter

MB = 2**20


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """(backbone built from a tiny HF T5, directory of a PEFT LoRA trained on that T5)."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base_dir = tmp_path_factory.mktemp("base")
    tf.T5ForConditionalGeneration(cfg).save_pretrained(base_dir)
    lora = peft.get_peft_model(tf.T5ForConditionalGeneration(cfg),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    lora_dir = tmp_path_factory.mktemp("lora")
    lora.save_pretrained(lora_dir)
    return build_backbone(base_dir), lora_dir


def zipped(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def dir_files(path) -> dict[str, bytes]:
    return {f"my-lora/{p.name}": p.read_bytes() for p in path.iterdir()}


def refused(data: bytes, model, max_bytes: int = 8 * MB) -> ApiError:
    with pytest.raises(ApiError) as e:
        prepare_upload(data, model, max_bytes)
    assert 400 <= e.value.status < 500, e.value
    return e.value


def test_petserve_file_is_stored_as_is(tiny_t5):
    cfg, params = random_adapter(tiny_t5, "vlpet", {"gate": "large"}, seed=0)
    data = adapter_bytes("vlpet", cfg, params, tiny_t5, "caption")
    stored, meta = prepare_upload(data, tiny_t5, 8 * MB)
    assert stored == data
    assert meta["kind"] == "vlpet" and meta["task"] == "caption"
    assert meta["trainable_parameters"] == sum(v.numel() for v in params.values())
    assert meta["backbone_fingerprint"] == tiny_t5.fingerprint
    json.dumps(meta)                                   # the store needs JSON-able metadata


def test_zipped_peft_lora_becomes_a_petserve_file(peft_dir):
    backbone, lora_dir = peft_dir
    stored, meta = prepare_upload(zipped(dir_files(lora_dir)), backbone, 8 * MB)
    af = load_adapter(stored, backbone)
    assert af.kind == meta["kind"] == "lora" and af.config.r == 4 and meta["task"] == "vqa"
    direct = import_peft_lora(lora_dir, backbone)
    assert af.params.keys() == direct.params.keys()
    for k, v in direct.params.items():
        torch.testing.assert_close(af.params[k], v)
    assert meta["trainable_parameters"] == sum(v.numel() for v in direct.params.values())


def test_peft_zip_without_config_or_weights_is_refused(peft_dir):
    backbone, lora_dir = peft_dir
    files = dir_files(lora_dir)
    no_config = {k: v for k, v in files.items() if not k.endswith("adapter_config.json")}
    no_weights = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    assert refused(zipped(no_config), backbone).code == "not_peft_dir"
    assert refused(zipped(no_weights), backbone).code == "not_peft_dir"


@pytest.mark.parametrize("config,code", [(b"[1, 2]", "bad_peft_files"), (b'{"r": "four"}', "bad_peft_files"),
                                         (b"{not json", "bad_peft_files"),
                                         (b'{"r": 4, "use_dora": true}', "unsupported_peft")])
def test_peft_zip_with_a_bad_config_is_refused(peft_dir, config, code):
    backbone, lora_dir = peft_dir
    files = {k: (config if k.endswith("adapter_config.json") else v) for k, v in dir_files(lora_dir).items()}
    err = refused(zipped(files), backbone)
    assert (err.status, err.code) == (422, code)


def test_garbage_and_foreign_files_are_refused(tiny_t5, tiny_bart):
    from safetensors.torch import save
    assert refused(b"hello, not an adapter", tiny_t5).code == "not_safetensors"
    assert refused(save({"w": torch.zeros(2)}), tiny_t5).code == "missing_metadata"
    assert refused(b"PK\x03\x04 truncated zip", tiny_t5).code == "not_peft_zip"
    cfg, params = random_adapter(tiny_t5, "lora", {"r": 4}, seed=1)
    for_t5 = adapter_bytes("lora", cfg, params, tiny_t5, "vqa")
    assert refused(for_t5, tiny_bart).code == "wrong_backbone"
    params = {k: v.clone() for k, v in params.items()}
    next(iter(params.values()))[0] = float("nan")
    assert refused(adapter_bytes("lora", cfg, params, tiny_t5, "vqa"), tiny_t5).code == "non_finite"


def test_oversized_uploads_are_413(tiny_t5, peft_dir):
    cfg, params = random_adapter(tiny_t5, "lora", {"r": 4}, seed=1)
    data = adapter_bytes("lora", cfg, params, tiny_t5, "vqa")
    err = refused(data, tiny_t5, max_bytes=len(data) - 1)
    assert (err.status, err.code) == (413, "adapter_too_large")
    bomb = zipped({"adapter_config.json": b"{}", "adapter_model.safetensors": bytes(4 * MB)})
    assert len(bomb) < MB
    err = refused(bomb, peft_dir[0], max_bytes=MB)
    assert (err.status, err.code) == (413, "adapter_too_large")
