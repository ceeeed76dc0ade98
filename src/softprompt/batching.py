"""Which rows go into each training batch: deterministic, resumable, length-grouped."""

from __future__ import annotations

import random


class BatchPlan:
    """Deterministic batches: epoch e's order depends only on (seed, e), so a resumed run sees the
    same batches as an uninterrupted one without saving sampler state.

    Length grouping: shuffle, sort within windows of 50 batches by length, cut into batches, then
    shuffle the batches (similar lengths together, random order of batches).
    """

    def __init__(self, lengths: list[int], batch_size: int, world: int, rank: int, seed: int, grouped: bool) -> None:
        if len(lengths) < batch_size:
            batch_size = len(lengths)
        self.lengths, self.bs, self.world, self.rank, self.seed, self.grouped = lengths, batch_size, world, rank, seed, grouped
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._cache: dict[int, list[list[int]]] = {}

    def batch(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch(epoch)}
        full = self._cache[epoch][i]
        return full[self.rank :: self.world] or full[:1]

    def _epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.grouped:
            window = self.bs * 50
            order = [j for c in range(0, len(order), window) for j in sorted(order[c : c + window], key=lambda t: self.lengths[t])]
        batches = [order[s : s + self.bs] for s in range(0, self.per_epoch * self.bs, self.bs)]
        rng.shuffle(batches)
        return batches
