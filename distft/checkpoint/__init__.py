"""The checkpoint coordinator: the one owner of checkpoint I/O (`coordinator`), the state
distft saves beside DeepSpeed's (`state`), and saves written in the background (`background`)."""

from distft.checkpoint.coordinator import (
    MANIFEST,
    STATE,
    CheckpointCoordinator,
    load_trainable,
)
from distft.checkpoint.preflight import check_before_launch
from distft.checkpoint.state import TrainState, rng_state, set_rng_state
from distft.errors import CheckpointError

__all__ = [
    "MANIFEST",
    "STATE",
    "CheckpointCoordinator",
    "CheckpointError",
    "TrainState",
    "check_before_launch",
    "load_trainable",
    "rng_state",
    "set_rng_state",
]
