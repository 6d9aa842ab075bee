"""Grouping samples into units, each a pure function of (lengths, seed, epoch).

- `pack`: bin packing into sequences of at most `capacity` tokens, best-fit decreasing
  (longest sample first, into the fullest pack it fits). The bin structure depends only on
  the multiset of lengths, so every epoch has the same number of packs; which of several
  equal-length samples lands in which pack is reshuffled per epoch.
- `length_groups`: samples sorted by length (random order among equal lengths), cut
  greedily into micro-batches whose padded size (rows x longest) stays within a token
  budget. Again the cut depends only on the lengths.
Unit order is then shuffled per epoch, so batches are not sorted by length.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Units:
    """Groups of sample indices, CSR style: unit k is members[bounds[k]:bounds[k+1]]."""

    members: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def unit(self, k: int) -> np.ndarray:
        return self.members[self.bounds[k] : self.bounds[k + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def reorder(self, perm: np.ndarray) -> Units:
        sizes = self.sizes[perm]
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        shift = np.repeat(self.bounds[perm] - bounds[:-1], sizes)
        return Units(self.members[np.arange(bounds[-1]) + shift], bounds)

    def remap(self, mapping: np.ndarray) -> Units:
        return Units(mapping[self.members], self.bounds)

    @staticmethod
    def singletons(order: np.ndarray) -> Units:
        return Units(order.astype(np.int64), np.arange(len(order) + 1, dtype=np.int64))


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> Units:
    """Pack items (lengths <= capacity) into bins of `capacity`; deterministic."""
    order = np.argsort(-lengths, kind="stable")
    open_bins: dict[int, list[int]] = {}  # remaining capacity -> bins with exactly that room
    rooms: list[int] = []  # sorted keys of open_bins
    bins: list[list[int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect_left(rooms, n)
        if j == len(rooms):
            b, room = len(bins), capacity - n
            bins.append([i])
        else:
            room = rooms[j]
            stack = open_bins[room]
            b = stack.pop()
            if not stack:
                del open_bins[room]
                rooms.pop(j)
            bins[b].append(i)
            room -= n
        if room > 0:
            if room not in open_bins:
                open_bins[room] = []
                insort(rooms, room)
            open_bins[room].append(b)
    sizes = [len(b) for b in bins]
    members = np.array([i for b in bins for i in b], dtype=np.int64)
    return Units(members, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def length_groups(sorted_lengths: np.ndarray, budget: int) -> np.ndarray:
    """Bounds of consecutive groups of ascending lengths with rows x longest <= budget."""
    bounds, start = [0], 0
    for k, n in enumerate(sorted_lengths.tolist()):
        if (k - start + 1) * n > budget:
            bounds.append(k)
            start = k
    bounds.append(len(sorted_lengths))
    return np.array(bounds, dtype=np.int64)


def tie_shuffle(lengths: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """A permutation mapping each sample to one of the same length (identity without rng)."""
    if rng is None:
        return np.arange(len(lengths), dtype=np.int64)
    by_index = np.argsort(lengths, kind="stable")
    by_random = np.lexsort((rng.random(len(lengths)), lengths))
    mapping = np.empty(len(lengths), dtype=np.int64)
    mapping[by_index] = by_random
    return mapping
