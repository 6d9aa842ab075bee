"""The three reference trainings that the end-to-end and export tests share: ZeRO-2 full,
ZeRO-3 full (every parameter sharded) and ZeRO-3 LoRA, 2 CPU workers, 8 steps, through
the real CLI; trained once per session (conftest.py `trained`)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import run_cli_concurrently, tiny_config, write_config

ZERO3_SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
LORA_R = 16
RUNS: dict[str, dict[str, Any]] = {
    "zero2_full": {"deepspeed": {"zero_stage": 2, "precision": "fp32"}},
    "zero3_full": {
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "ds_config": ZERO3_SHARD_ALL}
    },
    "zero3_lora": {
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "ds_config": ZERO3_SHARD_ALL},
        "lora": {
            "enabled": True,
            "r": LORA_R,
            "alpha": 2 * LORA_R,
            "dropout": 0.0,
            "target_modules": "all-linear",
        },
        "optim": {"lr": 2e-2, "warmup_steps": 0},
    },
}


@dataclass(frozen=True)
class TrainedRun:
    name: str
    cfg: dict[str, Any]
    out: Path  # the run's output_dir
    proc: subprocess.CompletedProcess  # `distft train`'s exit code and output

    def latest_checkpoint(self) -> Path:
        ckpts = self.out / "checkpoints"
        return ckpts / (ckpts / "latest").read_text().strip()


def train_all(tiny: Any, root: Path) -> dict[str, TrainedRun]:
    configs = {}
    for name, sections in RUNS.items():
        out = root / name / "run"
        cfg = tiny_config(tiny, out, **sections)
        configs[name] = (cfg, out, write_config(out.parent / "config.yaml", cfg))
    procs = run_cli_concurrently(*(("train", str(path)) for _, _, path in configs.values()))
    runs = {}
    for (name, (cfg, out, _)), proc in zip(configs.items(), procs, strict=True):
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        runs[name] = TrainedRun(name, cfg, out, proc)
    return runs
