"""Adapter kinds. Adding one = one file with its config and math, registered in one line here."""
from __future__ import annotations

from adapters.kinds.base import AdapterKind, KindConfig
from adapters.kinds.bottleneck import Bottleneck
from adapters.kinds.compacter import Compacter
from adapters.kinds.hyperformer import Hyperformer
from adapters.kinds.lora import LoRA
from adapters.kinds.prompt import Prompt
from adapters.kinds.vlpet import VLPET

KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (
    LoRA,
    Bottleneck,
    VLPET,
    Compacter,
    Hyperformer,
    Prompt,
)}


def get_kind(name: str) -> type[AdapterKind]:
    if name not in KINDS:
        raise KeyError(f"unknown adapter kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


__all__ = ["KINDS", "get_kind", "AdapterKind", "KindConfig"]
