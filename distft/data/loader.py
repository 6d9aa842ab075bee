"""Tokenized splits and the batches each rank sees.

Sample order is a pure function of (seed, epoch, global sample index): optimizer step `s`
of an epoch consumes the global samples `[s*B, (s+1)*B)` of that epoch's permutation,
where `B = micro_batch * grad_accum * world_size`. Rank `r` takes the r-th contiguous
slice of that window, split into `grad_accum` micro-batches. The state needed to resume
is therefore just the global step (or the global sample count).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import datasets
import numpy as np
import torch

from distft.config import Config
from distft.data.records import DataError, read_conversations
from distft.data.tokenize import IGNORE, encode_all
from distft.dist import DistContext


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None  # None when nothing is padded (fast SDPA path)

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (labels are shifted by one)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(self.input_ids.to(device), self.labels.to(device), mask)


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> Batch:
    """Right-pad to the longest row; labels of padding are IGNORE."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return Batch(ids, labels, None if bool(mask.all()) else mask)


def load_split(cfg: Config, tokenizer: Any, files: list[str]) -> datasets.Dataset:
    convs, read = read_conversations(files, cfg.data.format, cfg.data.on_bad_record)
    columns, tok = encode_all(tokenizer, convs, cfg.data.max_seq_len, cfg.data.on_bad_record)
    ds = datasets.Dataset.from_dict(columns)
    ds.info.description = (
        f"{read.records} records, {read.skipped + tok.skipped} skipped, {tok.truncated} truncated"
    )
    return ds


class TrainBatches:
    """The micro-batches of one rank for each optimizer step."""

    def __init__(self, ds: datasets.Dataset, cfg: Config, dist: DistContext, pad_id: int):
        self.ds, self.pad_id, self.dist = ds, pad_id, dist
        self.seed, self.shuffle = cfg.seed, cfg.data.shuffle
        self.micro, self.accum = cfg.batch.micro_batch_size, cfg.batch.grad_accum
        self.global_batch = self.micro * self.accum * dist.world_size
        self.steps_per_epoch = len(ds) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{len(ds)} training samples are fewer than one global batch "
                f"({self.micro} micro x {self.accum} accum x {dist.world_size} workers)"
            )
        self.total_steps = cfg.batch.max_steps or self.steps_per_epoch * cfg.batch.epochs

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs alive at most; the object lives all run
    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.ds))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ds))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def for_step(self, step: int) -> list[Batch]:
        epoch, k = divmod(step, self.steps_per_epoch)
        window = self._order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        per_rank = self.micro * self.accum
        mine = window[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
        rows = self.ds.select(mine.tolist())
        return [
            collate([rows[i] for i in range(j * self.micro, (j + 1) * self.micro)], self.pad_id)
            for j in range(self.accum)
        ]


def eval_batches(ds: datasets.Dataset, micro: int, dist: DistContext, pad_id: int) -> list[Batch]:
    """This rank's share of the eval split. Every rank gets the same number of batches
    (ZeRO-3 forwards are collective); filler rows carry no targets."""
    per_rank = -(-len(ds) // dist.world_size)
    mine = list(range(dist.rank, len(ds), dist.world_size))
    rows = [ds[i] for i in mine]
    filler = {"input_ids": ds[0]["input_ids"][:2], "labels": [IGNORE, IGNORE]}
    rows += [filler] * (per_rank - len(rows))
    return [collate(rows[i : i + micro], pad_id) for i in range(0, per_rank, micro)]
