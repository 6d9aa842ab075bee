"""MLflow and TensorBoard through the real CLI: 2 workers, killed midway, resumed.

The first launch loses rank 1 while it writes the step-6 checkpoint (DISTFT_FAULT), after
rank 0 logged step 6; the rerun resumes from step 4 and recomputes steps 5 and 6, which
must not be logged again. Read back with MLflow's own client and TensorBoard's own
EventAccumulator, each tracker holds every logged step of metrics.jsonl exactly once, in
one MLflow run across both launches and one TensorBoard folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.support import (
    DISTFT,
    REPO,
    jsonl_history,
    mlflow_history,
    read_metrics,
    tensorboard_scalars,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow


def train(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DISTFT, "train", str(config)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_killed_and_resumed_run_logs_each_step_once(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny,
        out,
        batch={"micro_batch_size": 4, "grad_accum": 1, "max_steps": 8},
        checkpoint={"output_dir": str(out), "every_n_steps": 2, "save_final_model": False},
        logging={
            "every_n_steps": 1,
            "wandb": {"mode": "disabled"},
            "mlflow": {"enabled": True, "experiment": "e2e"},
            "tensorboard": {"enabled": True},
        },
    )
    config = write_config(tmp_path / "config.yaml", cfg)
    crashed = train(config, {"DISTFT_FAULT": "save:6:1"})  # rank 1 dies writing step 6
    assert crashed.returncode == 1, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out) if "train/loss" in r] == list(range(1, 7))
    uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"
    run_id = (out / "mlflow_run_id").read_text()
    assert MlflowClient(uri).get_run(run_id).info.status == "RUNNING"  # rank 0 was killed

    resumed = train(config, {})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout + resumed.stderr
    want = jsonl_history(read_metrics(out))
    assert [s for s, _ in want["train/loss"]] == list(range(1, 9))  # 5, 6 not twice
    assert {s for s, _ in want["eval/loss"]} == {0, 8} and "data/train_samples" in want

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run across both launches
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["batch.max_steps"] == "8"
    # Exactly equal: MLflow's SQLite store keeps float64 and metrics.jsonl round-trips it.
    assert mlflow_history(uri, run_id) == want

    tb_dir = out / "tensorboard"
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 2  # rank 0, once per launch
    tb = tensorboard_scalars(tb_dir)
    assert set(tb) == set(want)
    for key, rows in want.items():  # in write order; event files hold float32 values,
        assert [s for s, _ in tb[key]] == [s for s, _ in rows], key  # equal after rounding
        assert [np.float32(v) for _, v in tb[key]] == [np.float32(v) for _, v in rows], key
