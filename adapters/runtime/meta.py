"""BatchMeta: which slot each row of a step uses, built once per step and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from petserve.kernels import SegmentMeta


@dataclass
class BatchMeta:
    """Row -> slot map of one forward step (-1 = backbone only).

    row_slots: (B,) int64 on the model's device. num_slots: size of the slot pool; per-slot vector
    stacks keep the backbone's own values at index ``num_slots``. enc_valid: (B, T_enc) bool, False on
    encoder padding (set once the encoder input is laid out).
    Token-level views (:class:`kernels.SegmentMeta`) are derived per (stream, length) and cached.
    """

    row_slots: torch.Tensor
    num_slots: int
    enc_valid: torch.Tensor | None = None
    _segs: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, row_slots: list[int], num_slots: int, device) -> BatchMeta:
        for s in row_slots:
            if not -1 <= s < num_slots:
                raise ValueError(f"slot {s} out of range for a pool of {num_slots} slots")
        return cls(torch.tensor(row_slots, dtype=torch.int64, device=device), num_slots)

    @property
    def batch_size(self) -> int:
        return self.row_slots.shape[0]

    def slots_host(self) -> list[int]:
        """The row -> slot map as a host list (read once per step)."""
        if "host" not in self._segs:
            self._segs["host"] = self.row_slots.tolist()
        return self._segs["host"]

    def vector_index(self) -> torch.Tensor:
        """(B,) index into per-slot vector stacks: the row's slot, or the backbone row."""
        if "vec" not in self._segs:
            base = torch.full_like(self.row_slots, self.num_slots)
            self._segs["vec"] = torch.where(self.row_slots >= 0, self.row_slots, base)
        return self._segs["vec"]

    def seg(self, stream: str, length: int) -> SegmentMeta:
        """Tokens of a (B, length) block of ``stream`` ("enc" | "dec") grouped by slot."""
        key = (stream, length)
        if key not in self._segs:
            valid = self.enc_valid if stream == "enc" else None
            self._segs[key] = SegmentMeta.from_rows(self.row_slots, length, valid,
                                                    self.slots_host())
        return self._segs[key]

    def rows_of(self, slot_flags: list[bool]) -> torch.Tensor | bool:
        """(B, 1, 1) bool: rows whose slot is flagged in ``slot_flags``; True when every row is
        (cached per flag pattern, so the layers of a step pay one host read)."""
        key = ("flags", tuple(slot_flags))
        if key not in self._segs:
            pick = [s >= 0 and slot_flags[s] for s in self.row_slots.tolist()]
            self._segs[key] = True if all(pick) else \
                torch.tensor(pick, device=self.row_slots.device).view(-1, 1, 1)
        return self._segs[key]

    def base_seg(self, length: int) -> SegmentMeta:
        """Like seg(), but rows without an adapter use the backbone row of vector stacks."""
        key = ("base", length)
        if key not in self._segs:
            self._segs[key] = SegmentMeta.from_rows(self.vector_index(), length)
        return self._segs[key]

    def select(self, rows: torch.Tensor) -> BatchMeta:
        """Meta for a subset / reordering of the rows (beam search, finished rows leaving)."""
        valid = None if self.enc_valid is None else self.enc_valid.index_select(0, rows)
        return BatchMeta(self.row_slots.index_select(0, rows), self.num_slots, valid)

    @staticmethod
    def concat(metas: list[BatchMeta]) -> BatchMeta:
        """Rows of several metas in order (continuous batching). Encoder masks are right-padded."""
        slots = torch.cat([m.row_slots for m in metas])
        valid = None
        if all(m.enc_valid is not None for m in metas):
            width = max(m.enc_valid.shape[1] for m in metas)
            valid = torch.cat([torch.nn.functional.pad(m.enc_valid, (0, width - m.enc_valid.shape[1]))
                               for m in metas])
        return BatchMeta(slots, metas[0].num_slots, valid)
