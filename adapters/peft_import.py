"""Import a PEFT LoRA (``adapter_config.json`` + ``adapter_model.safetensors``) as a ``lora`` adapter.

PEFT's module paths (``base_model.model.encoder.block.0.layer.0.SelfAttention.q``) map to our sites
(``enc.0.self.q``) with the same rules that load Hugging Face weights. What our LoRA kind cannot
express is refused with a clear error (DoRA, per-module ranks, a subset of layers, pickled weights).
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch

from petserve.adapters.adapter_file import (
    FORMAT_VERSION,
    AdapterFile,
    AdapterFileError,
    AdapterMeta,
    BackboneRef,
)
from petserve.adapters.backbone.hf_weights import own_name, site_of
from petserve.adapters.backbone.model import VLModel
from petserve.adapters.kinds.lora import LoRA, LoRAConfig

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def read_peft_dir(source: Path | bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) from a directory or the bytes of a zip of one."""
    from safetensors.torch import load as st_load
    if isinstance(source, (str, Path)):
        files = {p.name: p.read_bytes() for p in Path(source).iterdir() if p.is_file()}
    else:
        try:
            with zipfile.ZipFile(io.BytesIO(source)) as z:
                files = {Path(n).name: z.read(n) for n in z.namelist() if not n.endswith("/")}
        except zipfile.BadZipFile as e:
            raise AdapterFileError(
                "not_peft_zip", f"upload is neither a safetensors file nor a zip: {e}") from None
    if "adapter_config.json" not in files:
        raise AdapterFileError("not_peft_dir", "PEFT adapter has no adapter_config.json")
    if "adapter_model.safetensors" not in files:
        raise AdapterFileError("not_peft_dir", "PEFT adapter has no adapter_model.safetensors "
                               "(pickled adapter_model.bin is never loaded)")
    try:
        config = json.loads(files["adapter_config.json"])
        tensors = st_load(files["adapter_model.safetensors"])
    except Exception as e:  # noqa: BLE001 - any parse failure is the client's file
        raise AdapterFileError("bad_peft_files", f"cannot read PEFT adapter files: {e}") from e
    return config, tensors


def import_peft_lora(source: Path | bytes, model: VLModel, task: str = "vqa") -> AdapterFile:
    """A validated ``lora`` AdapterFile for ``model`` from a PEFT LoRA directory or zip."""
    pc, tensors = read_peft_dir(source)
    _refuse_unsupported(pc)
    family = model.cfg.lm.family
    params, patterns = {}, set()
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterFileError("unexpected_tensors", f"PEFT tensor {key!r} is not a LoRA A/B weight")
        try:
            own = own_name(m["module"] + ".weight", family)
        except KeyError:
            raise AdapterFileError("shape_mismatch", f"PEFT module {m['module']!r} does not exist in "
                                   f"this {family} backbone") from None
        site = site_of(own.removesuffix(".weight"))
        stream, _layer, sub, lin = site.split(".")
        patterns.add(f"{stream}.{sub}.{lin}")
        params[f"lora.{site}.{m['ab']}"] = t.float()
    cfg = LoRAConfig(r=int(pc["r"]), alpha=float(pc.get("lora_alpha", pc["r"])),
                     dropout=float(pc.get("lora_dropout", 0.0)), targets=tuple(sorted(patterns)),
                     train_biases=False, train_visual_embedding=False, rslora=bool(pc.get("use_rslora")))
    expected = LoRA.param_shapes(cfg, model)
    if set(expected) != set(params):
        raise AdapterFileError("missing_tensors", "PEFT adapter covers only some layers of its target "
                               "modules; petserve LoRA adapts every layer of a target")
    for k, shape in expected.items():
        if tuple(params[k].shape) != shape:
            raise AdapterFileError("shape_mismatch", f"PEFT tensor for {k} has shape "
                                   f"{list(params[k].shape)}, expected {list(shape)}")
    meta = AdapterMeta(format_version=FORMAT_VERSION, kind="lora", config=cfg.model_dump(mode="json"),
                       backbone=BackboneRef(fingerprint=model.fingerprint, name=model.cfg.name), task=task,
                       trainable_parameters=sum(v.numel() for v in params.values()), name="peft-import")
    return AdapterFile(meta, cfg, params)


def _refuse_unsupported(pc: dict) -> None:
    if pc.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError("unsupported_peft", f"PEFT type {pc.get('peft_type')} is not LoRA")
    for flag, what in (("use_dora", "DoRA"), ("rank_pattern", "per-module ranks"),
                       ("alpha_pattern", "per-module alphas"), ("layers_to_transform", "a subset of layers")):
        if pc.get(flag):
            raise AdapterFileError("unsupported_peft", f"PEFT LoRA with {what} ({flag}) is not supported")
    if pc.get("bias", "none") != "none":
        raise AdapterFileError("unsupported_peft", "PEFT LoRA with trained biases (bias != 'none') "
                               "is not supported")
    if pc.get("modules_to_save"):
        raise AdapterFileError("unsupported_peft", "PEFT modules_to_save (fully trained modules) "
                               "are not supported")
    if "r" not in pc:
        raise AdapterFileError("bad_peft_files", "adapter_config.json has no rank 'r'")
