"""Token -> slot metadata shared by every grouped op of one forward step.

A step's tokens are flattened to ``(N, d)``. Each token names the slot whose adapter weights it uses
(``-1`` = none). Grouped ops need the tokens of each slot together, so :class:`SegmentMeta` sorts them
once; every layer of the step reuses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SegmentMeta:
    """Tokens grouped by slot.

    token_slots: (N,) int64, slot of each token, -1 = no adapter.
    order:       (N,) int64, token indices sorted by slot (stable), tokens with slot -1 first.
    slots / starts / counts: host lists, one entry per distinct slot >= 0 present; the tokens of
                 ``slots[i]`` are ``order[starts[i] : starts[i] + counts[i]]``.
    token_rows:  (N,) int64, the batch row of each token (for per-example gates), or None.
    token_valid: (N,) bool, False on padding tokens, or None (= all valid).
    num_rows:    number of batch rows the tokens come from.
    row_slots:   (B,) int64, the slot of each row when the tokens are a (B, T) block flattened
                 row-major (:meth:`from_rows`, ``tokens_per_row`` = T), else None.
    """

    token_slots: torch.Tensor
    slots: list[int]
    starts: list[int]
    counts: list[int]
    token_valid: torch.Tensor | None = None
    num_rows: int = 0
    row_slots: torch.Tensor | None = None
    tokens_per_row: int = 1
    # order and token_rows: given, or derived on first use (the CPU gathered paths need neither)
    _order: torch.Tensor | None = field(default=None, repr=False)
    _token_rows: torch.Tensor | None = field(default=None, repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_slots(cls, token_slots: torch.Tensor, token_rows: torch.Tensor | None = None,
                   token_valid: torch.Tensor | None = None, num_rows: int = 0) -> SegmentMeta:
        token_slots = token_slots.to(torch.int64)
        host = token_slots.cpu()
        order = torch.argsort(host, stable=True)
        uniq, counts = torch.unique_consecutive(host[order], return_counts=True)
        slots, starts, cnts, pos = [], [], [], 0
        for s, c in zip(uniq.tolist(), counts.tolist()):
            if s >= 0:
                slots.append(s)
                starts.append(pos)
                cnts.append(c)
            pos += c
        return cls(token_slots, slots, starts, cnts, token_valid, num_rows,
                   _order=order.to(token_slots.device), _token_rows=token_rows)

    @classmethod
    def from_rows(cls, row_slots: torch.Tensor, tokens_per_row: int,
                  valid: torch.Tensor | None = None, host: list[int] | None = None) -> SegmentMeta:
        """Meta for a (B, T) block of tokens flattened row-major; row b uses ``row_slots[b]``
        (``host``: the same as a list, when the caller has it). One pass over the rows on the
        host; no sort."""
        row_slots = row_slots.to(torch.int64)
        host = row_slots.tolist() if host is None else host
        rows_of: dict[int, int] = {}
        for s in host:
            rows_of[s] = rows_of.get(s, 0) + 1
        slots = sorted(s for s in rows_of if s >= 0)
        counts = [rows_of[s] * tokens_per_row for s in slots]
        starts, pos = [], rows_of.get(-1, 0) * tokens_per_row      # slot -1 tokens sort first
        for c in counts:
            starts.append(pos)
            pos += c
        token_slots = row_slots if tokens_per_row == 1 else \
            row_slots.repeat_interleave(tokens_per_row)
        flat_valid = None if valid is None else valid.reshape(-1)
        return cls(token_slots, slots, starts, counts, flat_valid, len(host), row_slots,
                   tokens_per_row)

    @property
    def order(self) -> torch.Tensor:
        """(N,) int64, token indices sorted by slot (stable), tokens with slot -1 first."""
        if self._order is None:
            self._order = torch.argsort(self.token_slots.cpu(), stable=True).to(
                self.token_slots.device)
        return self._order

    @property
    def token_rows(self) -> torch.Tensor | None:
        """(N,) int64, the batch row of each token (for per-example gates), or None."""
        if self._token_rows is None and self.row_slots is not None:
            self._token_rows = torch.arange(self.num_rows, device=self.row_slots.device) \
                .repeat_interleave(self.tokens_per_row)
        return self._token_rows

    def segments(self):
        """Yield ``(slot, token_index_tensor)`` for every slot present (host loop: reference path)."""
        for s, start, count in zip(self.slots, self.starts, self.counts):
            yield s, self.order[start:start + count]

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    # ---- CPU gathered paths (kernels.lowrank / kernels.bottleneck) ---------------------------
    @property
    def num_units(self) -> int:
        """Rows when the tokens are a (B, T) block (they share their row's slot), else tokens."""
        return self.num_tokens if self.row_slots is None else self.row_slots.shape[0]

    def unit_index(self, none: int) -> torch.Tensor:
        """(num_units,) the slot of each row (or token, see :attr:`num_units`), ``none`` where
        it has no adapter; cached per ``none``."""
        key = ("units", none)
        if key not in self._device_cache:
            units = self.token_slots if self.row_slots is None else self.row_slots
            self._device_cache[key] = torch.where(units >= 0, units, none)
        return self._device_cache[key]

    @property
    def per_row(self) -> SegmentMeta | None:
        """The rows as tokens of one each (their groups are groups of rows), when the tokens are
        a (B, T) block with T > 1, else None; cached."""
        if self.row_slots is None or self.tokens_per_row == 1:
            return None
        if "per_row" not in self._device_cache:
            self._device_cache["per_row"] = SegmentMeta.from_rows(self.row_slots, 1)
        return self._device_cache["per_row"]

    def groups(self, keys: tuple) -> list[tuple[object, torch.Tensor | None, torch.Tensor]]:
        """Tokens grouped by a per-slot key: ``[(key, token indices or None, slot of each)]``.

        ``keys`` has one hashable per entry of ``self.slots`` (e.g. a rank, or a whole bottleneck
        configuration); ``None`` drops that slot's tokens (rank 0). Indices are ascending; None
        means every token, in order. One Python step per distinct key, none per slot. Cached per
        key pattern: every site of a step whose stack agrees shares the grouping.
        """
        cache_key = ("groups", keys)
        if cache_key not in self._device_cache:
            self._device_cache[cache_key] = self._build_groups(keys)
        return self._device_cache[cache_key]

    def _build_groups(self, keys: tuple) -> list:
        n, adapted = self.num_tokens, sum(self.counts)
        present = sorted(set(keys) - {None})
        if len(present) == 1 and None not in keys:    # the common case: no tensor work
            if adapted == n:
                return [(present[0], None, self.token_slots)]
            idx = self.order[n - adapted:]            # slot -1 tokens sort first
            return [(present[0], idx, self.token_slots.index_select(0, idx))]
        dev, slots = self.token_slots.device, self.token_slots.cpu()
        group_of_slot = torch.full((max(self.slots) + 2,), -1, dtype=torch.int64)  # [-1] -> -1
        group_of_slot[torch.tensor(self.slots)] = torch.tensor(
            [-1 if k is None else present.index(k) for k in keys], dtype=torch.int64)
        token_group = group_of_slot[slots]
        out = []
        for g, key in enumerate(present):
            idx = torch.nonzero(token_group == g).flatten()
            every = idx.numel() == n
            out.append((key, None if every else idx.to(dev), slots[idx].to(dev)))
        return out

    def kept(self, name: str, owner: object, stamp: tuple, build, max_elements: int):
        """``build()`` -> (value, elements), kept for the next call with the same ``owner`` (a
        weight stack) and ``stamp`` (its tensors' data pointers and the present slots' config)
        unless it holds more than ``max_elements``. Decode steps reuse one SegmentMeta until a
        row joins or leaves, so gathered weight copies are made once for those steps; the slot
        pool never rewrites a slot that rows in flight use."""
        key = (name, id(owner))
        hit = self._device_cache.get(key)
        if hit is not None and hit[0] is owner and hit[1] == stamp:
            return hit[2]
        value, elements = build()
        if elements <= max_elements:
            self._device_cache[key] = (owner, stamp, value)    # holds owner: its id stays unique
        return value
