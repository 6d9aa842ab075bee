"""The loss of an optimizer step is averaged over the step's *global* target tokens.

Then how the global batch of 8 sequences is split into (micro batch x grad accumulation x
workers) cannot matter: (8x1x1), (2x2x2) and (1x4x2) must reach the same weights. The data
have variable lengths (short and long answers), so micro-batches hold different numbers
of target tokens; averaging per micro-batch (then over accumulation steps and ranks), the
bug HF fixed in 2024, weighs a short micro-batch's tokens more and breaks the equality by
far more than the tolerance (checked by hand: see the issue's closing note).

Real CLI, real Ray, DeepSpeed ZeRO-2 in fp32 on CPU; `data.batching: padded` so a unit is
one sequence and every split consumes the same global window of the same order.
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

SPLITS = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2), "1x4x2": (1, 4, 2)}  # micro x accum x workers
STEPS = 5
LR = 3e-3


@pytest.fixture(scope="module")
def finals(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out, configs = {}, []
    for name, (micro, accum, workers) in SPLITS.items():
        run = tmp_path_factory.mktemp(name) / "run"
        cfg = tiny_config(
            tiny,
            run,
            batch={"micro_batch_size": micro, "grad_accum": accum, "max_steps": STEPS},
            cluster={"num_workers": workers},
            data={"eval_files": [], "batching": "padded", "shuffle": True},
            deepspeed={"zero_stage": 2, "precision": "fp32"},
            optim={"lr": LR, "warmup_steps": 1, "weight_decay": 0.01, "max_grad_norm": 1.0},
        )
        cfg["logging"]["wandb"]["mode"] = "disabled"
        configs.append(("train", str(write_config(run.parent / "config.yaml", cfg))))
        out[name] = run
    for proc in run_cli_concurrently(*configs):
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return out


def test_same_weights_whatever_the_split(finals: dict[str, Path], tiny: Any) -> None:
    ref = load_file(finals["8x1x1"] / "final" / "model.safetensors")
    start = load_file(tiny.model_dir / "model.safetensors")
    moved = max(float((ref[k] - start[k]).abs().max()) for k in ref)
    assert moved > 1e-3, "training did not move the weights: the comparison would be empty"
    for name in ("2x2x2", "1x4x2"):
        got = load_file(finals[name] / "final" / "model.safetensors")
        assert got.keys() == ref.keys()
        # Another split reassociates the gradient sums; Adam turns a gradient's rounding
        # into an update error relative to the update (at most lr per step), not to |w|.
        for k in ref:
            assert_close(got[k], ref[k], torch.float32, Kind.REASSOCIATED, name, LR * STEPS)


def test_same_loss_and_grad_norm_every_step(finals: dict[str, Path]) -> None:
    def curve(run: Path) -> list[tuple[int, float, float]]:
        rows = [r for r in read_metrics(run) if "train/loss" in r]
        return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rows]

    ref = curve(finals["8x1x1"])
    assert [s for s, _, _ in ref] == list(range(1, STEPS + 1))
    for name in ("2x2x2", "1x4x2"):
        for (s, loss, norm), (s2, loss2, norm2) in zip(ref, curve(finals[name]), strict=True):
            assert s == s2
            # the same per-token terms summed in other groups (and other padded shapes)
            assert_close(loss2, loss, torch.float32, Kind.REASSOCIATED, f"{name} loss {s}")
            assert_close(norm2, norm, torch.float32, Kind.REASSOCIATED, f"{name} norm {s}")


def test_micro_batches_differ_in_target_tokens(tiny: Any) -> None:
    """The premise: answers have very different lengths, so 1-sequence micro-batches
    carry different target counts (per-micro-batch averaging would weigh them unequally)."""
    import json

    lines = tiny.train_file.read_text().splitlines()[:64]
    lengths = [len(json.loads(line)["output"]) for line in lines]
    assert max(lengths) >= 4 * min(lengths), lengths
