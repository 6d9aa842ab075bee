"""Preference objectives (DPO/IPO, SimPO, ORPO) on batches of pairs (`distft.data.pairs`).

One forward of the policy over the batch's chosen and rejected sequences; the head runs on
the response tokens alone (`distft.objectives.head`), and each response's log-prob is the
sum of its tokens' (`sequence_logps`). The per-pair formulas are in
`distft.objectives.losses`. The loss is summed over the batch's pairs (the loop divides by
the step's global pair count). A pair with no response token on a side (an evaluation
filler) contributes nothing.

DPO's reference log-probs come with the batch (`Batch.ref_logps`, precomputed once before
training: `distft.objectives.reference`) or from a resident reference, called with the
batch (`reference`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from distft.config.objective import ObjectiveConfig
from distft.data import Batch
from distft.objectives import losses
from distft.objectives.base import Loss
from distft.objectives.head import output_head, rows_of
from distft.objectives.losses import PairLogps

METRICS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracy",
)


def sequence_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed log-prob of its target tokens and their count (fp32,
    `(batch.n_seqs,)`), in `seq_ids` order."""
    if batch.seq_ids is None:
        raise ValueError("a preference objective needs batches of pairs (seq_ids)")
    targets = batch.targets  # found on the host: nothing here waits for a GPU
    with rows_of(output_head(model), targets) as selected:
        logits = model(**batch.model_inputs()).logits
    if not selected:  # no head to hook: every position's logits came back
        logits = logits.flatten(0, 1).index_select(0, targets.index)
    token_logps = -F.cross_entropy(logits.float(), targets.tokens, reduction="none")
    return per_sequence(batch, token_logps), per_sequence(batch, torch.ones_like(token_logps))


def per_sequence(batch: Batch, values: torch.Tensor) -> torch.Tensor:
    """`values`, one per target position (`batch.targets` order), summed per sequence
    (`seq_ids` order; `index_add`, not a count the host would have to read)."""
    assert batch.seq_ids is not None  # a batch of pairs
    seq = batch.seq_ids.flatten().index_select(0, batch.targets.index)
    return values.new_zeros(batch.n_seqs).index_add(0, seq, values)


def as_pairs(sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    """(chosen, rejected, ...) sequences as pairs; empty sides counted as 1 token (their
    pairs are masked out by the caller) so that no mean is 0/0."""
    s, n = sums.view(-1, 2), counts.clamp(min=1).view(-1, 2)
    return PairLogps(s[:, 0], s[:, 1], n[:, 0], n[:, 1])


Reference = Callable[[Any, Batch], torch.Tensor]  # (model, batch) -> (n_seqs,) summed logps


class Preference:
    """The `dpo`, `simpo` or `orpo` loss of `cfg`; `reference` computes DPO's reference
    log-probs when they are not precomputed (`Batch.ref_logps` is None)."""

    metrics = METRICS

    def __init__(self, cfg: ObjectiveConfig, reference: Reference | None = None):
        self.cfg, self.reference = cfg, reference

    def _ref(self, model: Any, batch: Batch, counts: torch.Tensor) -> PairLogps:
        if batch.ref_logps is not None:
            ref = batch.ref_logps.to(counts.device, torch.float32)
        elif self.reference is not None:
            ref = self.reference(model, batch)
        else:
            raise RuntimeError("dpo: no reference log-probs (neither precomputed nor resident)")
        return as_pairs(ref, counts)

    def __call__(self, model: Any, batch: Batch) -> Loss:
        sums, counts = sequence_logps(model, batch)
        policy = as_pairs(sums, counts)
        pair_counts = counts.view(-1, 2)
        valid = (pair_counts > 0).all(dim=1)
        c = self.cfg
        if c.method == "dpo" and c.dpo.loss == "ipo":
            out = losses.ipo(policy, self._ref(model, batch, counts), c.dpo.beta)
        elif c.method == "dpo":
            ref = self._ref(model, batch, counts)
            out = losses.dpo(policy, ref, c.dpo.beta, c.dpo.label_smoothing)
        elif c.method == "simpo":
            out = losses.simpo(policy, c.simpo.beta, c.simpo.gamma)
        else:
            out = losses.orpo(policy, c.orpo.weight)
        zero = torch.zeros((), device=sums.device)
        total = torch.where(valid, out.losses, zero).sum()
        v = valid.to(torch.float32)
        chosen, rejected = out.chosen_rewards * v, out.rejected_rewards * v
        metric_sums = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "rewards/accuracy": ((out.chosen_rewards > out.rejected_rewards) & valid).sum(),
            "logps/chosen": (policy.chosen.detach() * v).sum(),
            "logps/rejected": (policy.rejected.detach() * v).sum(),
            # reference-free: the policy gives the chosen response the higher mean
            # token log-prob (meaningful before training, where DPO's rewards are all 0)
            "logps/accuracy": ((policy.mean_chosen > policy.mean_rejected) & valid).sum(),
        }
        return Loss(total, valid.sum(), {k: t.float() for k, t in metric_sums.items()})
