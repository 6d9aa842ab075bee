"""Reward models (`objective.method: reward`): a sequence classifier with one output, trained
on preference pairs with the Bradley-Terry loss.

The model is the base with a one-output `score` head (`distft.model.auto_class`:
`AutoModelForSequenceClassification`, `num_labels: 1`), so the export is a plain
transformers reward model. A sequence's reward is the head's output at its last token that
is not the pad token: the rule transformers applies when it scores a sequence
(`...ForSequenceClassification.forward` pools the last non-pad position), so what a user's
plain `model(ids).logits` returns is the reward this objective trained. The head runs on
every position (one output per token costs nothing next to the body); a forward hook on it
keeps its per-position output, so packed rows (several sequences in one row, which
transformers' own pooling cannot see) score each sequence at its own last token.

Bradley-Terry (Bradley & Terry 1952; as in Ouyang et al. 2022 and TRL's RewardTrainer),
per pair with sigma the logistic function and c = `reward.center_coefficient`:

    loss = -log sigma(r_chosen - r_rejected) + c * (r_chosen + r_rejected)^2

summed over the batch's pairs (the loop divides by the step's global pair count). A pair
with no response token on a side (an evaluation filler) counts for nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from distft.config.objective import RewardConfig
from distft.data import Batch
from distft.objectives.base import Loss
from distft.objectives.preference import per_sequence

METRICS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
)
HEAD_NAMES = ("score", "classifier")  # transformers' sequence-classification heads


def score_head(model: Any) -> torch.nn.Module:
    """The classification head of a sequence classifier, a PEFT model (its wrapper of the
    head, which peft trains whole) or a DeepSpeed engine around either."""
    inner = getattr(model, "module", model)  # DeepSpeedEngine.module
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no sequence-classification head (score)")


@contextmanager
def per_position(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, the head's outputs (rows x length x 1) are appended to the yielded
    list."""
    seen: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _args: Any, out: torch.Tensor) -> None:
        seen.append(out)

    handle = head.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def last_positions(batch: Batch, pad_id: int) -> torch.Tensor:
    """Per sequence (`seq_ids` order), the flat index (row * length + position) of its
    last token that is not `pad_id`; -1 for a sequence with none."""
    if batch.seq_ids is None:
        raise ValueError("a reward model trains on batches of pairs (seq_ids)")
    seq = batch.seq_ids.reshape(-1)
    flat = torch.arange(seq.numel(), device=seq.device)
    real = (seq >= 0) & (batch.input_ids.reshape(-1) != pad_id)
    last = torch.full((batch.n_seqs,), -1, dtype=torch.long, device=seq.device)
    # every position takes part (a pad or filler position offers -1, the start value): no
    # boolean selection, whose size a GPU would have to report to the host
    offered = torch.where(real, flat, torch.full_like(flat, -1))
    return last.scatter_reduce(0, seq.clamp(min=0), offered, "amax")


def sequence_rewards(model: Any, batch: Batch, pad_id: int) -> torch.Tensor:
    """Each sequence's reward (fp32, `(batch.n_seqs,)`, `seq_ids` order); 0 for a sequence
    of pad tokens only."""
    with per_position(score_head(model)) as seen:
        model(**batch.model_inputs())
    scores = seen[-1].float().reshape(-1)  # the model's own call (the last one)
    last = last_positions(batch, pad_id)
    return torch.where(
        last >= 0, scores[last.clamp(min=0)], torch.zeros_like(last, dtype=scores.dtype)
    )


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, center: float) -> torch.Tensor:
    """Per-pair loss (see the module docstring)."""
    loss = -F.logsigmoid(chosen - rejected)
    return loss + center * (chosen + rejected) ** 2 if center else loss


class Reward:
    """The Bradley-Terry loss of a reward model on a batch of pairs; `pad_id`: the
    tokenizer's pad token (a sequence is scored at its last other token)."""

    metrics = METRICS

    def __init__(self, cfg: RewardConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id

    def __call__(self, model: Any, batch: Batch) -> Loss:
        rewards = sequence_rewards(model, batch, self.pad_id).view(-1, 2)
        # a pair counts when both sides have a response: a trained label, so a target
        # position (a sample's first label is never trained: its targets are its own)
        ones = torch.ones(batch.n_targets, device=rewards.device)
        counts = per_sequence(batch, ones).view(-1, 2)
        valid = (counts > 0).all(dim=1)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        losses = bradley_terry(chosen, rejected, self.cfg.center_coefficient)
        total = torch.where(valid, losses, torch.zeros_like(losses)).sum()
        v = valid.to(torch.float32)
        c, r = chosen.detach() * v, rejected.detach() * v
        sums = {
            "rewards/chosen": c.sum(),
            "rewards/rejected": r.sum(),
            "rewards/margins": (c - r).sum(),
            "rewards/accuracy": ((chosen > rejected) & valid).sum().float(),
        }
        return Loss(total, valid.sum(), sums)
