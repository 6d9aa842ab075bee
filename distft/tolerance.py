"""Numerical tolerances, in one place: the product's export checks and the tests use these.

Two floating-point computations of the same function agree bit for bit only when they run
the same operations in the same order on the same values. Anything else differs by
rounding, and by how much depends on the machine (vector width, BLAS blocking, thread
count, memory alignment), so no tolerance may be a bare absolute number tuned on one
machine. Every bound here is

    |got - want| <= ulps * eps(dtype) * scale

- `eps(dtype)` is the machine epsilon of the dtype the compared values were computed or
  stored in (`torch.finfo`): 1.2e-7 for fp32, 7.8e-3 for bf16, 9.8e-4 for fp16.
- `scale` is the magnitude of what is compared: the largest |value| of the reference,
  and at least 1. Logits and losses near 0 come out of sums of terms of order 1 whose
  rounding does not shrink when the sum cancels.
- `ulps` is a budget of rounding steps for the kind of disagreement (`Kind`), and it
  depends on where the rounding happens: fp32 kernels round at every multiply-add of a
  dot product, so an fp32 logit carries the rounding of thousands of steps; bf16/fp16
  kernels accumulate in fp32 and round once per operation output, so their budget counts
  operations, not terms.

The budgets come from measurements on the tests' tiny models. Reassociated: an fp32
merged LoRA adapter differs from the unmerged one by 3-16 ulps with typical weights and
by 250 ulps with adapter weights ten times the base's (attention scores grow, and softmax
amplifies their rounding); a CI machine with another vector width reported 130 ulps for
the test run's merge (1.59e-5, which the old fixed 1e-5 refused). The budget is 8x the
largest. Recomputed: differences of a few ulps, budget 128 (1.5e-5 at scale 1, the old
fixed tolerance). Both stay far below what the checks exist to catch: a dropped, swapped
or re-initialised weight moves logits by a sizeable fraction of `scale`, and scaling one
MLP matrix of the tiny model by 1.001 moves them by 1.0e-4 (7x the recomputed bound).

Comparisons that are meant to be exact say so where they are made, with the reason (for
example a resumed run replays the same kernels on the same values in the same order).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import torch


class Kind(Enum):
    """Why two results may differ, from least to most rounding."""

    # The same function on the same weights, evaluated by kernels that may order their
    # reductions differently: the engine vs a plain reload, a ZeRO-3 gathered forward vs
    # a plain module, another thread count, another micro-batch split of the same sum.
    RECOMPUTED = "recomputed"
    # Mathematically equal expressions, evaluated differently: a merged LoRA weight
    # W + s·B·A vs x·W + s·(x·A)·B, a packed row vs samples one at a time (other shapes,
    # so other blocking), a reduction over another number of ranks.
    REASSOCIATED = "reassociated"
    # Weights rounded once more to a storage dtype (a bf16 export of fp32 masters, a bf16
    # merge) and evaluated in fp32: the budget is in ulps of the storage dtype.
    ROUNDED = "rounded"


_WIDE = (torch.float32, torch.float64)
_BUDGET_ULPS: dict[tuple[Kind, bool], float] = {
    # (kind, computed in fp32/fp64) -> ulps
    (Kind.RECOMPUTED, True): 128,
    (Kind.RECOMPUTED, False): 4,
    (Kind.REASSOCIATED, True): 2048,
    (Kind.REASSOCIATED, False): 8,
    (Kind.ROUNDED, True): 2048,  # rounding to fp32 is the fp32 case above
    (Kind.ROUNDED, False): 2,  # each weight within 1/2 ulp; logits move by about 1 ulp
}


def scale_of(values: torch.Tensor | float | Iterable[torch.Tensor | float]) -> float:
    """max(1, the largest |value|): the magnitude a rounding error is relative to."""
    if isinstance(values, torch.Tensor):
        items: list[torch.Tensor | float] = [values]
    elif isinstance(values, (int, float)):
        items = [float(values)]
    else:
        items = list(values)
    biggest = 0.0
    for v in items:
        m = float(v.detach().abs().max()) if isinstance(v, torch.Tensor) else abs(float(v))
        biggest = max(biggest, m)
    return max(1.0, biggest)


def bound(
    reference: torch.Tensor | float | Iterable[torch.Tensor | float],
    dtype: torch.dtype,
    kind: Kind,
    scale: float | None = None,
) -> float:
    """The largest |difference| from `reference` that rounding alone explains. `scale`
    replaces `scale_of(reference)` where the rounding is relative to something else
    (trained weights: the size of the updates, lr x steps under Adam)."""
    eps = torch.finfo(dtype).eps
    size = scale_of(reference) if scale is None else scale
    return _BUDGET_ULPS[(kind, dtype in _WIDE)] * eps * size


def within(
    got: torch.Tensor | float,
    want: torch.Tensor | float,
    dtype: torch.dtype,
    kind: Kind,
    scale: float | None = None,
) -> tuple[bool, float, float]:
    """(ok, max |got - want|, bound); NaN anywhere is never ok."""
    if isinstance(got, torch.Tensor) or isinstance(want, torch.Tensor):
        worst = float(torch.as_tensor(got - want).abs().max())
    else:
        worst = abs(float(got) - float(want))
    tol = bound(want, dtype, kind, scale)
    return worst <= tol, worst, tol  # `<=` is False for NaN


def assert_close(
    got: torch.Tensor | float,
    want: torch.Tensor | float,
    dtype: torch.dtype,
    kind: Kind,
    what: str = "",
    scale: float | None = None,
) -> None:
    """For tests: fail with the difference and the bound."""
    ok, worst, tol = within(got, want, dtype, kind, scale)
    assert ok, f"{what}: max |Δ| {worst:.3g} > {tol:.3g} ({kind.value}, {dtype})"
