"""The data pipeline inside real `distft train` runs (embedded Ray, 2 DeepSpeed ranks):
packed batches under ZeRO-3 with mixed sources and a carved-out eval split, statistics
logged at step 0, the cache reused by a second start, and a data error found only at
tokenization (on a worker) reported as `file:line` with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support import read_metrics, run_cli, tiny_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packed_run(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("packed")
    cfg = tiny_config(
        tiny,
        root / "run",
        data={
            "sources": [
                {"path": str(tiny.train_file)},
                {"path": str(tiny.chat_train_file), "weight": 0.5},
            ],
            "val_fraction": 0.05,
            "batching": "packed",
            "max_seq_len": 128,
            "cache_dir": str(root / "cache"),
        },
        deepspeed={"zero_stage": 3, "precision": "fp32"},
        batch={"micro_batch_size": 2, "grad_accum": 2, "max_steps": 6},
    )
    del cfg["data"]["train_files"], cfg["data"]["eval_files"]
    path = write_config(root / "config.yaml", cfg)
    proc = run_cli("train", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_packed_zero3_run_trains_and_logs_data_statistics(packed_run: tuple[Path, Any]) -> None:
    root, proc = packed_run
    assert "data: batching packed: " in proc.stdout
    assert proc.stdout.count("data: train 2,850 samples") == 1  # 1900 + 0.5 x 1900, once
    rows = read_metrics(root / "run")
    stats = next(r for r in rows if "data/train_samples" in r)
    assert stats["step"] == 0 and stats["data/train_samples"] == 2850
    assert stats["data/eval_samples"] == 200  # 5% of each 2000-record source
    assert 0.9 < stats["data/pack_fill"] <= 1.0
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.3, evals
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 7))


def test_a_second_start_reuses_the_cache(packed_run: tuple[Path, Any]) -> None:
    root, _ = packed_run
    entries = [
        p for p in (root / "cache").iterdir() if p.is_dir() and p.name not in ("checked", "hashes")
    ]
    assert len(entries) == 2  # one per source
    metas = [json.loads((p / "meta.json").read_text()) for p in entries]
    assert sorted(m["samples"] for m in metas) == [2000, 2000]
    proc = run_cli("preprocess", str(root / "config.yaml"))
    assert proc.returncode == 0, proc.stderr
    assert "preprocessed " not in proc.stdout and proc.stdout.count("cached ") == 2


def test_tokenization_error_on_a_worker_names_file_and_line(tiny: Any, tmp_path: Path) -> None:
    """Every record parses (so the driver's check passes), but one prompt is so long that
    truncation leaves no trained token: only the tokenizing worker can tell."""
    lines = tiny.train_file.read_text().splitlines()[:40]
    lines[6] = json.dumps({"instruction": "word " * 200, "output": "short"})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tiny, tmp_path / "run")
    cfg["data"].update(train_files=[str(data)], cache_dir=str(tmp_path / "cache"))
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data}:7: no trainable tokens after truncation to max_seq_len"]
