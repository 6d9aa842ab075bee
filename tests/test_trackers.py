"""MLflow and TensorBoard beside JSONL, in-process on rank 0 (no Ray): what a run writes,
what a resume continues (the same MLflow run, the same TensorBoard folder, no step twice),
what a fresh run sets aside, what rank 1 writes (nothing), and secrets kept out of every
file and message. The multi-process run is tests/test_trackers_e2e.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from distft.config import Config, ConfigError, from_dict, save_resolved
from distft.dist import DistContext
from distft.metrics import MetricsLogger, NullLogger, make_logger, read_jsonl
from distft.metrics.mlflow import RUN_ID_FILE, flat_params, tracking_uri
from tests.support import jsonl_history, mlflow_history, tensorboard_scalars

RANK0 = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
RANK1 = DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
PASSWORD = "pw-5c1e9a7d3b"  # fake credentials, greppable
TOKEN = "tok-8e2f4a6c0d"


def config(out: Path, **logging: Any) -> Config:
    raw = {
        "model": {"name_or_path": "tiny"},
        "data": {"train_files": ["train.jsonl"]},
        "checkpoint": {"output_dir": str(out)},
        "logging": {
            "wandb": {"mode": "disabled"},
            "mlflow": {"enabled": True},
            "tensorboard": {"enabled": True},
            **logging,
        },
    }
    return from_dict(raw)


def log_steps(logger: MetricsLogger, steps: range) -> None:
    for s in steps:  # values that float32 cannot hold exactly: TensorBoard rounds them
        logger.log({"train/loss": 1 / (s + 3), "train/lr": 1e-3 * s, "train/step": s}, s)


def only_run(uri: str) -> Any:
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_resume_continues_the_same_run_and_folder_without_a_step_twice(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run")
    first = make_logger(cfg, RANK0)
    log_steps(first, range(0, 7))  # the attempt that crashed after its checkpoint at 4
    first.close()
    run_id = (cfg.output_dir / RUN_ID_FILE).read_text()
    resumed = make_logger(cfg, RANK0, resumed_at=4)
    log_steps(resumed, range(5, 10))  # 5 and 6 recomputed: not logged again
    resumed.close()

    want = jsonl_history(read_jsonl(cfg.output_dir / "metrics.jsonl"))
    assert [s for s, _ in want["train/loss"]] == list(range(10))
    run = only_run(tracking_uri(cfg))
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "run"  # the output dir's name
    assert run.data.params["logging.mlflow.experiment"] == "distft"
    # MLflow keeps float64 (SQLite REAL) and JSON round-trips float64: exactly equal.
    assert mlflow_history(tracking_uri(cfg), run_id) == want
    tb_dir = cfg.output_dir / "tensorboard"
    assert len(list(tb_dir.glob("events.out.tfevents.*"))) == 2  # one per attempt
    tb = tensorboard_scalars(tb_dir)
    assert set(tb) == set(want)
    for key, rows in want.items():  # event files hold float32: equal after that rounding
        assert [s for s, _ in tb[key]] == [s for s, _ in rows], key
        assert np.array_equal(
            np.array([v for _, v in tb[key]], np.float32),
            np.array([v for _, v in rows], np.float32),
        ), key


def test_a_fresh_run_starts_new_histories(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", mlflow={"enabled": True, "experiment": "exp-a"})
    first = make_logger(cfg, RANK0)
    log_steps(first, range(0, 3))
    first.close()
    old_id = (cfg.output_dir / RUN_ID_FILE).read_text()
    again = make_logger(cfg, RANK0)  # nothing to resume: step 0 again
    log_steps(again, range(0, 2))
    again.close()
    new_id = (cfg.output_dir / RUN_ID_FILE).read_text()
    assert new_id != old_id
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name("exp-a")
    assert exp is not None and len(client.search_runs([exp.experiment_id])) == 2
    assert [s for s, _ in mlflow_history(tracking_uri(cfg), new_id)["train/loss"]] == [0, 1]
    assert [s for s, _ in tensorboard_scalars(cfg.output_dir / "tensorboard")["train/loss"]] == [
        0,
        1,
    ]
    prev = tensorboard_scalars(cfg.output_dir / "tensorboard.prev")
    assert [s for s, _ in prev["train/loss"]] == [0, 1, 2]


def test_explicit_log_dir_and_final_model_tag(tmp_path: Path) -> None:
    tb_dir = tmp_path / "tb" / "mine"
    cfg = config(tmp_path / "run", tensorboard={"enabled": True, "log_dir": str(tb_dir)})
    logger = make_logger(cfg, RANK0)
    log_steps(logger, range(0, 2))
    (cfg.output_dir / "final").mkdir()  # written by save_final before the logger closes
    logger.close()
    assert not (cfg.output_dir / "tensorboard").exists()
    assert [s for s, _ in tensorboard_scalars(tb_dir)["train/lr"]] == [0, 1]
    tags = only_run(tracking_uri(cfg)).data.tags
    assert tags["distft.final_model"] == str(cfg.output_dir / "final")


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run")
    logger = make_logger(cfg, RANK1)
    assert isinstance(logger, NullLogger)
    log_steps(logger, range(0, 2))
    logger.close()
    assert not cfg.output_dir.exists()


def test_credentials_and_token_never_reach_a_file_or_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite://ml-user:{PASSWORD}@/{db}"  # SQLAlchemy ignores them for SQLite
    cfg = config(tmp_path / "run", mlflow={"enabled": True, "tracking_uri": uri, "token": TOKEN})
    save_resolved(cfg, cfg.output_dir / "config.yaml")
    logger = make_logger(cfg, RANK0)
    log_steps(logger, range(0, 3))
    logger.close()

    assert tracking_uri(cfg) == f"sqlite:///{db}"  # what MLflow is given
    run = only_run(tracking_uri(cfg))
    assert run.data.params["logging.mlflow.tracking_uri"] == f"sqlite://***@/{db}"
    assert run.data.params["logging.mlflow.token"] == "***"
    saved = yaml.safe_load((cfg.output_dir / "config.yaml").read_text())["logging"]["mlflow"]
    assert saved["tracking_uri"] == f"sqlite://***@/{db}" and saved["token"] == "***"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert db in files and len(files) > 3
    for p in files:
        data = p.read_bytes()
        assert PASSWORD.encode() not in data and TOKEN.encode() not in data, p
    printed = capfd.readouterr()
    assert PASSWORD not in printed.out + printed.err and TOKEN not in printed.out + printed.err
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD  # for MLflow, in this process
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == TOKEN


def test_redacted_uri_of_a_server() -> None:
    out = Path("/tmp/unused-run")
    uri = f"https://ml-user:{PASSWORD}@mlflow.example:5000/base"
    cfg = config(out, mlflow={"enabled": True, "tracking_uri": uri})
    assert cfg.redacted()["logging"]["mlflow"]["tracking_uri"] == (
        "https://***@mlflow.example:5000/base"
    )
    assert cfg.logging.mlflow.split_uri() == (
        "https://mlflow.example:5000/base",
        "ml-user",
        PASSWORD,
    )
    plain = config(out, mlflow={"enabled": True, "tracking_uri": "http://host:5000"})
    assert plain.redacted()["logging"]["mlflow"]["tracking_uri"] == "http://host:5000"


def test_params_are_flat_and_within_mlflow_limits() -> None:
    params = flat_params({"a": {"b": 1, "c": [1, 2], "d": None, "e": {}}, "s": "x" * 7000})
    assert params == {"a.b": "1", "a.c": "[1, 2]", "a.d": "null", "a.e": "{}", "s": "x" * 6000}


@pytest.mark.parametrize(
    ("module", "line"),
    [
        (
            "mlflow",
            "logging.mlflow.enabled: needs the mlflow package (pip install 'distft[mlflow]'",
        ),
        ("sqlalchemy", "logging.mlflow.enabled: needs the mlflow package"),
        (
            "tensorboard",
            "logging.tensorboard.enabled: needs the tensorboard package "
            "(pip install 'distft[tensorboard]'",
        ),
    ],
)
def test_a_missing_package_is_one_config_line(
    module: str, line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails: not installed
    with pytest.raises(ConfigError) as e:
        config(Path("/tmp/unused-run"))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(line)
    config(
        Path("/tmp/unused-run"),
        mlflow={"enabled": module != "mlflow", "tracking_uri": "http://host:5000"},
        tensorboard={"enabled": module != "tensorboard"},
    )  # a server URI needs no SQL packages; a tracker left off needs nothing


def test_unknown_tracker_key_is_named() -> None:
    with pytest.raises(ConfigError) as e:
        config(Path("/tmp/unused-run"), tensorboard={"enabled": True, "logdir": "x"})
    assert e.value.problems == [
        "logging.tensorboard.logdir: unknown key; allowed: enabled, log_dir"
    ]
