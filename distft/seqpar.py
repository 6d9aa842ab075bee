"""Sequence parallelism: DeepSpeed's Ulysses attention (Arctic Long Sequence Training).

`deepspeed.sequence_parallel_size = P` splits every sequence over P consecutive ranks (a
sequence-parallel group, `DistContext.sp_rank`); the W ranks form D = W/P data-parallel
groups (`DistContext.dp_rank`), each reading its own share of the batches. Inside attention
an all-to-all swaps "my slice of the sequence, all heads" for "the whole sequence, my
heads" and back (`UlyssesSPAttentionHF`); everything else (embeddings, MLPs, the LM head,
the loss) sees only this rank's slice.

Layout (`shard`): every rank of a group computes the same micro-batch locally (the batch
order is a pure function of the step: no communication), then
- the targets are moved one left on the whole sequence *before* the split: the last
  position of slice k predicts the first token of slice k+1;
- the width is right-padded to a multiple of P (pad ids, no target; causal attention never
  lets a real token see the pads after it), the rows to the fixed row count Ulysses' shapes
  were built for (filler rows of padding);
- position ids are the whole sequence's (0.. per row, or the packed ones): Ulysses gathers
  them for the attention kernel and rotary embeddings need the global positions.

Loss: rank r back-propagates the NLL sum S_r of its slice's targets times D/T (T = the
step's global target count, `distft.train`). The all-to-alls are differentiable, so the
gradients summed over all W ranks are those of sum_r S_r = the unsplit sequences' NLL sum;
DeepSpeed reduces gradients over all W ranks and divides by D (its data-parallel size with
an mpu), hence grad = (1/T) * grad(sum_r S_r), the same as without sequence parallelism.
No loss all-reduce is needed inside a group: the slices' targets are disjoint, so summing
the step's losses over all ranks (the loop's metrics all-reduce) gives the unsplit sum.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from distft.config import Config
from distft.data import IGNORE, Batch, TrainBatches, eval_batches
from distft.data.batch import shifted_targets
from distft.data.loader import resolve_batching
from distft.data.pairs import PairSplit
from distft.data.store import Split
from distft.dist import DistContext
from distft.errors import UserError

# The attention functions Ulysses replaced in transformers' registry, by implementation.
_PLAIN: dict[str, Callable[..., Any]] = {}


def rows_per_batch(cfg: Config) -> int:
    """Rows of every micro-batch under sequence parallelism. Ulysses checks each attention
    call against the batch size it was registered with; packed rows with flash-attention
    are one row (the varlen kernel), padded batches `batch.micro_batch_size` rows."""
    return 1 if resolve_batching(cfg) == "packed" else cfg.batch.micro


def shard(batch: Batch, sp_size: int, sp_rank: int, pad_id: int, rows: int) -> Batch:
    """Slice `sp_rank` of `batch` split along the sequence into `sp_size` equal slices."""
    targets = shifted_targets(batch.labels)  # on the whole sequence, before the split
    n, width = batch.input_ids.shape
    if batch.position_ids is None:
        positions = torch.arange(width).expand(n, width)
    else:
        positions = batch.position_ids
    extra_rows, extra_cols = rows - n, -width % sp_size
    if extra_rows < 0:
        raise ValueError(f"a micro-batch of {n} rows, more than the {rows} Ulysses expects")
    # New columns continue each row's positions (real tokens never attend to them);
    # filler rows are padding with positions 0.. and no targets.
    last = positions[:, -1:]
    positions = torch.cat([positions, last + 1 + torch.arange(extra_cols)], dim=1)
    ids = F.pad(batch.input_ids, (0, extra_cols), value=pad_id)
    labels = F.pad(batch.labels, (0, extra_cols), value=IGNORE)
    targets = F.pad(targets, (0, extra_cols), value=IGNORE)
    if extra_rows:
        positions = torch.cat([positions, torch.arange(width + extra_cols).expand(extra_rows, -1)])
        ids = F.pad(ids, (0, 0, 0, extra_rows), value=pad_id)
        labels = F.pad(labels, (0, 0, 0, extra_rows), value=IGNORE)
        targets = F.pad(targets, (0, 0, 0, extra_rows), value=IGNORE)
    chunk = (width + extra_cols) // sp_size
    cols = slice(sp_rank * chunk, (sp_rank + 1) * chunk)
    # The attention mask is dropped: Ulysses discards masks and masks causally over the
    # gathered sequence (packed rows: flash-attention's varlen kernel from position ids).
    return Batch(
        ids[:, cols].contiguous(),
        labels[:, cols].contiguous(),
        None,
        positions[:, cols].contiguous(),
        int((ids[:, cols] != pad_id).sum()),  # real tokens (FLOPs estimates only)
        targets[:, cols].contiguous(),
    )


class ShardedBatches(TrainBatches):
    """The micro-batches of this rank's data-parallel group, each cut to this rank's slice.
    Step totals, samples seen and the resume position are the data-parallel layout's."""

    def __init__(self, split: Split | PairSplit, cfg: Config, dist: DistContext, pad_id: int):
        super().__init__(split, cfg, dist.data_view(), pad_id)
        self.sp_size, self.sp_rank = dist.sp_size, dist.sp_rank
        self.rows = rows_per_batch(cfg)

    def for_step(self, step: int) -> list[Batch]:
        return [
            shard(b, self.sp_size, self.sp_rank, self.pad_id, self.rows)
            for b in super().for_step(step)
        ]


