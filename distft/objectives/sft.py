"""Supervised fine-tuning: summed next-token NLL over a batch's target tokens.

Position i predicts token i+1, so the targets are the labels moved one left (the labels
move, not the logits: no copy of the rows x length x vocab logits). The head runs on the
target rows only (`distft.objectives.head`), chunked with `model.loss_chunk_size`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distft.data import IGNORE, Batch
from distft.objectives.base import Loss
from distft.objectives.chunked_ce import chunked_nll_sum
from distft.objectives.head import head_computes, head_plan, output_head, rows_of


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts (IGNORE where none is trained)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def nll_sum(model: Any, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Summed NLL of the batch's target tokens (a scalar that back-propagates). `chunk`:
    target rows per chunk of the head + cross-entropy (None/0: the whole head at once)."""
    targets = shifted_targets(batch.labels) if batch.shift_labels is None else batch.shift_labels
    keep = targets != IGNORE
    head = output_head(model)
    plan = head_plan(model, head, batch) if chunk and head is not None else None
    if plan is not None and chunk:
        rows, size, epilogue, linear = targets[keep], chunk, plan.epilogue, plan.linear

        def loss(hidden: torch.Tensor) -> torch.Tensor:
            return chunked_nll_sum(hidden, linear.weight, linear.bias, rows, size, epilogue)

        with rows_of(head, keep), head_computes(plan, loss):
            out: torch.Tensor = model(**batch.model_inputs()).logits  # the loss
        return out
    with rows_of(head, keep) as selected:
        logits = model(**batch.model_inputs()).logits  # ids, mask, position ids (packed)
    if not selected:  # no head to hook: every position's logits came back
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


class Sft:
    """Next-token NLL summed over the target tokens (`chunk`: `model.loss_chunk_size`)."""

    metrics: tuple[str, ...] = ()

    def __init__(self, chunk: int | None = None):
        self.chunk = chunk

    def __call__(self, model: Any, batch: Batch) -> Loss:
        return Loss(nll_sum(model, batch, self.chunk), batch.n_targets)
