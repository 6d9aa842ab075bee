"""What the workers would refuse about resuming, checked on the driver before Ray starts."""

from __future__ import annotations

from pathlib import Path

import torch

from distft.checkpoint.coordinator import (
    MANIFEST,
    CheckpointCoordinator,
    _changed,
    _never_but_saved,
)
from distft.checkpoint.fingerprint import fingerprint_changes
from distft.config import Config
from distft.dist import DistContext
from distft.errors import CheckpointError


def check_before_launch(cfg: Config) -> None:
    """On the driver, before Ray starts and before anything is written: what the workers
    would refuse about resuming (`resume: never` over saved checkpoints, a missing resume
    path, a newest checkpoint saved with another fingerprint). Cheap: a listing and one
    state file; the workers still verify hashes and decide (a torn newest checkpoint is
    left to them: they skip it)."""
    from distft.checkpoint.fingerprint import fingerprint

    coordinator = CheckpointCoordinator(cfg.output_dir / "checkpoints", DRIVER, 1)
    committed = coordinator.committed()
    resume = cfg.checkpoint.resume
    if resume == "never":
        if committed:
            raise _never_but_saved(coordinator.root)
        return
    if resume != "auto" and not (Path(resume) / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint.resume: {resume}: no manifest")
    ckpt = Path(resume) if resume != "auto" else (committed[-1] if committed else None)
    if ckpt is None or cfg.checkpoint.allow_fingerprint_change:
        return
    try:
        saved = coordinator.read_state(ckpt).fingerprint
    except (OSError, ValueError, TypeError):
        return
    changed = fingerprint_changes(saved, fingerprint(cfg))
    if changed:
        raise _changed(ckpt, changed)


DRIVER = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
