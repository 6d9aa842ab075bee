"""TensorBoard event files on rank 0 (torch's SummaryWriter), in `logging.tensorboard.log_dir`
or `<output_dir>/tensorboard`. A resume adds a new event file to the same folder and logs
only the steps after the last one logged (SkipLogged), so the folder holds each step
once; a fresh run sets an earlier run's folder aside as `<log_dir>.prev`."""

from __future__ import annotations

import shutil
from pathlib import Path

from distft.config import Config

EVENTS = "events.out.tfevents.*"


def tensorboard_dir(cfg: Config) -> Path:
    log_dir = cfg.logging.tensorboard.log_dir
    return Path(log_dir) if log_dir is not None else cfg.output_dir / "tensorboard"


def set_aside(log_dir: Path) -> None:
    """A fresh run (step 0): an earlier run's event files in `log_dir` go to `.prev`."""
    if not any(log_dir.glob(EVENTS)):
        return
    prev = log_dir.with_name(f"{log_dir.name}.prev")
    if prev.exists():
        shutil.rmtree(prev)
    log_dir.replace(prev)


class TensorboardLogger:
    """Scalars at their step; flushed on every log, so the event file is as complete as
    metrics.jsonl when a process dies (the writer would otherwise hold them ~2 minutes)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
