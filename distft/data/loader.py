"""Batches: what each rank feeds the model for each optimizer step.

Three batching strategies (`data.batching`), all exact (a sample's loss and gradient do
not depend on what it is batched with):

- `padded`: a unit is one sample; a micro-batch is `micro_batch_size` samples, right-padded
  to the longest. No attention mask: causal attention never looks right, so real tokens
  never see the padding after them.
- `packed`: a unit is a pack of samples (best-fit decreasing up to `max_seq_len` tokens);
  a micro-batch is `micro_batch_size` packs. Positions restart at 0 for every sample and a
  block-diagonal causal 4-D mask keeps samples from attending to each other (bool for
  SDPA, additive float for eager), built in torch from the position ids where the batch
  runs (`Batch.to`, on the device): the host never holds an n x w x w mask, nor copies
  one to the GPU. With `flash_attention_2` the packs of a micro-batch are
  one row and the position ids alone select the varlen kernel (with the layer's window).
  A model with sliding-window layers shorter than `max_seq_len` (Mistral-v0.1, Phi-3,
  Gemma-2/3, whose layers alternate) gets no mask: transformers sees the packed position
  ids with no mask and builds, for each layer type, the block-diagonal causal mask with
  that layer's window band. One 4-D mask cannot serve both layer types, and a 4-D mask
  passed in is used as is, without the window. (Measured on CPU, the library's mask costs
  about twice distft's, so models without a window keep theirs.)
- `length_grouped`: a unit is a whole micro-batch of similar-length samples whose padded
  size (rows x longest) is at most `micro_batch_size x max_seq_len` tokens.

Order: optimizer step `s` of an epoch consumes units `[s*G, (s+1)*G)` of that epoch's unit
order, `G = units per micro-batch x grad_accum x world_size`; rank `r` takes the r-th
contiguous slice, split into `grad_accum` micro-batches. The unit order is a pure function
of (seed, epoch), so the global step alone locates the exact position to resume from, and
the global windows do not depend on how `G` is split across ranks. Every rank runs exactly
`grad_accum` micro-batches per step (ZeRO-3 forwards are collective; DeepSpeed counts
micro-steps); the loop normalises the loss by the step's global target count, so micro-
batches of different sizes weigh exactly their target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from distft.config import Config, ModelConfig
from distft.data.batch import Batch, Row, collate_rows
from distft.data.packing import Units, best_fit_decreasing, length_groups, tie_shuffle
from distft.data.pairs import PairSplit, filler_pair
from distft.data.records import DataError
from distft.data.store import Split
from distft.data.tokenize import IGNORE
from distft.dist import DistContext
from distft.flops import layer_windows


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step over all ranks: predicted tokens (the loss normaliser), real
    tokens, the sum of squared sample lengths and the lengths (attention FLOPs)."""

    targets: int
    tokens: int
    squared_lengths: int
    lengths: tuple[int, ...] | None = None


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> Batch:
    """Plain padded batch of `{"input_ids", "labels"}` rows (one sample per row)."""
    return collate_rows(
        [[(np.asarray(r["input_ids"]), np.asarray(r["labels"]))] for r in rows], pad_id
    )


def resolve_batching(cfg: Config) -> str:
    """`auto` picks per device. CPU, measured (bench/data_strategies.py): length-grouped
    batches (little padding, and right padding needs no mask, so SDPA stays on its fast
    causal path) beat packing, whose 4-D mask takes SDPA off that path, and padding. GPU,
    not measured yet: with flash-attention, packing (varlen kernel, no padding, no
    cross-sample attention); without it, length grouping, for SDPA's mask-free kernels.
    Sequence parallelism: packing with flash-attention, else padding (fixed row count)."""
    if cfg.data.batching != "auto":
        return cfg.data.batching
    if cfg.deepspeed.sequence_parallel_size > 1:  # see Config._sequence_parallel_problems
        return "packed" if cfg.model.attn_implementation == "flash_attention_2" else "padded"
    if cfg.cluster.use_gpu and cfg.model.attn_implementation == "flash_attention_2":
        return "packed"
    return "length_grouped"


def step_layout(cfg: Config, world_size: int) -> dict[str, int | str]:
    """What fixes the sequence of global steps (with the seed and the data): the strategy,
    units per optimizer step, and a unit's token budget. Equal layouts give the same
    batches whatever the split across workers (for resuming on another world size)."""
    batching, micro = resolve_batching(cfg), cfg.batch.micro
    per_micro = 1 if batching == "length_grouped" else micro
    budget = {"packed": cfg.data.max_seq_len, "length_grouped": micro * cfg.data.max_seq_len}
    return {
        "batching": batching,
        "units_per_step": per_micro * cfg.batch.grad_accum * world_size,
        "unit_tokens": budget.get(batching, 0),
    }


