"""Preference pairs as batching units: a pair's chosen and rejected sides always land in
the same micro-batch, next to each other.

A preference source is cached with its pairs' sides as consecutive rows (row 2k chosen,
2k+1 rejected: `distft.data.tokenize`). `PairSplit` views such rows as pairs for
`TrainBatches`: a unit is one pair (padded: its two sides are two rows; length-grouped:
pairs of similar length, two rows each, rows x longest within the token budget; packed:
whole pairs in packs of up to 2 x `max_seq_len` tokens, each side its own isolated
segment). A pair counts 1 towards the step's normaliser (`targets`), so the loop's loss is
the mean over the global pairs of the step, whatever the (micro x accum x world) split.

Every batch of pairs carries `seq_ids` (which sequence each position belongs to: 2p the
chosen and 2p+1 the rejected side of the batch's p-th pair) and, once the reference pass
has run (`distft.objectives.reference`), the reference's summed log-probs of each
sequence (`ref_logps`).
"""

from __future__ import annotations

import numpy as np
import torch

from distft.data.records import DataError
from distft.data.store import Split, TokenArrays
from distft.data.tokenize import IGNORE


def pair_rows(pairs: np.ndarray) -> np.ndarray:
    """The row indices (chosen, rejected, ...) of pair indices."""
    return np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)


class PairSplit:
    """Pairs over `rows` (a Split whose rows alternate chosen, rejected)."""

    rows_per_unit = 2

    def __init__(self, rows: Split, reference: dict[int, np.ndarray] | None = None):
        if len(rows) % 2:
            raise DataError(f"preference rows: {len(rows)} is odd (a pair lost a side)")
        self.rows = rows
        self.reference = reference  # id(TokenArrays) -> summed log-probs of each of its rows
        lengths = rows.lengths.reshape(-1, 2)
        self.lengths = lengths.sum(axis=1)  # real tokens of a pair
        # padded cells of a pair's two rows: what the length-grouped budget counts
        self.unit_lengths = 2 * lengths.max(axis=1)
        self.targets = np.ones(len(lengths), dtype=np.int64)  # the normaliser counts pairs
        self.target_tokens = rows.targets.reshape(-1, 2).sum(axis=1)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def parts(self) -> list[TokenArrays]:
        return self.rows.parts

    def sides(self, k: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        return self.rows.sample(2 * k), self.rows.sample(2 * k + 1)

    def select(self, pairs: np.ndarray) -> PairSplit:
        return PairSplit(self.rows.select(pair_rows(pairs)), self.reference)

    def ref_logps(self, pairs: list[int]) -> torch.Tensor | None:
        """The reference's summed log-probs of the pairs' sides, (chosen, rejected, ...)."""
        if self.reference is None:
            return None
        rows = pair_rows(np.asarray(pairs, dtype=np.int64))
        out = np.empty(len(rows), dtype=np.float32)
        for i, r in enumerate(rows.tolist()):
            part = self.rows.parts[self.rows.part[r]]
            out[i] = self.reference[id(part)][self.rows.row[r]]
        return torch.from_numpy(out)

    def seq_rows(self, rows: list[np.ndarray], packed: bool) -> tuple[list[list], list[int]]:
        """Rows of segments for `collate_rows` (packed: a pack's pairs in one row, each side
        a segment; else each side its own row) and the pairs in their order."""
        order = [int(k) for row in rows for k in row]
        if packed:
            return [[s for k in row for s in self.sides(int(k))] for row in rows], order
        return [[s] for k in order for s in self.sides(k)], order


def filler_pair(split: PairSplit) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """A pair with nothing to predict (evaluation: every rank runs as many batches)."""
    ids = split.rows.sample(0)[0][:2]
    side = (ids, np.full(len(ids), IGNORE))
    return side, side
