"""Sequence parallelism end to end: the real CLI, real Ray, DeepSpeed ZeRO-2 in fp32 with
Ulysses attention over gloo. SP=2 on 2 CPU ranks (one data-parallel group: each rank holds
half of every sequence) against SP=1 on 1 rank, the same global batch (2 x 2 accumulation):
the same loss, gradient norm and eval loss every step, and the same trained weights.

`data.batching: padded` (what `auto` resolves to under SP with SDPA); the sequences are
split after their targets are shifted, and the loss is normalised by the step's global
target count (distft.train), so the two runs compute the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from distft.tolerance import Kind, assert_close
from tests.support import read_metrics, run_cli_concurrently, tiny_config, write_config

pytestmark = pytest.mark.slow

STEPS = 4
LR = 3e-3
RUNS = {"sp1": (1, 1), "sp2": (2, 2)}  # name: (workers, sequence_parallel_size)


@pytest.fixture(scope="module")
def runs(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out, configs = {}, []
    for name, (workers, sp) in RUNS.items():
        run = tmp_path_factory.mktemp(name) / "run"
        cfg = tiny_config(
            tiny,
            run,
            batch={"micro_batch_size": 2, "grad_accum": 2, "max_steps": STEPS},
            eval={"every_n_steps": 2, "micro_batch_size": 2},
            cluster={"num_workers": workers},
            data={"batching": "padded", "shuffle": True},
            deepspeed={"zero_stage": 2, "precision": "fp32", "sequence_parallel_size": sp},
            optim={"lr": LR, "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0},
            model={"attn_implementation": "sdpa"},
        )
        cfg["logging"]["wandb"]["mode"] = "disabled"
        configs.append(("train", str(write_config(run.parent / "config.yaml", cfg))))
        out[name] = run
    for proc in run_cli_concurrently(*configs):
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out


def _rows(run: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


def test_same_loss_grad_norm_and_eval_every_step(runs: dict[str, Path]) -> None:
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        ref, got = _rows(runs["sp1"], key), _rows(runs["sp2"], key)
        if key.startswith("train"):
            assert [s for s, _ in ref] == list(range(1, STEPS + 1))
        else:  # before training and every 2 steps; the last is the final eval, logged once
            assert [s for s, _ in ref] == [0, 2, STEPS]
        assert [s for s, _ in got] == [s for s, _ in ref]
        for (s, want), (_, have) in zip(ref, got, strict=True):
            # the same per-token terms, summed over two slices (other shapes) and two ranks
            assert_close(have, want, torch.float32, Kind.REASSOCIATED, f"{key} step {s}")
    losses = [v for _, v in _rows(runs["sp1"], "train/loss")]
    assert losses[-1] < losses[0]  # it trained: the steps differ, the comparison bites


def test_same_weights(runs: dict[str, Path], tiny: Any) -> None:
    ref = load_file(runs["sp1"] / "final" / "model.safetensors")
    start = load_file(tiny.model_dir / "model.safetensors")
    assert max(float((ref[k] - start[k]).abs().max()) for k in ref) > 1e-3
    got = load_file(runs["sp2"] / "final" / "model.safetensors")
    assert got.keys() == ref.keys()
    # Adam turns a gradient's rounding into an update error relative to the update (at
    # most lr per step), not to |w| (as in tests/test_loss_normalisation.py).
    for k in ref:
        assert_close(got[k], ref[k], torch.float32, Kind.REASSOCIATED, k, LR * STEPS)
