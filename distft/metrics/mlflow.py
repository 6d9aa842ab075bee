"""MLflow on rank 0: one MLflow run per distft run, continued by every resume.

The run id is kept in `<output_dir>/mlflow_run_id` (like `wandb_run_id`); a resume finds
that run and logs on into it. The params are the redacted config, logged once when the
run is created (MLflow params cannot change afterwards); the tags name the run and its
output dir, and at the end the final model's folder. Credentials never reach MLflow's
URI: `user:password@` is taken out of `tracking_uri` and given to MLflow, like the token,
through this process's environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), so
neither MLflow's messages nor anything written show them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from distft.config import Config

RUN_ID_FILE = "mlflow_run_id"
PARAM_VALUE_MAX = 6000  # MLflow's limit on one param value
BATCH_PARAMS, BATCH_METRICS = 100, 1000  # MLflow's limits on one log_batch


def tracking_uri(cfg: Config) -> str:
    """The configured URI without credentials, or the run's own SQLite store (MLflow 3's
    default backend; its file store refuses new runs)."""
    uri, _, _ = cfg.logging.mlflow.split_uri()
    return uri or f"sqlite:///{cfg.output_dir / 'mlruns' / 'mlflow.db'}"


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"a": {"b": 1}}` -> `{"a.b": "1"}`; lists as JSON; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:PARAM_VALUE_MAX]
    return out


class MlflowLogger:
    def __init__(self, cfg: Config):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        m = cfg.logging.mlflow
        _, user, password = m.split_uri()
        secret_env = {
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password,
            "MLFLOW_TRACKING_TOKEN": m.token.get_secret_value() if m.token else None,
        }
        for name, value in secret_env.items():
            if value is not None:
                os.environ[name] = value  # this process only
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no schema-migration chatter
        local = m.tracking_uri is None
        if local:
            (cfg.output_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri(cfg))
        self._final = cfg.output_dir / "final"
        id_file = cfg.output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is not None and self._exists(run_id):
            self._client.update_run(run_id, status="RUNNING")  # a resume: the same run
            self.run_id = run_id
            return
        exp = self._client.get_experiment_by_name(m.experiment)
        artifacts = (cfg.output_dir / "mlruns" / "artifacts").as_uri() if local else None
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self._client.create_experiment(m.experiment, artifact_location=artifacts)
        )
        run = self._client.create_run(
            exp_id,
            run_name=m.run_name or cfg.output_dir.name,
            tags={"distft.output_dir": str(cfg.output_dir)},
        )
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(cfg.redacted()).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self._client.log_batch(self.run_id, params=params[i : i + BATCH_PARAMS])
        id_file.write_text(self.run_id)

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        rows = [Metric(k, float(v), ms, step) for k, v in metrics.items()]
        for i in range(0, len(rows), BATCH_METRICS):
            self._client.log_batch(self.run_id, metrics=rows[i : i + BATCH_METRICS])

    def close(self) -> None:
        if self._final.is_dir():
            self._client.set_tag(self.run_id, "distft.final_model", str(self._final))
        self._client.set_terminated(self.run_id, "FINISHED")
