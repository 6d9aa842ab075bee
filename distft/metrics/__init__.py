"""Metrics: one logger interface. Rank 0 writes JSONL (always) and, each when enabled,
W&B, MLflow and TensorBoard, from a writer thread off the training loop's (`writer`);
every other rank gets a no-op. A resume continues each tracker's history without logging
a step twice. Secrets (the W&B key, MLflow's token and
the credentials in its URI) are never printed or written to disk."""

from __future__ import annotations

from typing import Protocol

from distft.config import Config
from distft.dist import DistContext
from distft.metrics import mlflow, tensorboard, wandb
from distft.metrics.jsonl import JsonlLogger, read_jsonl
from distft.metrics.wandb import WandbLogger, wandb_mode, wandb_run_id
from distft.metrics.writer import BackgroundLogger, Row

__all__ = [
    "BackgroundLogger",
    "FanOut",
    "JsonlLogger",
    "MetricsLogger",
    "NullLogger",
    "Row",
    "SkipLogged",
    "Tracker",
    "WandbLogger",
    "make_logger",
    "read_jsonl",
    "wandb_mode",
    "wandb_run_id",
]


class Tracker(Protocol):
    """One destination of the metrics rows (JSONL, W&B, MLflow, TensorBoard)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class MetricsLogger(Protocol):
    """What the loop and the worker log through: a row is the metrics or a function that
    returns them (`writer.Row`); `flush` returns once every row logged so far is written
    (before a checkpoint commits)."""

    def log(self, metrics: Row, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, metrics: Row, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FanOut:
    """Each logger in order; JSONL first, so no tracker ever holds a step it lacks."""

    def __init__(self, loggers: list[Tracker]):
        self._loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self._loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self._loggers:
            lg.close()


class SkipLogged:
    """After a resume at step k, steps k+1.. up to the last one already logged (by the
    attempt that crashed after its checkpoint) are recomputed bit-identically; they are
    not logged twice, so no history (JSONL, W&B, MLflow, TensorBoard) repeats or rewinds
    a step."""

    def __init__(self, inner: Tracker, last_logged: int):
        self._inner, self._last = inner, last_logged

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self._last:
            self._inner.log(metrics, step)

    def close(self) -> None:
        self._inner.close()


def make_logger(cfg: Config, dist: DistContext, resumed_at: int = 0) -> MetricsLogger:
    if not dist.is_main:
        return NullLogger()
    jsonl = cfg.output_dir / "metrics.jsonl"
    last_logged = max((r["step"] for r in read_jsonl(jsonl)), default=-1) if resumed_at else -1
    tb_dir = tensorboard.tensorboard_dir(cfg)
    if not resumed_at:  # a fresh run here (nothing to resume): keep the old logs aside
        if jsonl.exists():
            jsonl.replace(jsonl.with_name("metrics.prev.jsonl"))
        for run_id in (wandb.RUN_ID_FILE, mlflow.RUN_ID_FILE):  # and new tracker runs
            (cfg.output_dir / run_id).unlink(missing_ok=True)
        if cfg.logging.tensorboard.enabled:
            tensorboard.set_aside(tb_dir)
    loggers: list[Tracker] = [JsonlLogger(jsonl)]
    if (wandb_logger := wandb.make_wandb_logger(cfg)) is not None:
        loggers.append(wandb_logger)
    if cfg.logging.mlflow.enabled:
        loggers.append(mlflow.MlflowLogger(cfg))
    if cfg.logging.tensorboard.enabled:
        loggers.append(tensorboard.TensorboardLogger(tb_dir))
    return BackgroundLogger(SkipLogged(FanOut(loggers), last_logged))
