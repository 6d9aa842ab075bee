"""Ray launcher: embedded local Ray by default, or an existing cluster by address.

Runs Ray Train's TorchTrainer with one worker per data-parallel rank; every worker runs
`distft.worker.run_worker`. Worker failures come back as `TrainingFailed` with the
worker's own error message; `launch` owns the restarts.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distft.config import Config
from distft.errors import UserError


class TrainingFailed(Exception):
    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


def _worker_env() -> dict[str, str]:
    """Env vars the workers need from the driver (never secrets)."""
    keep = (
        "TORCH_EXTENSIONS_DIR",
        "DS_ACCELERATOR",
        "WANDB_DIR",
        "HF_HOME",
        "HF_HUB_OFFLINE",
        "DISTFT_FAULT",  # distft.faults: crash-safety tests only
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {"env_vars": _worker_env()}
    if cfg.cluster.address is None:
        # "local": always a private instance. Without it, ray.init() joins whatever
        # cluster a `ray start` on this machine last recorded in /tmp/ray.
        ray.init(
            address="local",
            include_dashboard=True,
            dashboard_host=cfg.cluster.dashboard_host,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(
            address=cfg.cluster.address, runtime_env=runtime_env, logging_level=logging.WARNING
        )


def launch(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Train on Ray; raises TrainingFailed with the worker's error.

    Restarts after a failure are ours, not Ray's (Ray's FailureConfig gets 0): Ray cannot
    tell bad input found in a worker (data, storage, a refused checkpoint) from a crash and
    would retry it `max_failures` times. Here a `UserError` ends the run at once; any
    other failure starts a new worker group, up to `cluster.max_failures` times, and the
    new group resumes from the newest valid checkpoint. Node preemptions are still Ray's
    (`max_preemption_failures`, unlimited) and do not count."""
    from distft import preempt

    init_ray(cfg)
    launch_id = uuid.uuid4().hex[:12]  # the same for every restart within this process
    limit = cfg.cluster.max_failures
    failures = 0
    while True:
        try:
            _fit(cfg, launch_id)
            return
        except TrainingFailed as failed:
            if failed.user_error or preempt.requested(cfg.output_dir):
                raise
            if limit != -1 and failures >= limit:
                raise
            failures += 1
            first = str(failed).splitlines()[0] if str(failed) else type(failed).__name__
            log(f"{first}; restarting the workers ({failures} of {_limit_text(limit)})")


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == -1 else str(limit)


def _fit(cfg: Config, launch_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from distft.worker import run_worker

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"config": cfg, "launch_id": launch_id},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            resources_per_worker=resources,
            placement_strategy="PACK" if c.placement == "pack" else "SPREAD",
        ),
        run_config=ray.train.RunConfig(
            name="distft",
            storage_path=str(Path(cfg.checkpoint.output_dir).resolve() / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _explain(e) from None


def _explain(err: Exception) -> TrainingFailed:
    """The first worker's error, as one line when it is a user error."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, UserError):
            return TrainingFailed(str(cause).splitlines()[0], user_error=True)
        return TrainingFailed(f"worker {rank} failed: {type(cause).__name__}: {cause}", False)
    return TrainingFailed(str(err), user_error=False)
