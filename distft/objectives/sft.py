"""Supervised fine-tuning: summed next-token NLL over a batch's target tokens.

Position i predicts token i+1, so the targets are the labels moved one left (the labels
move, not the logits: no copy of the rows x length x vocab logits). The head runs on the
target rows only (`distft.objectives.head`), chunked with `model.loss_chunk_size`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distft.data import Batch
from distft.objectives.base import Loss
from distft.objectives.chunked_ce import chunked_nll_sum
from distft.objectives.head import head_computes, head_plan, output_head, rows_of


def nll_sum(model: Any, batch: Batch, chunk: int | None = None) -> torch.Tensor:
    """Summed NLL of the batch's target tokens (a scalar that back-propagates). `chunk`:
    target rows per chunk of the head + cross-entropy (None/0: the whole head at once)."""
    targets = batch.targets  # found on the host: no device sync to select the rows
    head = output_head(model)
    plan = head_plan(model, head, batch) if chunk and head is not None else None
    if plan is not None and chunk:
        rows, size, epilogue, linear = targets.tokens, chunk, plan.epilogue, plan.linear

        def loss(hidden: torch.Tensor) -> torch.Tensor:
            return chunked_nll_sum(hidden, linear.weight, linear.bias, rows, size, epilogue)

        with rows_of(head, targets), head_computes(plan, loss):
            out: torch.Tensor = model(**batch.model_inputs()).logits  # the loss
        return out
    with rows_of(head, targets) as selected:
        logits = model(**batch.model_inputs()).logits  # ids, mask, position ids (packed)
    if not selected:  # no head to hook: every position's logits came back
        logits = logits.flatten(0, 1).index_select(0, targets.index)
    return F.cross_entropy(logits.float(), targets.tokens, reduction="sum")


class Sft:
    """Next-token NLL summed over the target tokens (`chunk`: `model.loss_chunk_size`)."""

    metrics: tuple[str, ...] = ()

    def __init__(self, chunk: int | None = None):
        self.chunk = chunk

    def __call__(self, model: Any, batch: Batch) -> Loss:
        return Loss(nll_sum(model, batch, self.chunk), batch.n_targets)
