"""Ray launcher: embedded local Ray by default, or an existing cluster by address.

Runs Ray Train's TorchTrainer with one worker per data-parallel rank; every worker runs
`distft.worker.run_worker`. Worker failures come back as `TrainingFailed` with the
worker's own error message; `launch` owns the restarts.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distft.config import Config
from distft.errors import UserError


class TrainingFailed(Exception):
    def __init__(self, message: str, user_error: bool, trace: str = ""):
        super().__init__(message)
        self.user_error = user_error
        self.trace = trace  # the worker's traceback (a crash; never for a user error)


_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


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
    # Ray Train's controller polls its workers every 2 s by default: each start and the
    # end of every run wait for a poll. Polls are one small remote call per worker.
    env[_POLL_ENV] = os.environ.get(_POLL_ENV, "0.5")
    # transformers' "Loading weights" bars (huggingface_hub's switch, which transformers
    # follows): a bar redrawn with \r is noise in the log file and in --verbose
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def init_ray(cfg: Config, quiet: bool = False) -> None:
    """Start the embedded Ray, or connect to `cluster.address` (bounded: no cluster there
    is one line, exit 2, within seconds). `quiet`: Ray's logging is left to
    distft.console (no handler of Ray's own on the `ray` logger)."""
    import ray

    from distft.launch import resources

    if ray.is_initialized():
        return
    runtime_env: dict[str, Any] = {
        "env_vars": _worker_env(),
        "worker_process_setup_hook": f"{__name__}.quiet_user_errors",
    }
    if cfg.cluster.address is None:
        # "local": always a private instance. Without it, ray.init() joins whatever
        # cluster a `ray start` on this machine last recorded in /tmp/ray.
        ray.init(
            address="local",
            include_dashboard=cfg.cluster.dashboard,
            dashboard_host=cfg.cluster.dashboard_host,
            runtime_env=runtime_env,
            log_to_driver=True,  # distft.console takes the workers' lines from here
            configure_logging=not quiet,
            logging_level=logging.WARNING,
        )
        return
    address = cfg.cluster.address
    resources.connect(
        address,
        lambda: ray.init(
            address=address,
            runtime_env=runtime_env,
            configure_logging=not quiet,
            logging_level=logging.WARNING,
        ),
    )


# ------------------------------------------------ Ray's own tracebacks for user errors


def quiet_user_errors() -> None:
    """Ray worker-process setup hook (every worker, the Train controller included): a
    `UserError` raised in a worker is bad input with a one-line message, not a crash, so
    Ray Train's own logging of it (the worker's "Error in training function" traceback
    and the controller's failure-policy traceback) is dropped; the driver prints the line.
    Tracebacks of every other error stay. Also points Ray's state API at this cluster:
    without RAY_ADDRESS it scans `ps`, and with several Ray instances on one machine Ray
    Train's placement-group cleaner dies with a traceback."""
    import ray

    if "RAY_ADDRESS" not in os.environ and ray.is_initialized():
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    for name in _TRAIN_ERROR_LOGGERS:
        logging.getLogger(name).addFilter(_not_a_user_error)
    logging.getLogger(_RESOURCE_REQUEST_LOGGER).addFilter(_timeout_without_traceback)


_TRAIN_ERROR_LOGGERS = (
    "ray.train.v2._internal.util",  # the worker: "Error in training function"
    "ray.train.v2._internal.execution.failure_handling.default",  # the controller
)


# "Failed to send resource request ... If this only happens transiently during network
# partition or CPU being overloaded, it's safe to ignore this error": a line, no traceback
_RESOURCE_REQUEST_LOGGER = (
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
)


def _timeout_without_traceback(record: logging.LogRecord) -> bool:
    from ray.exceptions import GetTimeoutError

    if record.exc_info and isinstance(record.exc_info[1], GetTimeoutError):
        record.exc_info, record.exc_text = None, None
    return True


def _not_a_user_error(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return not is_user_error(exc)


def is_user_error(exc: BaseException | None) -> bool:
    """A UserError, or Ray Train's failure of a worker group where every worker that
    failed raised one."""
    if isinstance(exc, UserError):
        return True
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        return False
    return all(isinstance(getattr(e, "cause", None) or e, UserError) for e in failures.values())


def launch(cfg: Config, log: Callable[[str], None] = print) -> None:
    """Train on Ray; raises TrainingFailed with the worker's error.

    Restarts after a failure are ours, not Ray's (Ray's FailureConfig gets 0): Ray cannot
    tell bad input found in a worker (data, storage, a refused checkpoint) from a crash and
    would retry it `max_failures` times. Here a `UserError` ends the run at once; any
    other failure starts a new worker group, up to `cluster.max_failures` times, and the
    new group resumes from the newest valid checkpoint. Node preemptions are still Ray's
    (`max_preemption_failures`, unlimited) and do not count. A Ray node drain announced
    mid-run (distft.checkpoint.preempt.drain_announced) stops the workers at a step with a committed
    checkpoint; a new group then resumes from it, without counting as a failure."""
    from distft.checkpoint import preempt

    try:
        init_ray(cfg)
        _check_room(cfg, log)
    except UserError as e:  # no cluster at the address, or no room on it
        raise TrainingFailed(str(e), user_error=True) from None
    launch_id = uuid.uuid4().hex[:12]  # the same for every restart within this process
    limit = cfg.cluster.max_failures
    failures = 0
    while True:
        try:
            _fit(cfg, launch_id)
            drained = preempt.drain_reason(cfg.output_dir)  # None after a signal too
            if drained is None:
                return
            preempt.clear(cfg.output_dir)
            log(f"{drained}; restarting the workers")
        except TrainingFailed as failed:
            if failed.user_error:
                raise
            if preempt.requested(cfg.output_dir) and preempt.drain_reason(cfg.output_dir) is None:
                raise  # a signal to the driver: stop
            preempt.clear(cfg.output_dir)  # a drain's flag: this failure is one like any other
            if limit != -1 and failures >= limit:
                raise
            failures += 1
            first = str(failed).splitlines()[0] if str(failed) else type(failed).__name__
            log(f"{first}; restarting the workers ({failures} of {_limit_text(limit)})")


def _check_room(cfg: Config, log: Callable[[str], None]) -> None:
    """The workers' resources: refused at once on the embedded Ray (it cannot grow), waited
    for up to `cluster.resource_timeout_s` on an existing cluster."""
    from distft.launch import resources

    if cfg.cluster.address is None:
        resources.check_local_room(cfg)
    else:
        resources.wait_for_room(cfg, log)


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == -1 else str(limit)


def _fit(cfg: Config, launch_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import FailureConfig

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        _run_worker,
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
            failure_config=FailureConfig(  # Ray Train v2's: ray.train.FailureConfig at run time
                max_failures=0, controller_failure_limit=_startup_retries(cfg)
            ),
        ),
    )
    try:
        trainer.fit()
    except ray.train.ControllerError as e:
        raise _controller_failed(cfg, e) from None
    except ray.train.TrainingFailedError as e:
        raise _explain(e) from None


def _run_worker(train_loop_config: dict[str, Any]) -> None:
    """The workers' entry, by reference: the driver never imports the training stack
    (DeepSpeed, datasets, ...) that only the workers run."""
    from distft.worker import run_worker

    run_worker(train_loop_config)


def _startup_retries(cfg: Config) -> int:
    """Ray Train retries a worker group whose placement group is not ready within
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) forever by default; bounded here to about
    `cluster.resource_timeout_s` (our own reservation before it usually found the room:
    this is for resources taken in between)."""
    start_timeout = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60))
    return max(1, math.ceil(cfg.cluster.resource_timeout_s / start_timeout))


def _controller_failed(cfg: Config, err: Exception) -> TrainingFailed:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from distft.launch import resources

    cause = getattr(err, "controller_failure", None)
    if isinstance(cause, WorkerGroupStartupTimeoutError):
        return TrainingFailed(resources.no_room(cfg, "Ray Train"), user_error=True)
    return TrainingFailed(f"the Ray Train controller failed: {cause or err}", user_error=False)


def _explain(err: Exception) -> TrainingFailed:
    """The first worker's error, as one line when it is a user error."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        exc = failures[rank]
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, UserError):
            return TrainingFailed(str(cause).splitlines()[0], user_error=True)
        # Ray Train's message holds each failed worker's traceback
        trace = str(err).rstrip()
        return TrainingFailed(
            f"worker {rank} failed: {type(cause).__name__}: {cause}", False, trace
        )
    return TrainingFailed(str(err), user_error=False)
