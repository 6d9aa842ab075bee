"""Metrics: one logger interface. Rank 0 writes JSONL (always) and W&B (when enabled);
every other rank gets a no-op. The W&B API key is never printed or written to disk."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from distft import diskspace
from distft.config import Config
from distft.dist import DistContext


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends `{"step": ..., "time": ..., **metrics}` lines; flushed on every write."""

    def __init__(self, path: Path):
        self._path = path
        with self._refused():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self._refused():
            self._f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
            self._f.flush()

    @contextlib.contextmanager
    def _refused(self) -> Iterator[None]:
        """A full (or read-only, ...) disk under the run directory: one line, no retry."""
        try:
            yield
        except OSError as e:
            failed = diskspace.logging_write_failed(e, self._path)
            if failed is None:
                raise
            raise failed from None

    def close(self) -> None:
        self._f.close()


class WandbLogger:
    def __init__(self, cfg: Config, run_id: str, mode: str):
        import wandb

        w = cfg.logging.wandb
        self._run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=w.name,
            id=run_id,
            resume="allow",
            mode=mode,  # type: ignore[arg-type]  # wandb_mode() returns one of its literals
            dir=str(cfg.output_dir),
            config=cfg.redacted(),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class FanOut:
    def __init__(self, loggers: list[MetricsLogger]):
        self._loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self._loggers:
            lg.log(metrics, step)

    def close(self) -> None:
        for lg in self._loggers:
            lg.close()


def wandb_mode(cfg: Config) -> str:
    """'online' only when an API key is configured; never prompt for one."""
    mode = cfg.logging.wandb.mode
    if mode != "auto":
        return mode
    has_key = cfg.logging.wandb.api_key is not None or bool(os.environ.get("WANDB_API_KEY"))
    return "online" if has_key else "offline"


def wandb_run_id(output_dir: Path) -> str:
    """The run's W&B id, created once and kept in the output dir so a resume continues it."""
    path = output_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


class SkipLogged:
    """After a resume at step k, steps k+1.. up to the last one already logged (by the
    attempt that crashed after its checkpoint) are recomputed bit-identically; they are
    not logged twice, so JSONL and W&B histories never repeat or rewind a step."""

    def __init__(self, inner: MetricsLogger, last_logged: int):
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
    if not resumed_at:  # a fresh run here (nothing to resume): keep the old log aside
        if jsonl.exists():
            jsonl.replace(jsonl.with_name("metrics.prev.jsonl"))
        (cfg.output_dir / "wandb_run_id").unlink(missing_ok=True)  # and a new W&B run
    loggers: list[MetricsLogger] = [JsonlLogger(jsonl)]
    mode = wandb_mode(cfg)
    if mode != "disabled":
        key = cfg.logging.wandb.api_key
        if key is not None:
            os.environ["WANDB_API_KEY"] = key.get_secret_value()  # this process only
        loggers.append(WandbLogger(cfg, wandb_run_id(cfg.output_dir), mode))
    return SkipLogged(FanOut(loggers), last_logged)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
