"""What every objective returns (see `distft.objectives`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from distft.data import Batch


@dataclass
class Loss:
    total: torch.Tensor  # summed over the batch's units; back-propagates
    units: torch.Tensor | int  # the batch's units (target tokens, or pairs)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # metric sums, no gradient


class Objective(Protocol):
    """`metrics`: the keys of `Loss.sums`, the same on every rank and batch (all-reduced
    in this order)."""

    metrics: tuple[str, ...]

    def __call__(self, model: Any, batch: Batch) -> Loss: ...
