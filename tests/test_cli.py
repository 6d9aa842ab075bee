"""The `distft` command as a user runs it: exit codes and one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from distft.assets import build_tiny_assets
from tests.support import REPO, run_cli, tiny_config, write_config

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def repo_tiny() -> None:
    """tiny_demo.yaml points at .cache/tiny (what `make demo` builds)."""
    build_tiny_assets(REPO / ".cache" / "tiny")


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path, repo_tiny: None) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:") and ("distft train" in first or "make demo" in first)
    # The demo's fine-tunes start from the pre-trained tiny model (tiny_pretrain.yaml's
    # output, which `make demo` trains); where it was not trained, from its random-init base.
    # DPO starts from the demo's fine-tune (runs/tiny_demo/final), likewise.
    text = path.read_text()
    base = [
        "model.name_or_path=.cache/tiny/model"
        for start in (".cache/tiny_pretrain/final", "runs/tiny_demo/final")
        if start in text and not (REPO / start).is_dir()
    ]
    proc = run_cli("validate", str(path.relative_to(REPO)), *base)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_bad_config_one_line_per_problem_exit_2(tiny: Any, tmp_path: Path) -> None:
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["deepspeed"].update(zero_stage=7, offload_param="gpu")
    cfg["optim"]["schedule"] = "cosine-ish"
    cfg["model"]["flash"] = True
    proc = run_cli("validate", str(write_config(tmp_path / "bad.yaml", cfg)))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 4, lines
    joined = "\n".join(lines)
    assert "error: deepspeed.zero_stage: Input should be 0, 1, 2 or 3 (got 7)" in joined
    assert "error: deepspeed.offload_param: Input should be 'none' or 'cpu' (got 'gpu')" in joined
    assert "error: optim.schedule: Input should be 'cosine', 'linear' or 'constant'" in joined
    assert (
        "error: model.flash: unknown key; allowed: add_special_tokens, attn_implementation"
        in joined
    )


def test_bad_override_and_train_exit_2_without_starting_ray(tiny: Any, tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config(tiny, tmp_path / "out"))
    proc = run_cli("train", str(path), "batch.micro_batch_size=0", "cluster.num_workers=x")
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert lines == [
        "error: batch.micro_batch_size: must be > 0 or 'auto' (got 0)",
        "error: cluster.num_workers: Input should be a valid integer, unable to parse string "
        "as an integer (got 'x')",
    ]
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_missing_files_are_named(tiny: Any, tmp_path: Path) -> None:
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["data"]["train_files"] = [str(tmp_path / "nope.jsonl")]
    cfg["model"]["name_or_path"] = "./no/such/model"
    proc = run_cli("validate", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert f"error: data.train_files: file not found: {tmp_path / 'nope.jsonl'}" in lines
    assert "error: model.name_or_path: directory not found: ./no/such/model" in lines
    proc = run_cli("train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"error: {tmp_path / 'missing.yaml'}: config file not found"
    ]


def test_bad_record_reported_with_file_and_line_before_training(tiny: Any, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    shutil.copy(tiny.train_file, data)
    lines = data.read_text().splitlines()
    lines[6] = '{"instruction": "Add", "output": 3}'
    data.write_text("\n".join(lines) + "\n")
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["data"]["train_files"] = [str(data)]
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        f"error: {data}:7: field 'output' must be a string, got int"
    ]
    assert not (tmp_path / "out").exists()
    proc = run_cli("validate", str(tmp_path / "c.yaml"), "data.on_bad_record=skip")
    assert proc.returncode == 0, proc.stderr


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: x\n data: [\n")
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2
    (line,) = error_lines(proc.stderr)
    assert line.startswith(f"error: {path}:3: invalid YAML")
