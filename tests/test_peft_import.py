"""A PEFT LoRA trained on a tiny T5, imported, gives PEFT's own logits (peft is a test dependency)."""
from __future__ import annotations

import io
import zipfile

import peft
import pytest
import torch

from petserve.adapters.adapter_file import AdapterFileError
from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.model import RowInput
from petserve.adapters.peft_import import import_peft_lora
from petserve.adapters.runtime.bank import SlotBank
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = tf.T5ForConditionalGeneration(cfg).eval()
    base_dir = tmp_path_factory.mktemp("base")
    base.save_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)     # a "trained" LoRA: B away from zero
    model.eval()
    lora_dir = tmp_path_factory.mktemp("lora")
    model.save_pretrained(lora_dir)
    return model, build_backbone(base_dir), lora_dir


def _ours(backbone, bank, slot, ids, dec):
    ctx = StepContext(bank, BatchMeta.build([slot] * len(ids), bank.num_slots, "cpu"))
    enc, valid = backbone.encode([RowInput(r, None) for r in ids], ctx)
    cache = backbone.init_cache(enc, valid, ctx)
    return backbone.decode(dec, torch.arange(dec.shape[1]).expand_as(dec), cache, ctx)


def test_imported_peft_lora_gives_peft_logits(peft_pair):
    model, backbone, lora_dir = peft_pair
    af = import_peft_lora(lora_dir, backbone)
    assert af.kind == "lora" and af.config.r == 4 and af.config.alpha == 8
    bank = SlotBank(backbone, 3)
    bank.set(2, af.compile(backbone))
    ids = [[5, 9, 13, 27, 1], [7, 8, 1]]
    inp = torch.tensor([[5, 9, 13, 27, 1], [7, 8, 1, 0, 0]])
    mask = (torch.arange(5)[None] < torch.tensor([[5], [3]])).long()
    dec = torch.tensor([[0, 11, 12, 13]] * 2)
    with torch.no_grad():
        ref = model(input_ids=inp, attention_mask=mask, decoder_input_ids=dec).logits
        with model.disable_adapter():
            plain = model(input_ids=inp, attention_mask=mask, decoder_input_ids=dec).logits
        got = _ours(backbone, bank, 2, ids, dec)
    assert (ref - plain).abs().max() > 1e-2          # the LoRA really changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_zipped_directory_imports_too(peft_pair):
    _, backbone, lora_dir = peft_pair
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in lora_dir.iterdir():
            z.write(p, f"my-lora/{p.name}")
    assert import_peft_lora(buf.getvalue(), backbone).config.r == 4


def test_unsupported_peft_options_are_refused(peft_pair, tmp_path):
    import json
    _, backbone, lora_dir = peft_pair
    for p in lora_dir.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="DoRA"):
        import_peft_lora(tmp_path, backbone)
    with pytest.raises(AdapterFileError, match="zip"):
        import_peft_lora(b"not a zip at all", backbone)
