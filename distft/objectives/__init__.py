"""Training objectives: what a micro-batch's loss is, and what it reports.

An objective takes the model (a DeepSpeed engine, or any module) and a `Batch` and returns
a `Loss`: the loss *summed* over the batch's units (target tokens for `sft`, pairs for the
preference methods), metric sums over the same units, and how many units the batch held.
The loop divides by the step's global unit count (`TrainBatches.step_totals`), so the
objective never needs to know how the step is split across micro-batches and ranks; the
loop does not branch on the method.

- `sft` (`distft.objectives.sft`): next-token NLL of the target tokens.
- `dpo`, `simpo`, `orpo` (`distft.objectives.preference`): preference pairs; the formulas
  are in `distft.objectives.losses`, the frozen reference of `dpo` in
  `distft.objectives.reference`.
- `reward` (`distft.objectives.reward`): a reward model (one-output sequence classifier)
  on preference pairs, Bradley-Terry loss.
"""

from __future__ import annotations

from distft.data.batch import shifted_targets
from distft.objectives.base import Loss, Objective
from distft.objectives.head import head_plan, output_head, rows_of
from distft.objectives.sft import nll_sum

__all__ = [
    "Loss",
    "Objective",
    "head_plan",
    "nll_sum",
    "output_head",
    "rows_of",
    "shifted_targets",
]
