"""Decoder state of a set of rows: self-attention K/V per layer and the cross-attention K/V.

Rows may be at different decoding positions (continuous batching, beams that joined late): every
cached key carries its own position, -1 marks an empty cell, and masks are built from positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DecoderCache:
    self_k: list[torch.Tensor]     # per layer (B, H, L, dh)
    self_v: list[torch.Tensor]
    key_pos: torch.Tensor          # (B, L) int64 position of each cached key, -1 = empty
    cross_k: list[torch.Tensor]    # per layer (B, H, T_enc, dh)
    cross_v: list[torch.Tensor]
    enc_valid: torch.Tensor        # (B, T_enc) bool
    _pending_pos: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.enc_valid.shape[0]

    def begin_step(self, pos: torch.Tensor) -> torch.Tensor:
        """Register the positions (B, L) of this step's new tokens; returns all key positions."""
        self._pending_pos = pos
        return torch.cat([self.key_pos, pos], dim=1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's keys/values of one layer; returns the full (k, v) to attend over."""
        self.self_k[layer] = torch.cat([self.self_k[layer], k], dim=2)
        self.self_v[layer] = torch.cat([self.self_v[layer], v], dim=2)
        return self.self_k[layer], self.self_v[layer]

    def end_step(self) -> None:
        self.key_pos = torch.cat([self.key_pos, self._pending_pos], dim=1)
        self._pending_pos = None

    def select(self, rows: torch.Tensor) -> DecoderCache:
        """The cache of ``rows`` (beam reordering, finished rows leaving)."""
        pick = lambda ts: [t.index_select(0, rows) for t in ts]  # noqa: E731
        return DecoderCache(pick(self.self_k), pick(self.self_v), self.key_pos.index_select(0, rows),
                            pick(self.cross_k), pick(self.cross_v), self.enc_valid.index_select(0, rows))

    @staticmethod
    def concat(caches: list[DecoderCache]) -> DecoderCache:
        """Rows of several caches in order; shorter histories / encoder lengths are padded."""
        L = max(c.key_pos.shape[1] for c in caches)
        T = max(c.enc_valid.shape[1] for c in caches)
        n = len(caches[0].self_k)

        def cat(ts, width):
            return torch.cat([F.pad(t, (0, 0, 0, width - t.shape[2])) for t in ts])
        return DecoderCache(
            [cat([c.self_k[i] for c in caches], L) for i in range(n)],
            [cat([c.self_v[i] for c in caches], L) for i in range(n)],
            torch.cat([F.pad(c.key_pos, (0, L - c.key_pos.shape[1]), value=-1) for c in caches]),
            [cat([c.cross_k[i] for c in caches], T) for i in range(n)],
            [cat([c.cross_v[i] for c in caches], T) for i in range(n)],
            torch.cat([F.pad(c.enc_valid, (0, T - c.enc_valid.shape[1])) for c in caches]))
