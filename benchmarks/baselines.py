"""Baselines for the serving benchmarks, on the same backbone weights and workload as the engine.

* ``peft_mixed``: Hugging Face PEFT with every LoRA loaded into one PeftModel, static batches of
  ``batch`` requests in arrival order, ``model.generate(..., adapter_names=[...])`` (PEFT's
  mixed-adapter batch: a Python loop over the adapters of the batch in every LoRA layer).
* ``hf_backbone``: the same Hugging Face model and batches with the adapters disabled
  (``peft_mixed`` on requests without adapter): the ceiling PEFT's mixed batch falls short of.
* ``per_adapter``: our backbone, requests grouped by adapter, each group run as its own batches
  (``adapters.generation.generate`` on one slot): what a server without mixed batching does.
* ``merged``: one LoRA merged into the weights (PEFT ``merge_and_unload``), served as a plain
  backbone: the upper bound of single-adapter serving.
* ``backbone``: the frozen backbone alone (see bench_engine, which serves it through the engine).

The LoRAs are created with PEFT (:func:`make_peft_loras`), saved, and imported into our store with
``adapters.peft_import`` (the same zip a client would ``PUT``), so both sides hold the same weights.
Every runner returns ``{"requests", "tokens", "elapsed_s"}``; tokens are generated tokens
(end-of-sequence excluded), counted from the outputs. The LoRAs' B matrices are drawn with std 0.5
so that different adapters visibly change the (random) backbone's greedy outputs.
"""
from __future__ import annotations

import io
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import torch

from petserve.benchmarks.workloads import LORA, RequestSpec, adapter_id

PEFT_TARGETS = ["q", "v"]       # every attention's q and v: our LoRA's DEFAULT_TARGETS


def make_peft_loras(hf_dir: Path, n: int, out_dir: Path, std: float = 0.5):
    """A PeftModel on the checkpoint in ``hf_dir`` holding ``n`` LoRAs named adapter_id(i), with
    B drawn from N(0, std) (a "trained" LoRA), each saved to out_dir/<id>. Returns the model."""
    import peft
    import transformers as tf
    options = LORA[1]
    cfg = peft.LoraConfig(r=options["r"], lora_alpha=options["alpha"], lora_dropout=0.0,
                          target_modules=PEFT_TARGETS)
    base = tf.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    model = peft.get_peft_model(base, cfg, adapter_name=adapter_id(0))
    for i in range(1, n):
        model.add_adapter(adapter_id(i), cfg)
    for i in range(n):
        g = torch.Generator().manual_seed(20_000 + i)
        for name, p in model.named_parameters():
            if f"lora_B.{adapter_id(i)}." in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out_dir, selected_adapters=[adapter_id(i) for i in range(n)])
    return model.eval()


def peft_dir(out_dir: Path, i: int) -> Path:
    """Where make_peft_loras saved adapter i (PEFT puts non-default adapters in a subfolder)."""
    sub = Path(out_dir) / adapter_id(i)
    return sub if (sub / "adapter_config.json").exists() else Path(out_dir)


def peft_zip(directory: Path) -> bytes:
    """The zip of a PEFT LoRA directory, as a client uploads it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                z.write(p, p.name)
    return buf.getvalue()


def encode_batch(model, requests: list[RequestSpec], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) right-padded: the ids our engine feeds its encoder."""
    rows = [model.row_input("vqa", r.text, None).ids for r in requests]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.cfg.lm.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(device), (ids != model.cfg.lm.pad_id).long().to(device)


def generated(out: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row's new tokens up to (not including) its first end-of-sequence; out: (B, 1 + new)."""
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


@torch.inference_mode()
def peft_mixed(peft_model, ours, requests: list[RequestSpec], batch: int) -> dict:
    """PEFT mixed-adapter batches (``adapter_names`` per row). Requests without adapter run
    the plain Hugging Face model (adapters disabled). Also returns ``outputs``: each request's
    generated tokens (to compare with the engine's)."""
    dev = next(peft_model.parameters()).device
    eos = ours.cfg.lm.eos_id
    outputs, t0 = [], time.perf_counter()
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        ids, mask = encode_batch(ours, chunk, dev)
        options = dict(max_new_tokens=chunk[0].max_new_tokens, do_sample=False, num_beams=1)
        if all(r.adapter is None for r in chunk):
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, attention_mask=mask, **options)
        else:
            names = [r.adapter or "__base__" for r in chunk]
            out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                      **options)
        outputs += generated(out, eos)
    elapsed = time.perf_counter() - t0
    return {"requests": len(requests), "tokens": sum(map(len, outputs)), "elapsed_s": elapsed,
            "outputs": outputs}


def compiled_bank(model, store, ids: list[str]):
    """A SlotBank holding the stored adapters ``ids`` in slots 0.. (latest versions)."""
    from petserve.adapters.runtime.bank import SlotBank
    from petserve.serving.slot_pool import compile_on_cpu, parse_stored
    bank = SlotBank(model, max(1, len(ids)))
    for slot, aid in enumerate(ids):
        af = parse_stored(store.read(aid, store.get(aid).version), model)
        bank.set(slot, compile_on_cpu(af, model, None))
    return bank


@torch.inference_mode()
def per_adapter(model, bank, slot_of: dict[str, int], requests: list[RequestSpec],
                batch: int) -> dict:
    """Requests grouped by adapter (first-seen order), each group in batches of ``batch``."""
    from petserve.adapters.generation import GenerationRequest, generate
    groups = defaultdict(list)
    for r in requests:
        groups[r.adapter].append(r)
    tokens, t0 = 0, time.perf_counter()
    for aid, group in groups.items():
        slot = -1 if aid is None else slot_of[aid]
        for start in range(0, len(group), batch):
            gen = [GenerationRequest(model.row_input("vqa", r.text, None), slot, r.max_new_tokens)
                   for r in group[start:start + batch]]
            tokens += sum(len(res.tokens) for res in generate(model, bank, gen))
    return {"requests": len(requests), "tokens": tokens, "elapsed_s": time.perf_counter() - t0}


def merged_checkpoint(hf_dir: Path, lora_dir: Path, out_dir: Path) -> Path:
    """The checkpoint with one PEFT LoRA merged into its weights (``merge_and_unload``)."""
    import peft
    import transformers as tf
    base = tf.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    merged = peft.PeftModel.from_pretrained(base, lora_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    return Path(out_dir)