class TrainBatches:
    """The micro-batches of one rank for each optimizer step (see the module docstring)."""

    def __init__(
        self,
        split: Split | PairSplit,
        cfg: Config,
        dist: DistContext,
        pad_id: int,
        windowed: bool | None = None,
    ):
        """`windowed`: whether the model has sliding-window layers shorter than
        `max_seq_len` (see the module docstring); None reads the model's config when packed
        batches first need it."""
        self.split, self.pad_id, self.dist = split, pad_id, dist
        self.model, self._windowed = cfg.model, windowed
        self.seed, self.shuffle = cfg.seed, cfg.data.shuffle
        self.batching = resolve_batching(cfg)
        self.attn, self.max_seq_len = cfg.model.attn_implementation, cfg.data.max_seq_len
        micro, self.accum = cfg.batch.micro, cfg.batch.grad_accum
        self.per_micro = 1 if self.batching == "length_grouped" else micro
        self.per_rank = self.per_micro * self.accum
        self.global_batch = self.per_rank * dist.world_size  # units per optimizer step
        lengths, per_unit = split.lengths, 1
        if isinstance(split, PairSplit):  # a unit holds a pair: two sequences
            lengths, per_unit = split.unit_lengths, split.rows_per_unit
        self._group_lengths = lengths  # what length groups sort and budget by
        if self.batching == "packed":
            self._bins = best_fit_decreasing(split.lengths, per_unit * cfg.data.max_seq_len)
            n_units = len(self._bins)
        elif self.batching == "length_grouped":
            budget = micro * cfg.data.max_seq_len
            self._bounds = length_groups(np.sort(lengths), budget)
            n_units = len(self._bounds) - 1
        else:
            n_units = len(split)
        self.units_per_epoch = n_units
        self.steps_per_epoch = n_units // self.global_batch
        if self.steps_per_epoch == 0:
            what = {"packed": "packs", "length_grouped": "micro-batches"}.get(self.batching)
            made = f" ({n_units} {what})" if what else ""
            unit = "pairs" if isinstance(split, PairSplit) else "samples"
            raise DataError(
                f"{len(split)} training {unit}{made} are fewer than one global batch "
                f"({self.per_micro} micro x {self.accum} accum x {dist.world_size} workers)"
            )
        self.total_steps = cfg.batch.max_steps or self.steps_per_epoch * cfg.batch.epochs
        self._seen: dict[int, int] = {}

    @lru_cache(maxsize=2)  # noqa: B019 - two epochs alive at most; the object lives all run
    def units(self, epoch: int) -> Units:
        """This epoch's units in order: a pure function of (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        n = len(self.split)
        if self.batching == "padded":
            return Units.singletons(np.arange(n) if rng is None else rng.permutation(n))
        lengths = self.split.lengths
        if self.batching == "packed":
            units = self._bins.remap(tie_shuffle(lengths, rng))
        else:
            key = np.arange(n) if rng is None else rng.random(n)
            units = Units(np.lexsort((key, self._group_lengths)), self._bounds)
        return units if rng is None else units.reorder(rng.permutation(len(units)))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices_for_step(self, step: int) -> list[list[np.ndarray]]:
        """This rank's micro-batches of `step`: for each, its rows as sample indices."""
        epoch, k = divmod(step, self.steps_per_epoch)
        units = self.units(epoch)
        first = k * self.global_batch + self.dist.rank * self.per_rank
        out = []
        for j in range(self.accum):
            picked = [
                units.unit(u)
                for u in range(first + j * self.per_micro, first + (j + 1) * self.per_micro)
            ]
            if self.batching == "length_grouped":
                picked = [np.array([i]) for i in picked[0]]
            out.append(picked)
        return out

    @property
    def windowed(self) -> bool:
        """Packed rows go to transformers' own masks (sliding windows); see the docstring."""
        if self._windowed is None:
            needed = self.batching == "packed" and self.attn != "flash_attention_2"
            self._windowed = needed and has_short_windows(self.model, self.max_seq_len)
        return self._windowed

    def for_step(self, step: int) -> list[Batch]:
        return [
            collate_units(self.split, rows, self.pad_id, self.attn, self.windowed)
            for rows in self.indices_for_step(step)
        ]

    def step_totals(self, step: int) -> StepTotals:
        """Totals of the whole optimizer step `step`, over every rank's micro-batches. Every
        rank computes them from the unit order alone: no collective before the backward."""
        epoch, k = divmod(step, self.steps_per_epoch)
        units = self.units(epoch)
        lo, hi = units.bounds[k * self.global_batch], units.bounds[(k + 1) * self.global_batch]
        members = units.members[lo:hi]
        lengths = self.split.lengths[members]
        return StepTotals(
            targets=int(self.split.targets[members].sum()),
            tokens=int(lengths.sum()),
            squared_lengths=int((lengths * lengths).sum()),
            lengths=tuple(lengths.tolist()),
        )

    def samples_seen(self, step: int) -> int:
        """Global samples consumed by optimizer steps [0, step) (every rank agrees)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        for e in range(epoch):
            if e not in self._seen:
                self._seen[e] = int(self.units(e).bounds[self.steps_per_epoch * self.global_batch])
        return sum(self._seen[e] for e in range(epoch)) + int(
            self.units(epoch).bounds[k * self.global_batch]
        )

    def tensor_tokens(self, epoch: int = 0) -> tuple[int, int]:
        """(real tokens, padded tensor cells) over all micro-batches of one epoch."""
        units, lengths = self.units(epoch), self.split.lengths
        used = self.steps_per_epoch * self.global_batch
        bounds = units.bounds[: used + 1]
        member_len = lengths[units.members[: bounds[-1]]]
        unit_len = np.add.reduceat(member_len, bounds[:-1])
        real = int(unit_len.sum())
        if self.batching == "length_grouped":
            longest = np.maximum.reduceat(member_len, bounds[:-1])
            return real, int((longest * np.diff(bounds)).sum())
        if self.batching == "packed" and self.attn == "flash_attention_2":
            return real, real
        per_micro = unit_len.reshape(-1, self.per_micro)
        return real, int(per_micro.max(axis=1).sum() * self.per_micro)


def has_short_windows(model: ModelConfig, max_seq_len: int) -> bool:
    """Whether a layer of the model attends over a sliding window shorter than a pack: a
    sample of up to `max_seq_len` tokens then sees less than its whole prefix."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(
            model.name_or_path, trust_remote_code=model.trust_remote_code, revision=model.revision
        )
    except OSError as e:
        raise DataError(
            f"model.name_or_path: packed batches need the model's config (sliding windows): {e}"
        ) from e
    return any(w is not None and w < max_seq_len for w in layer_windows(hf))


