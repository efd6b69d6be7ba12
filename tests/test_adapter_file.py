"""Adapter files: a round trip, and every way a file can be broken gets its own clear error."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from petserve.adapters.adapter_file import AdapterFileError, adapter_bytes, load_adapter, save_adapter
from petserve.adapters.backbone import build_backbone
from tests.conftest import random_adapter


@pytest.fixture(scope="module")
def good(tiny_t5):
    cfg, params = random_adapter(tiny_t5, "lora", {"r": 4}, seed=0)
    return cfg, params, adapter_bytes("lora", cfg, params, tiny_t5, task="vqa", name="colors")


def test_round_trip(tiny_t5, good, tmp_path):
    cfg, params, data = good
    path = save_adapter(tmp_path / "a.safetensors", "lora", cfg, params, tiny_t5, task="vqa")
    for source in (data, path):
        af = load_adapter(source, tiny_t5)
        assert af.kind == "lora" and af.config == cfg and af.meta.task == "vqa"
        assert af.meta.backbone.fingerprint == tiny_t5.fingerprint
        assert af.meta.trainable_parameters == sum(v.numel() for v in params.values())
        for k, v in params.items():
            torch.testing.assert_close(af.params[k], v, atol=0, rtol=0)


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _with_meta(data: bytes, **changes) -> bytes:
    header, body = _split(data)
    meta = json.loads(header["__metadata__"]["petserve"])
    meta.update(changes)
    header["__metadata__"]["petserve"] = json.dumps(meta)
    return _join(header, body)


def _tensors(params, meta_json, edit):
    tensors = {k: v.clone() for k, v in params.items()}
    edit(tensors)
    return save(tensors, metadata={"petserve": meta_json})


def _meta_json(data):
    return _split(data)[0]["__metadata__"]["petserve"]


def broken_files(good):
    cfg, params, data = good
    meta = _meta_json(data)
    header, body = _split(data)
    first = sorted(k for k in header if k != "__metadata__")[0]
    bad_offsets = json.loads(json.dumps(header))
    bad_offsets[first]["data_offsets"][1] += 4
    bad_dtype = json.loads(json.dumps(header))
    bad_dtype[first]["dtype"] = "F64"
    no_meta = json.loads(json.dumps(header))
    del no_meta["__metadata__"]
    lora_a = next(k for k in params if k.endswith(".A"))

    def nan(t):
        t[lora_a][0, 0] = float("nan")

    def infinite(t):
        t[lora_a][0, 0] = float("inf")

    def both_infinities(t):                  # they cancel in a sum into NaN, never into a number
        t[lora_a][0, 0], t[lora_a][0, 1] = float("inf"), float("-inf")
    return {
        "not_safetensors/empty": (b"", "not_safetensors"),
        "not_safetensors/pickle": (b"\x80\x04\x95" + b"\x00" * 64, "not_safetensors"),
        "not_safetensors/zip": (b"PK\x03\x04" + b"\x00" * 40, "not_safetensors"),
        "header_not_json": (struct.pack("<Q", 5) + b"{nope" + b"\x00" * 8, "not_safetensors"),
        "truncated": (data[: len(data) - 100], "truncated"),
        "corrupt_offsets": (_join(bad_offsets, body), "corrupt_tensor_table"),
        "bad_dtype": (_join(bad_dtype, body), "bad_dtype"),
        "missing_metadata": (_join(no_meta, body), "missing_metadata"),
        "metadata_not_json": (_join({**header, "__metadata__": {"petserve": "{not json"}}, body),
                              "bad_metadata"),
        "future_version": (_with_meta(data, format_version=99), "unsupported_format_version"),
        "unknown_kind": (_with_meta(data, kind="ia3"), "unknown_kind"),
        "invalid_config": (_with_meta(data, config={"r": -3}), "invalid_config"),
        "unknown_option": (_with_meta(data, config={"r": 4, "rnak": 2}), "invalid_config"),
        "wrong_backbone": (_with_meta(data, backbone={"fingerprint": "0" * 16, "name": "t5-base"}),
                           "wrong_backbone"),
        "bad_task": (_with_meta(data, task="translation"), "invalid_task"),
        "missing_tensor": (_tensors(params, meta, lambda t: t.pop(lora_a)), "missing_tensors"),
        "extra_tensor": (_tensors(params, meta, lambda t: t.update(extra=torch.zeros(2))),
                         "unexpected_tensors"),
        "wrong_shape": (_tensors(params, meta, lambda t: t.update({lora_a: torch.zeros(3, 7)})),
                        "shape_mismatch"),
        "non_finite": (_tensors(params, meta, nan), "non_finite"),
        "non_finite/inf": (_tensors(params, meta, infinite), "non_finite"),
        "non_finite/both_infinities": (_tensors(params, meta, both_infinities), "non_finite"),
        "oversize": (data + b" " * 10, "adapter_too_large"),
    }


def test_broken_files_each_get_their_own_clear_error(tiny_t5, good):
    cases = broken_files(good)
    seen_codes = set()
    for name, (data, code) in cases.items():
        limit = len(good[2]) + 5 if name == "oversize" else 2**30
        try:
            load_adapter(data, tiny_t5, max_bytes=limit)
            pytest.fail(f"{name}: loaded without error")
        except AdapterFileError as err:
            assert err.code == code, (name, err.code, err.message)
            assert len(err.message) > 15 and "Traceback" not in err.message
        seen_codes.add(code)
    assert len(cases) >= 15 and len(seen_codes) >= 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values_are_found_in_any_tensor_of_any_float_dtype(tiny_t5, good, dtype):
    """The finiteness check reads every float tensor's bits: a NaN or infinity at the last element
    of a tensor in the middle of the file names that tensor; the largest finite values, -0 and
    subnormals load."""
    cfg, params, _ = good
    names = sorted(params)
    extremes = torch.finfo(dtype).max
    edge = {k: v.to(dtype, copy=True) for k, v in params.items()}
    flat = edge[names[1]].view(-1)
    flat[0], flat[1], flat[-1] = extremes, -0.0, torch.finfo(dtype).tiny / 4     # subnormal
    data = adapter_bytes("lora", cfg, edge, tiny_t5, task="vqa", dtype=dtype)
    assert load_adapter(data, tiny_t5).params[names[1]].view(-1)[0].item() == extremes
    for bad in (float("nan"), float("inf"), float("-inf")):
        for victim in (names[len(names) // 2], names[-1]):
            broken = {k: v.clone() for k, v in edge.items()}
            broken[victim].view(-1)[-1] = bad
            with pytest.raises(AdapterFileError, match=f"tensor '{victim}' contains NaN"):
                load_adapter(adapter_bytes("lora", cfg, broken, tiny_t5, task="vqa", dtype=dtype),
                             tiny_t5)


def test_adapter_for_another_backbone_is_refused(good):
    other = build_backbone("tiny-t5", seed=1)
    with pytest.raises(AdapterFileError, match="trained for backbone"):
        load_adapter(good[2], other)


def test_fp16_adapter_files_load(tiny_t5, good):
    cfg, params, _ = good
    data = adapter_bytes("lora", cfg, params, tiny_t5, task="vqa", dtype=torch.float16)
    af = load_adapter(data, tiny_t5)
    assert af.params[next(iter(params))].dtype == torch.float16


def test_extreme_finite_values_load(tiny_t5, good):
    """The finiteness check sums in fp64: fp32's largest values, many of them, are still finite."""
    _, params, data = good
    lora_a = next(k for k in params if k.endswith(".A"))

    def extreme(t):
        t[lora_a].fill_(torch.finfo(torch.float32).max)
    loaded = load_adapter(_tensors(params, _meta_json(data), extreme), tiny_t5, max_bytes=2**30)
    assert torch.all(loaded.params[lora_a] == torch.finfo(torch.float32).max)
