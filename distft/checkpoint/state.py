"""What distft saves besides DeepSpeed's own state: the train state and every rank's RNG."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distft import __version__


@dataclass
class TrainState:
    """Everything distft needs besides DeepSpeed's own state to continue exactly.

    Checkpoints are taken at optimizer-step boundaries, so the gradient-accumulation
    position is always 0 there; it is recorded to make that explicit.
    """

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    samples_seen: int = 0  # global samples consumed: independent of the world size
    world_size: int = 1
    micro_step_in_accum: int = 0
    eval_loss: float | None = None  # latest eval loss, measured at eval_step
    eval_step: int | None = None  # keep_best ranks a checkpoint only if this == step
    wandb_run_id: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)
    version: str = __version__
    finished_at_step: int | None = None  # == step: the schedule ended here (rerun: no-op)

    def record_eval(self, loss: float) -> None:
        """The eval loss measured now, after `step` optimizer steps."""
        self.eval_loss, self.eval_step = loss, self.step

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
