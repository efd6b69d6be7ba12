"""composable-sft's file format (``pytorch_diff.bin``) <-> our ``sft`` adapter tensors.

Theirs (cambridgeltl/composable-sft ``sft.py``, read for the layout): ``torch.save`` of
``{"diffs": {name: {"size", "index_steps", "values"}}, "abs": {name: tensor}}``. A diff's flat
indices count the *first* dimension fastest (``cumprod([1] + size[:-1])`` multipliers) and are
stored as successive differences sorted ascending; ``abs`` holds dense values. Ours: row-major
(C-order) flat indices, sorted and unique, float32 values, ``P.dense`` for an ``abs`` entry.

Names: a file's parameter names are those of the model it was trained on. Names of a Hugging Face
T5 / BART (``encoder.block.0.layer.0.SelfAttention.q.weight``) map to our backbone's
(``lm.enc_layers.0.self_attn.q.weight``); our own names pass through. The original names are
kept in the adapter's config (``names``) so that exporting writes them back: a round trip is exact.
"""
from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from petserve.adapters.backbone.hf_weights import own_name
from petserve.adapters.kinds.sft import DENSE, SFTConfig, targets


class SFTFormatError(ValueError):
    """A composable-sft file that cannot be read into this backbone; the message says why."""


def load_seed_sft(path: Path) -> dict:
    """The file's dict, unpickling only tensors, sizes, lists and numbers (never other objects)."""
    import numpy.core.multiarray as multiarray
    safe = [multiarray.scalar, np.dtype, type(np.dtype(np.int64))]
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SFTFormatError(f"{path}: refused: holds objects other than tensors and numbers "
                             f"({str(e).strip().splitlines()[-1][:160]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise SFTFormatError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict) or not ({"diffs", "abs"} & set(obj)):
        raise SFTFormatError(f"{path}: not a composable-sft file (no 'diffs' or 'abs')")
    return obj


def our_name(name: str, model) -> str:
    """Our state-dict name for a parameter name of their file (theirs: a Hugging Face model's)."""
    known = targets(model)
    if name in known:
        return name
    try:
        mapped = own_name(name, model.cfg.lm.family)
    except KeyError:
        mapped = None
    if mapped is not None and f"lm.{mapped}" in known:
        return f"lm.{mapped}"
    raise SFTFormatError(f"parameter {name!r} is not one this backbone has (or an sft may change)")


def from_seed(obj: dict, model) -> tuple[SFTConfig, dict[str, torch.Tensor]]:
    """Their dict -> (our sft config, our tensors)."""
    known, entries, names, params = targets(model), {}, {}, {}
    for name, enc in (obj.get("diffs") or {}).items():
        ours = _claim(name, model, names)
        shape = known[ours][2]
        size = tuple(int(s) for s in enc["size"])
        if size != shape:
            raise SFTFormatError(f"diff {name!r} has size {list(size)}, the backbone's is {list(shape)}")
        steps = np.asarray([int(s) for s in enc["index_steps"]], dtype=np.int64)
        fortran = np.cumsum(steps)
        if fortran.size and (fortran.min() < 0 or fortran.max() >= math.prod(shape)):
            raise SFTFormatError(f"diff {name!r} has indices outside the parameter")
        coords = np.unravel_index(fortran, shape, order="F")
        flat = np.ravel_multi_index(coords, shape, order="C")
        order = np.argsort(flat, kind="stable")
        values = torch.as_tensor(enc["values"]).reshape(-1)
        if values.shape[0] != flat.shape[0]:
            raise SFTFormatError(f"diff {name!r}: {flat.shape[0]} indices but {values.shape[0]} values")
        if np.unique(flat).shape[0] != flat.shape[0]:
            raise SFTFormatError(f"diff {name!r} has repeated indices")
        params[f"{ours}.idx"] = torch.from_numpy(flat[order].copy())
        params[f"{ours}.val"] = values[torch.from_numpy(order)].to(torch.float32)
        entries[ours] = int(flat.shape[0])
    for name, value in (obj.get("abs") or {}).items():
        ours = _claim(name, model, names)
        value = torch.as_tensor(value)
        if tuple(value.shape) != known[ours][2]:
            raise SFTFormatError(f"abs {name!r} has shape {list(value.shape)}, the backbone's is "
                                 f"{list(known[ours][2])}")
        params[f"{ours}.dense"] = value.to(torch.float32).clone()
        entries[ours] = DENSE
    return SFTConfig(entries=entries, names=names), params


def _claim(name: str, model, names: dict) -> str:
    ours = our_name(str(name), model)
    if ours in names:
        raise SFTFormatError(f"parameter {name!r} appears twice (as {names[ours]!r} too)")
    names[ours] = str(name)
    return ours


def to_seed(cfg: SFTConfig, params: dict[str, torch.Tensor], model) -> dict:
    """Our tensors -> their dict (the names they came with, or ours)."""
    known, diffs, dense = targets(model), {}, {}
    for ours, k in cfg.entries.items():
        name = cfg.names.get(ours, ours)
        shape = known[ours][2]
        if k == DENSE:
            dense[name] = params[f"{ours}.dense"].clone()
            continue
        flat = params[f"{ours}.idx"].numpy()
        fortran = np.ravel_multi_index(np.unravel_index(flat, shape, order="C"), shape, order="F")
        order = np.argsort(fortran, kind="stable")
        fortran = fortran[order]
        steps = np.diff(fortran, prepend=0).tolist()
        diffs[name] = {"size": torch.Size(shape), "index_steps": [int(s) for s in steps],
                       "values": params[f"{ours}.val"][torch.from_numpy(order)].clone()}
    return {"diffs": diffs, "abs": dense}