def train_batches(
    split: Split | PairSplit, cfg: Config, dist: DistContext, pad_id: int
) -> TrainBatches:
    """This rank's training batches: whole sequences, or its slices of them."""
    if dist.sp_size == 1:
        return TrainBatches(split, cfg, dist, pad_id)
    return ShardedBatches(split, cfg, dist, pad_id)


def eval_set(split: Split | PairSplit, cfg: Config, dist: DistContext, pad_id: int) -> list[Batch]:
    """This rank's eval batches. Under sequence parallelism they have the training
    micro-batch's row count (Ulysses' fixed shapes), not `eval.micro_batch_size`."""
    if dist.sp_size == 1:
        return eval_batches(split, cfg.eval.micro_batch_size, dist, pad_id)
    rows = rows_per_batch(cfg)
    whole = eval_batches(split, rows, dist.data_view(), pad_id)
    return [shard(b, dist.sp_size, dist.sp_rank, pad_id, rows) for b in whole]


def check_model(hf_config: Any, attn: str, sp_size: int) -> None:
    """Driver side, before Ray starts: what Ulysses would refuse on the workers. Raises
    UserError (one line) when the model's attention cannot be split over `sp_size` ranks."""
    if sp_size == 1:
        return
    key = f"deepspeed.sequence_parallel_size: {sp_size}"
    if attn == "eager":
        raise UserError(f"{key} needs sdpa or flash_attention_2; the model resolved to eager")
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % sp_size or (kv % sp_size and sp_size % kv):
        raise UserError(
            f"{key} must divide the model's {heads} attention heads, and its {kv} key/value "
            "heads must divide by it or it by them (Ulysses splits the heads over the ranks)"
        )


def register(model: torch.nn.Module, cfg: Config, dist: DistContext) -> Any:
    """Route the model's attention through Ulysses and build the sequence-parallel groups;
    returns the mpu for `deepspeed.initialize` (None without sequence parallelism). Every
    rank calls it (the groups are created collectively)."""
    if dist.sp_size == 1:
        return None
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf_config: Any = model.config  # a PreTrainedModel's (a PEFT model forwards it)
    attn = hf_config._attn_implementation
    _PLAIN.setdefault(attn, ALL_ATTENTION_FUNCTIONS[attn])
    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=attn,
        sequence_parallel_size=dist.sp_size,
        micro_batch_size=rows_per_batch(cfg),
        seq_length_is_variable=True,
    )


@contextmanager
def whole_sequences() -> Iterator[None]:
    """While active, attention is the plain kernel again: each rank runs whole sequences
    on its own (the export's check of the saved weights against the engine). Ulysses
    works by replacing the kernel in transformers' registry (`register_with_transformers`),
    so putting the original back is the whole switch."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ulysses = {name: ALL_ATTENTION_FUNCTIONS[name] for name in _PLAIN}
    for name, fn in _PLAIN.items():
        ALL_ATTENTION_FUNCTIONS[name] = fn
    try:
        yield
    finally:
        for name, fn in ulysses.items():
            ALL_ATTENTION_FUNCTIONS[name] = fn
