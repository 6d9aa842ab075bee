"""Test support: run the real `distft` CLI, write configs, read back W&B offline records,
MLflow runs and TensorBoard event files."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DISTFT = str(Path(sys.executable).with_name("distft"))


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `distft ARGS` as a user would; the embedded Ray it starts ends with it."""
    return subprocess.run(
        [DISTFT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def run_cli_concurrently(
    *commands: tuple[str, ...], parallel: int = 2
) -> list[subprocess.CompletedProcess]:
    """`run_cli(*command)` for each command, `parallel` at a time (each `distft train` with
    its own embedded Ray), in the order given. A launch's start-up is a chain of single
    processes (driver, Ray, controller, workers) that leaves a core idle most of the time;
    two launches at once use a 2-core machine. Only for independent runs compared by
    their results, never by their timing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda args: run_cli(*args), commands))


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_config(assets: Any, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small 2-worker CPU run on the tiny assets; `sections` update the defaults."""
    cfg: dict[str, Any] = {
        "seed": 0,
        "model": {"name_or_path": str(assets.model_dir)},
        "data": {
            "train_files": [str(assets.train_file)],
            "eval_files": [str(assets.eval_file)],
            "max_seq_len": 128,
        },
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "batch": {"micro_batch_size": 4, "grad_accum": 2, "max_steps": 8},
        "eval": {"micro_batch_size": 8},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "cluster": {"num_workers": 2},
        "checkpoint": {"output_dir": str(output_dir)},
        "logging": {"every_n_steps": 1, "wandb": {"mode": "offline"}},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- W&B offline run files: a LevelDB-style log of protobuf `Record`s -----------------

_BLOCK = 32768
_HEADER = 7  # checksum u32, length u16, type u8
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(run_file: Path) -> list[Any]:
    """Parse every `wandb_internal_pb2.Record` in an offline `run-*.wandb` file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1 and version == 0, "not a W&B run file"
    records, pos, pending = [], 7, b""
    while pos + _HEADER <= len(data):
        space = _BLOCK - pos % _BLOCK
        if space < _HEADER:  # block trailer padding
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            break
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_history(output_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """(step, {key: value}) of every history row logged offline under output_dir/wandb."""
    rows = []
    for run_file in sorted((output_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in wandb_records(run_file):
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            rows.append((int(items.get("_step", rec.history.step.num)), items))
    return rows


# --- MLflow and TensorBoard, read back with their own readers ------------------------


def mlflow_history(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged (step, value) of every metric of an MLflow run, repeats kept."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    keys = client.get_run(run_id).data.metrics
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in `log_dir` in write order, repeats kept: purge_orphaned_data is
    off, or EventAccumulator itself would drop a step written twice."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


def jsonl_history(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl rows as {key: [(step, value)]}, the shape of the two above."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time"):
                out.setdefault(key, []).append((row["step"], value))
    return out
