"""Preference losses, per pair, from the responses' log-probabilities.

For pair k: `chosen[k]`, `rejected[k]` are the policy's summed log-probs of the chosen and
rejected response tokens, `n_chosen[k]`, `n_rejected[k]` their token counts, and
`ref_chosen[k]`, `ref_rejected[k]` the frozen reference's sums. Each function returns the
per-pair losses and the implicit rewards of the two sides (what TRL logs as
rewards/chosen and rewards/rejected, from the same log-probs the loss uses). The formulas,
with sigma the logistic function:

- DPO (Rafailov et al. 2023), conservative label smoothing eps (cDPO, Mitchell 2023):
      h = beta * [(chosen - ref_chosen) - (rejected - ref_rejected)]
      loss = -(1 - eps) log sigma(h) - eps log sigma(-h)
- IPO (Azar et al. 2023), on the per-token mean log-probs (as TRL does):
      h = (mean_c - ref_mean_c) - (mean_r - ref_mean_r);  loss = (h - 1 / (2 beta))^2
- SimPO (Meng et al. 2024), reference-free, length-normalised, margin gamma:
      loss = -log sigma(beta * mean_c - beta * mean_r - gamma)
- ORPO (Hong et al. 2024), reference-free: the chosen response's mean token NLL plus
  weight x the odds-ratio loss, with log odds(y) = mean - log(1 - exp(mean)):
      loss = -mean_c - weight * log sigma(log odds(y_c) - log odds(y_r))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Per pair (each a (pairs,) fp32 tensor): summed response log-probs and counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor

    @property
    def mean_chosen(self) -> torch.Tensor:
        return self.chosen / self.n_chosen

    @property
    def mean_rejected(self) -> torch.Tensor:
        return self.rejected / self.n_rejected


@dataclass(frozen=True)
class PairLoss:
    losses: torch.Tensor  # (pairs,)
    chosen_rewards: torch.Tensor  # (pairs,), no gradient
    rejected_rewards: torch.Tensor


def dpo(policy: PairLogps, ref: PairLogps, beta: float, label_smoothing: float) -> PairLoss:
    chosen = policy.chosen - ref.chosen
    rejected = policy.rejected - ref.rejected
    h = beta * (chosen - rejected)
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo(policy: PairLogps, ref: PairLogps, beta: float) -> PairLoss:
    chosen = policy.mean_chosen - ref.mean_chosen
    rejected = policy.mean_rejected - ref.mean_rejected
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def simpo(policy: PairLogps, beta: float, gamma: float) -> PairLoss:
    chosen, rejected = beta * policy.mean_chosen, beta * policy.mean_rejected
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return PairLoss(losses, chosen.detach(), rejected.detach())


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp) < 1, stably: log(1 - p) = log(-expm1(.))."""
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def orpo(policy: PairLogps, weight: float) -> PairLoss:
    ratio = _log_odds(policy.mean_chosen) - _log_odds(policy.mean_rejected)
    losses = -policy.mean_chosen - weight * F.logsigmoid(ratio)
    chosen, rejected = weight * policy.mean_chosen, weight * policy.mean_rejected
    return PairLoss(losses, chosen.detach(), rejected.detach())
