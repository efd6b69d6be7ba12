"""Adapter kinds. Adding one = one file with its config and math, registered in one line here."""
from __future__ import annotations

from petserve.adapters.kinds.base import AdapterKind, KindConfig
from petserve.adapters.kinds.bottleneck import Bottleneck
from petserve.adapters.kinds.compacter import Compacter
from petserve.adapters.kinds.hyperformer import Hyperformer
from petserve.adapters.kinds.lora import LoRA
from petserve.adapters.kinds.prompt import Prompt
from petserve.adapters.kinds.sft import SFT
from petserve.adapters.kinds.vlpet import VLPET

KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (
    LoRA,
    Bottleneck,
    VLPET,
    Compacter,
    Hyperformer,
    Prompt,
    SFT,
)}


def get_kind(name: str) -> type[AdapterKind]:
    if name not in KINDS:
        raise KeyError(f"unknown adapter kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


__all__ = ["KINDS", "get_kind", "AdapterKind", "KindConfig"]
