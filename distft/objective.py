"""The training objective: summed next-token NLL over a batch's target tokens.

Position i predicts token i+1, so the targets are the labels moved one left (the labels
move, not the logits: no copy of the rows x length x vocab logits). Only positions with a
target go through the output layer: a forward pre-hook on the model's output embeddings
(`get_output_embeddings()`, the LM head of every Hugging Face causal LM) keeps the hidden
states of those positions, so the head's matmul, the logits and the softmax are computed
for the trained tokens alone. In SFT, prompts are often half the tokens; at a 128k
vocabulary the logits of one 8k-token sequence are 4 GiB in fp32. Gradients are the same:
the dropped positions contribute nothing to the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from distft.data import IGNORE, Batch


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts (IGNORE where none is trained)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def output_head(model: Any) -> torch.nn.Module | None:
    """The LM head of a causal LM, a PEFT model or a DeepSpeed engine around either."""
    inner = getattr(model, "module", model)  # DeepSpeedEngine.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


@contextmanager
def rows_of(head: torch.nn.Module | None, keep: torch.Tensor) -> Iterator[bool]:
    """While active, `head` sees only the hidden states where `keep` (rows x length) is
    true, flattened to (kept, hidden). Yields whether the head was found."""
    if head is None:
        yield False
        return

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[:2] != keep.shape:  # not the LM's own call
            return args
        return (hidden[keep], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        handle.remove()


def nll_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Summed NLL of the batch's target tokens (a scalar that back-propagates)."""
    targets = shifted_targets(batch.labels) if batch.shift_labels is None else batch.shift_labels
    keep = targets != IGNORE
    with rows_of(output_head(model), keep) as selected:
        logits = model(**batch.model_inputs()).logits  # ids, mask, position ids (packed)
    if not selected:  # no head to hook: every position's logits came back
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