def collate_units(
    split: Split | PairSplit, rows: list[np.ndarray], pad_id: int, attn: str, windowed: bool
) -> Batch:
    """One micro-batch from rows of unit indices (samples, or pairs: `distft.data.pairs`)."""
    if not isinstance(split, PairSplit):
        samples = [[split.sample(int(i)) for i in r] for r in rows]
        return collate_rows(samples, pad_id, attn, windowed)
    packed = any(len(r) > 1 for r in rows)
    seq_rows, order = split.seq_rows(rows, packed)
    batch = collate_rows(seq_rows, pad_id, attn, windowed, segments=True)
    return replace(batch, ref_logps=split.ref_logps(order))


def eval_batches(
    split: Split | PairSplit, micro: int, dist: DistContext, pad_id: int
) -> list[Batch]:
    """This rank's share of the eval split, longest first (little padding). Every rank gets
    the same number of batches (ZeRO-3 forwards are collective); filler rows (or pairs)
    carry no targets. The result (a mean over targets or pairs) does not depend on the
    order. `micro` counts samples, or pairs."""
    per_rank = -(-len(split) // dist.world_size)
    by_length = np.argsort(-split.lengths, kind="stable")
    mine = [int(i) for i in by_length[dist.rank :: dist.world_size]]
    if isinstance(split, PairSplit):
        return _eval_pairs(split, mine, per_rank, micro, pad_id)
    rows: list[Row] = [[split.sample(i)] for i in mine]
    filler_ids = split.sample(0)[0][:2]
    rows += [[(filler_ids, np.full(len(filler_ids), IGNORE))]] * (per_rank - len(rows))
    return [collate_rows(rows[i : i + micro], pad_id) for i in range(0, per_rank, micro)]


def _eval_pairs(
    split: PairSplit, mine: list[int], per_rank: int, micro: int, pad_id: int
) -> list[Batch]:
    out = []
    for i in range(0, per_rank, micro):
        pairs = mine[i : i + micro]
        rows: list[Row] = [[s] for k in pairs for s in split.sides(k)]
        fill = min(micro, per_rank - i) - len(pairs)
        rows += [[s] for _ in range(fill) for s in filler_pair(split)]
        batch = collate_rows(rows, pad_id, segments=True)
        ref = split.ref_logps(pairs)
        if ref is not None and fill:  # the fillers' sequences predict nothing
            ref = torch.cat([ref, torch.zeros(2 * fill)])
        out.append(replace(batch, ref_logps=ref))
    return out
