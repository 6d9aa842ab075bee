"""Weights & Biases on rank 0: offline unless an API key is set, never prompting; the run
id kept in the output dir so a resume continues the same run."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from distft.config import Config

RUN_ID_FILE = "wandb_run_id"


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


def wandb_mode(cfg: Config) -> str:
    """'online' only when an API key is configured; never prompt for one."""
    mode = cfg.logging.wandb.mode
    if mode != "auto":
        return mode
    has_key = cfg.logging.wandb.api_key is not None or bool(os.environ.get("WANDB_API_KEY"))
    return "online" if has_key else "offline"


def wandb_run_id(output_dir: Path) -> str:
    """The run's W&B id, created once and kept in the output dir so a resume continues it."""
    path = output_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def make_wandb_logger(cfg: Config) -> WandbLogger | None:
    """None when W&B is disabled. A key from the config goes into this process's
    environment only (W&B reads it there), never into a file."""
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    key = cfg.logging.wandb.api_key
    if key is not None:
        os.environ["WANDB_API_KEY"] = key.get_secret_value()  # this process only
    return WandbLogger(cfg, wandb_run_id(cfg.output_dir), mode)
