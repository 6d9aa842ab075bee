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

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from distft.config import Config, ModelConfig
from distft.data.packing import Units, best_fit_decreasing, length_groups, tie_shuffle
from distft.data.records import DataError
from distft.data.store import Split
from distft.data.tokenize import IGNORE
from distft.dist import DistContext
from distft.flops import layer_windows

Row = list[tuple[np.ndarray, np.ndarray]]  # the (ids, labels) samples of one row


@dataclass(frozen=True)
class StepTotals:
    """One optimizer step over all ranks: predicted tokens (the loss normaliser), real
    tokens, the sum of squared sample lengths and the lengths (attention FLOPs)."""

    targets: int
    tokens: int
    squared_lengths: int
    lengths: tuple[int, ...] | None = None


MASKS = {"sdpa": "bool", "eager": "additive"}  # the 4-D mask each attention takes


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    # None: one sample per row, right-padded (SDPA's fast causal path), or packed rows
    # whose mask is not built yet (`mask`); 4-D: the block-diagonal causal mask of packed
    # rows.
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None  # packed rows: restart at 0 per sample
    n_tokens: int = 0  # real (non-pad) tokens
    # A slice of longer sequences (distft.seqpar): the token each position predicts, taken
    # from the whole sequence before it was split (a slice's last position predicts the
    # next slice's first token). None: the labels moved one left.
    shift_labels: torch.Tensor | None = None
    # Packed rows that need a 4-D mask ("bool" for SDPA, "additive" for eager): built from
    # the position ids where the batch runs (`to`, `model_inputs`), never on the host first.
    mask: str | None = None

    @property
    def n_targets(self) -> int:
        """Tokens that contribute to the loss (labels are shifted by one)."""
        if self.shift_labels is not None:
            return int((self.shift_labels != IGNORE).sum())
        return int((self.labels[:, 1:] != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor | bool]:
        out: dict[str, torch.Tensor | bool] = {"input_ids": self.input_ids}
        attention_mask = self._built_mask()
        if attention_mask is not None:
            out["attention_mask"] = attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
            # No cache: transformers finds packed samples in the position ids only without
            # one (masking_utils._preprocess_mask_arguments), and training needs none.
            out["use_cache"] = False
        return out

    def _built_mask(self) -> torch.Tensor | None:
        if self.attention_mask is not None or self.mask is None or self.position_ids is None:
            return self.attention_mask
        return block_causal_mask(self.position_ids, additive=self.mask == "additive")

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """On `device`, with a packed batch's mask built there. `non_blocking` from pinned
        memory (`pin_memory`) lets the copy overlap the GPU's work."""
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        return replace(moved, attention_mask=moved._built_mask())

    def pin_memory(self) -> Batch:
        """In page-locked host memory, for a non-blocking copy to the GPU."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        def each(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return Batch(
            fn(self.input_ids),
            fn(self.labels),
            each(self.attention_mask),
            each(self.position_ids),
            self.n_tokens,
            each(self.shift_labels),
            self.mask,
        )


def block_causal_mask(position_ids: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """The 4-D (rows, 1, w, w) mask of packed rows, on `position_ids`' device: a token sees
    the tokens of its own sample up to itself. Samples (and a row's padding) start where
    the positions restart at 0. Bool for SDPA (True: attend); `additive` for eager: 0 where
    attended, float32's minimum elsewhere (added to the scores)."""
    segment = torch.cumsum(position_ids == 0, dim=1)
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril_()
    block = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]
    if not additive:
        return block
    scores = torch.zeros(block.shape, dtype=torch.float32, device=block.device)
    return scores.masked_fill_(~block, torch.finfo(torch.float32).min)


def collate_rows(rows: list[Row], pad_id: int, attn: str = "sdpa", windowed: bool = False) -> Batch:
    """Right-pad rows to the longest; a row of several samples is packed (isolated). With
    `windowed` (a model with sliding windows) packed rows carry position ids and no mask,
    and transformers builds each layer's mask from them."""
    packed = any(len(r) > 1 for r in rows)
    if packed and attn == "flash_attention_2":
        rows = [[s for r in rows for s in r]]  # one row: varlen kernel from position ids
    lengths = [sum(len(ids) for ids, _ in r) for r in rows]
    n, width = len(rows), max(lengths)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    pos = np.zeros((n, width), dtype=np.int64)
    for i, row in enumerate(rows):
        at = 0
        for s_ids, s_labels in row:
            m = len(s_ids)
            ids[i, at : at + m], labels[i, at : at + m] = s_ids, s_labels
            labels[i, at] = IGNORE  # never predicted from the previous sample's last token
            pos[i, at : at + m] = np.arange(m)
            at += m
        pos[i, at:] = np.arange(width - at)  # padding: its own block (positions restart)
    real = sum(lengths)
    out_ids, out_labels = torch.from_numpy(ids), torch.from_numpy(labels)
    if not packed:
        # Right padding needs no mask: under causal attention no real token looks at the
        # pads after it, and pads carry no labels. Loss and gradients are exact, and SDPA
        # keeps its fast mask-free causal path.
        return Batch(out_ids, out_labels, None, None, real)
    position_ids = torch.from_numpy(pos)
    if attn == "flash_attention_2" or windowed:
        return Batch(out_ids, out_labels, None, position_ids, real)
    # eager attention adds the mask to the scores; SDPA takes booleans
    return Batch(out_ids, out_labels, None, position_ids, real, mask=MASKS.get(attn, "bool"))


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
        split: Split,
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
        lengths = split.lengths
        if self.batching == "packed":
            self._bins = best_fit_decreasing(lengths, cfg.data.max_seq_len)
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
            raise DataError(
                f"{len(split)} training samples{made} are fewer than one global batch "
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
            units = Units(np.lexsort((key, lengths)), self._bounds)
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
            collate_rows(
                [[self.split.sample(int(i)) for i in row] for row in rows],
                self.pad_id,
                self.attn,
                self.windowed,
            )
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


def eval_batches(split: Split, micro: int, dist: DistContext, pad_id: int) -> list[Batch]:
    """This rank's share of the eval split, longest first (little padding). Every rank gets
    the same number of batches (ZeRO-3 forwards are collective); filler rows carry no
    targets. The result (a token-weighted mean) does not depend on the order."""
    per_rank = -(-len(split) // dist.world_size)
    by_length = np.argsort(-split.lengths, kind="stable")
    rows: list[Row] = [[split.sample(int(i))] for i in by_length[dist.rank :: dist.world_size]]
    filler_ids = split.sample(0)[0][:2]
    rows += [[(filler_ids, np.full(len(filler_ids), IGNORE))]] * (per_rank - len(rows))
    return [collate_rows(rows[i : i + micro], pad_id) for i in range(0, per_rank, micro)]
