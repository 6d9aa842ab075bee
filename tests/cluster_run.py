"""The one training run the cluster tests share, and how they compare runs.

Every cluster test (SIGKILLed worker, Ray job submission, Slurm, network-namespace hosts)
trains the same config: 2 workers, ZeRO-2, fp32, 30 steps. Launch-path fields (address,
placement, max_failures) and the checkpoint cadence do not change the trajectory, so each
run must equal `cluster_reference` (conftest.py: one uninterrupted embedded-Ray run per
session) bit for bit: per-step losses and final weights.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tests.support import DISTFT, REPO, run_cli, tiny_config, write_config

STEPS = 30


def cluster_config(tiny: Any, out: Path, **sections: dict[str, Any]) -> Path:
    """The shared run (writes `<out>.yaml` next to `out`); `sections` update its sections."""
    base: dict[str, dict[str, Any]] = {
        "batch": {"max_steps": STEPS},
        # a cache of this session's own: the default (~/.cache/distft) is shared with
        # whatever else runs on the machine
        "data": {"eval_files": [], "cache_dir": str(Path(tiny.model_dir).parent / "cache")},
        "logging": {"wandb": {"mode": "disabled"}},
        "cluster": {"num_workers": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    cfg = tiny_config(tiny, out, **base)
    return write_config(out.parent / f"{out.name}.yaml", cfg)


def start_train(host: Any, cfg: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`distft train CFG` on a test host (tests/netns_fixture.py), in the background, its
    output to `log`."""
    with log.open("w") as f:
        return subprocess.Popen(
            host.argv([DISTFT, "train", str(cfg)]),
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


def reference_run(tiny: Any, out: Path) -> Path:
    proc = run_cli("train", str(cluster_config(tiny, out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def losses(out: Path) -> dict[int, float]:
    """step -> train loss (the last row for a step, if a step was ever logged twice).
    Safe to call while the run appends: a partly written last line is left out."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def launches(out: Path) -> list[dict[str, Any]]:
    """The worker-group starts recorded in `<out>/launches.jsonl` (distft.launch.preflight)."""
    path = out / "launches.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_same_training(run: Path, ref: Path) -> None:
    """Exact float equality of every step's loss and of every final weight."""
    assert losses(run) == losses(ref)
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(ref / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
