"""The rollout engine's batched KV cache: one row (slot) per running sequence (docs/rl.md).

It is the model's own :class:`~k2.model.mla.KVCache` (one latent ``c`` and rotary key ``k_pe``
per token and layer), shared by all rows: every decode step appends one column for every row.
Rows hold sequences of different lengths, right-aligned so that each row's newest token sits in
the last column; ``valid`` marks which columns of a row are real (the rest are masked out).

A sequence that joins mid-decode is prefilled on its own cache and copied into a free row,
right-aligned. Columns that no running row uses any more are dropped (:meth:`compact`), so the
width stays the length of the longest running sequence; finished rows are dropped
(:meth:`keep_rows`) once no request waits for them.
"""

from __future__ import annotations

import torch

from k2.model.config import K2Config
from k2.model.mla import KVCache


class SlotCache:
    """A :class:`KVCache` whose rows hold right-aligned sequences of different lengths."""

    def __init__(self, config: K2Config, rows: int, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kv = KVCache(config, rows, capacity, dtype, device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        """Columns in use (the longest running sequence, after :meth:`compact`)."""
        return self.kv.length

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def _relayout(self, drop: int, shift: int, capacity: int) -> None:
        """New storage of ``capacity`` columns, with the used columns ``[drop, length)`` moved to
        start at column ``shift``."""
        end = self.length
        new_end = shift + end - drop
        for layer in self.kv.layers:
            for name in ("latent", "k_pe"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], capacity, old.shape[2])
                new[:, shift:new_end] = old[:, drop:end]
                setattr(layer, name, new)
            layer.length = new_end
        new_valid = self.valid.new_zeros(self.rows, capacity)
        new_valid[:, shift:new_end] = self.valid[:, drop:end]
        self.valid = new_valid
        self.kv.capacity = capacity

    def _first_used(self) -> int:
        """The first column any row uses (``length`` when no row holds a sequence)."""
        used = self.valid[:, : self.length].any(dim=0)
        return int(used.int().argmax()) if bool(used.any()) else self.length

    def compact(self, room: int = 1) -> None:
        """Drop the columns no row uses and make room for ``room`` more columns."""
        drop = self._first_used()
        needed = self.length - drop + room
        if drop == 0 and needed <= self.capacity:
            return
        capacity = self.capacity if needed <= self.capacity else max(needed, 2 * self.capacity)
        self._relayout(drop, 0, capacity)

    def reserve(self, tokens: int) -> None:
        """Make the used width at least ``tokens`` columns (shifting every row right if needed),
        with room for one more column, so a sequence of ``tokens`` cached tokens fits a row."""
        self.compact()
        if tokens > self.length:
            shift = tokens - self.length
            capacity = max(self.capacity, tokens + 1)
            self._relayout(0, shift, capacity)

    def place(self, row: int, source: KVCache, source_row: int, tokens: int) -> None:
        """Copy the last ``tokens`` cached columns of ``source``'s row into ``row``, right-aligned
        (call :meth:`reserve` first)."""
        end = self.length
        start = end - tokens
        src_end = source.length
        for layer, src in zip(self.kv.layers, source.layers):
            layer.latent[row, start:end] = src.latent[source_row, src_end - tokens : src_end]
            layer.k_pe[row, start:end] = src.k_pe[source_row, src_end - tokens : src_end]
        self.valid[row] = False
        self.valid[row, start:end] = True

    def free(self, row: int) -> None:
        """Mark ``row`` empty."""
        self.valid[row] = False

    def add_rows(self, count: int) -> None:
        """Append ``count`` empty rows (a batch that grows for requests arriving mid-call)."""
        self.valid = torch.cat([self.valid, self.valid.new_zeros(count, self.capacity)])
        for layer in self.kv.layers:
            for name in ("latent", "k_pe"):
                old = getattr(layer, name)
                setattr(layer, name, torch.cat([old, old.new_zeros(count, *old.shape[1:])]))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), dropping unused columns."""
        index = torch.tensor(rows, dtype=torch.long, device=self.valid.device)
        self.valid = self.valid[index]
        for layer in self.kv.layers:
            layer.latent = layer.latent[index]
            layer.k_pe = layer.k_pe[index]
        self.compact()

    def step_mask(self) -> torch.Tensor:
        """The attention mask [rows, length + 1] of a decode step that appends one token to every
        row (making room for it first)."""
        if self.length + 1 > self.capacity:
            self.compact()
        self.valid[:, self.length] = True
        return self.valid[:, : self.length + 1]
