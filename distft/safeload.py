"""The one place checkpoint files are unpickled: torch's restricted loader
(`weights_only=True`) with the few classes DeepSpeed pickles besides tensors and
containers. Anything else is refused in one line (`CheckpointError`).

Two ways in: DeepSpeed's checkpoint engine for `engine.load_checkpoint`
(`checkpoint_engine`), and `forced()` around DeepSpeed code that calls `torch.load`
itself with `weights_only=False` (the universal conversion and loader).
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import torch

from distft.errors import CheckpointError


def deepspeed_pickled_classes() -> list[Any]:
    """What DeepSpeed pickles besides tensors and containers: the ZeRO loss scaler (fp16
    `loss_scale: 0` writes the dynamic one), the stage enum, fragment addresses. (Imported
    here: `distft validate` runs without DeepSpeed.)"""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _restricted(load: Callable[..., Any], f: Any, *args: Any, **kwargs: Any) -> Any:
    """`load(f, ...)` weights-only. The allow-list is entered per call: torch's
    `safe_globals` removes its classes on exit, so a nested one would empty an outer one."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(deepspeed_pickled_classes()):
            return load(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{f}: refused to unpickle ({first})") from None


def checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, loading weights-only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return _restricted(torch.load, path, map_location=map_location)

    return WeightsOnly()


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Within: every `torch.load` is weights-only, whatever its caller asks for."""
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        return _restricted(original, f, *args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = original  # type: ignore[assignment]
