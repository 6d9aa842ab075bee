"""Checkpoint coordinator end to end: real Ray, 2 DeepSpeed ranks, real kills and signals.

Reference runs go uninterrupted; the others are stopped (early stop, SIGKILL in the middle
of a checkpoint write, a corrupted shard, SIGTERM) and restarted with the same command.
Per-step losses and final weights must equal the reference bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distft import safeload
from distft.tolerance import Kind, assert_close
from tests.support import (
    DISTFT,
    REPO,
    read_metrics,
    run_cli,
    tiny_config,
    wandb_history,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 24
METADATA = 256 << 10  # DeepSpeed's pickled config and shapes (measured ~100 KB for 2 ranks)
ZERO3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
SETUPS = {
    "zero2": {"deepspeed": {"zero_stage": 2, "precision": "fp32"}},
    "zero3_lora": {
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "ds_config": ZERO3},
        # dropout > 0: the RNG state must be restored for the resumed steps to match
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.1},
    },
    "zero2_lora": {  # ZeRO 0-2 kept the whole frozen base in every checkpoint once
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.1},
    },
}


@pytest.fixture(scope="module")
def small_train(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 samples: 4 optimizer steps per epoch, so 24 steps cross 6 epoch boundaries."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(tiny.train_file.read_text().splitlines()[:64]) + "\n")
    return path


def config(tiny: Any, small_train: Path, out: Path, setup: str, **extra: Any) -> Path:
    sections = {k: dict(v) for k, v in SETUPS[setup].items()}
    sections["data"] = {"train_files": [str(small_train)], "eval_files": []}
    sections["batch"] = {"micro_batch_size": 4, "grad_accum": 2, "max_steps": STEPS}
    sections["checkpoint"] = {"every_n_steps": 3, "keep_last": 2}
    for key, value in extra.items():
        sections.setdefault(key, {}).update(value)
    cfg = tiny_config(tiny, out, **sections)
    return write_config(out.parent / f"{out.name}.yaml", cfg)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final"
    name = "adapter_model.safetensors" if (final / "adapter_config.json").exists() else None
    return load_file(final / (name or "model.safetensors"))


def assert_identical(run: Path, ref: Path) -> None:
    """Exact on purpose: a resume on the same world size restores every tensor, optimizer
    state and RNG bit for bit, and replays the same batches through the same kernels on
    the same machine in the same order (torch's CPU allocator aligns every buffer to 64
    bytes, so even alignment-dependent BLAS paths repeat). Any difference is a bug."""
    assert losses(run) == losses(ref)  # exact float equality, every step
    a, b = weights(run), weights(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train(cfg: Path, *overrides: str, env: dict[str, str] | None = None) -> Any:
    if env is None:
        return run_cli("train", str(cfg), *overrides)
    return subprocess.run(
        [DISTFT, "train", str(cfg), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        check=False,
    )


def ok(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tiny: Any, small_train: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted runs, one per setup. `reference(setup)` starts one in the background
    (once) and returns its future: a test starts the one it needs first and waits for it
    when it compares, so its own runs and the reference share the 2 cores."""
    futures: dict[str, Future[Path]] = {}
    pool = ThreadPoolExecutor(1)

    def run(setup: str) -> Path:
        out = tmp_path_factory.mktemp(f"ref_{setup}") / "run"
        ok(train(config(tiny, small_train, out, setup)))
        return out

    def get(setup: str) -> Future[Path]:
        if setup not in futures:
            futures[setup] = pool.submit(run, setup)
        return futures[setup]

    yield get
    pool.shutdown(wait=True)


# zero2: the torn-save and SIGTERM tests; ZeRO-3 full: tests/test_preference_e2e.py (DPO)
@pytest.mark.parametrize("setup", ["zero3_lora", "zero2_lora"])
def test_stop_and_resume_is_bit_exact(setup, reference, tiny, small_train, tmp_path) -> None:
    reference(setup)  # runs beside this test's own runs
    out = tmp_path / "run"
    cfg = config(tiny, small_train, out, setup)
    first = ok(train(cfg, "batch.stop_after_steps=17"))  # mid-epoch, between saves
    assert "stopped at step 17 (batch.stop_after_steps); checkpoint committed" in first.stdout
    assert not (out / "final").exists()
    second = ok(train(cfg))
    assert "resumed from" in second.stdout and "at step 17" in second.stdout
    assert_identical(out, reference(setup).result())
    if "lora" in setup:
        assert_no_frozen_base(out)


def assert_no_frozen_base(out: Path) -> None:
    """A LoRA checkpoint holds the adapters and their optimizer state, not the frozen base:
    no base weight in any model-state file, and about 4x the adapter's fp32 bytes (weights,
    fp32 masters, two Adam moments) plus DeepSpeed's metadata."""
    final = out / "final" / "adapter_model.safetensors"
    adapter = sum(t.numel() * 4 for t in load_file(final).values())
    engine = safeload.checkpoint_engine()
    for ckpt in (out / "checkpoints").glob("step_*"):
        for f in ckpt.glob("*model_states.pt"):
            state = engine.load(str(f), map_location="cpu")
            names = [k for k, v in state["module"].items() if v.numel()]
            assert all("lora_" in k for k in names), (f, names[:5])
            assert not state.get("frozen_param_fragments"), f
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        print(f"CKPT {ckpt.name} {size} bytes, adapter fp32 {adapter}")
        assert size < 4 * adapter + METADATA, (ckpt, size, adapter)


def test_torn_save_and_corrupted_checkpoint_fall_back_to_the_last_good_one(
    reference, tiny, small_train, tmp_path
) -> None:
    """Saves in the background (`checkpoint.async_save`): a crash while writing step 12
    (after the loop went on) leaves it unpublished; a flipped bit in step 9 is then caught
    by its hash: named explicitly it is refused, found by `auto` it is skipped, and the run
    resumes from step 6 (a background save) and ends exactly where the uninterrupted run
    with synchronous saves does."""
    reference("zero2")  # runs beside this test's own runs
    out = tmp_path / "run"
    cfg = config(tiny, small_train, out, "zero2", checkpoint={"async_save": True})
    # rank 1 dies in its background write of step 12, after its shards, before its report
    crashed = train(cfg, env={"DISTFT_FAULT": "save:12:1"})
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / ".partial" / "step_00000012").is_dir()  # torn: never published
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000009"]

    shard = sorted((ckpts / "step_00000009").glob("*optim_states.pt"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit
    shard.write_bytes(bytes(data))
    # named explicitly, it is refused by the workers (the driver does not hash shards):
    # bad input, so one line and exit 2, and no Ray traceback (issue 16)
    refused = train(cfg, f"checkpoint.resume={shard.parent}")
    shown = refused.stdout[-3000:] + refused.stderr[-5000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and "Traceback" not in refused.stdout + refused.stderr, shown
    assert errors == [
        f"error: checkpoint.resume: {shard.parent}: {shard.name} does not match its hash "
        "(corrupted)"
    ], shown

    resumed = ok(train(cfg))
    assert f"skipping checkpoint: {shard.parent}: {shard.name} does not match its hash" in (
        resumed.stdout
    )
    assert "at step 6" in resumed.stdout
    assert_identical(out, reference("zero2").result())
    # retention kept the newest two (+ the final save), never fewer
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000021", "step_00000024"]


def test_sigterm_preempts_with_checkpoint_and_resumes_exactly(
    reference, tiny, small_train, tmp_path
):
    reference("zero2")  # runs beside this test's own runs
    out = tmp_path / "run"
    cfg = config(tiny, small_train, out, "zero2", checkpoint={"every_n_steps": 1000})
    proc = subprocess.Popen(
        [DISTFT, "train", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and losses(out).keys() & {2, 3}:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "preempted: checkpoint committed" in stderr
    (ckpt,) = (out / "checkpoints").glob("step_*")
    stopped_at = int(ckpt.name.split("_")[1])
    assert 2 <= stopped_at < STEPS
    assert f"stopped at step {stopped_at} (preemption)" in stdout
    resumed = ok(train(cfg))
    assert f"at step {stopped_at}" in resumed.stdout
    assert_identical(out, reference("zero2").result())
    # W&B continues the same run; no step is logged twice
    history = [step for step, row in wandb_history(out) if "train/loss" in row]
    assert history == list(range(1, STEPS + 1))
    assert len({p.name.split("-")[-1] for p in (out / "wandb").glob("offline-run-*")}) == 1


def test_changed_hyperparameters_are_refused_unless_allowed(tiny, small_train, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = config(tiny, small_train, out, "zero2")
    ok(train(cfg, "batch.stop_after_steps=3"))
    saved_config = (out / "config.yaml").read_text()
    # refused on the driver, before Ray starts and before anything is written
    for overrides, needle in [
        (["optim.lr=0.01", "optim.warmup_steps=0"], "saved with a different optim;"),
        (["checkpoint.resume=never"], "checkpoint.resume: 'never', but"),
        ([f"checkpoint.resume={tmp_path}"], "no manifest"),
    ]:
        refused = train(cfg, *overrides)
        assert refused.returncode == 2, refused.stderr[-2000:]
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0], refused.stderr
        assert "Traceback" not in refused.stderr and "ray" not in refused.stdout.lower()
        assert (out / "config.yaml").read_text() == saved_config
        checked = run_cli("validate", str(cfg), *overrides)  # the same check, no training
        assert checked.returncode == 2 and needle in checked.stderr, checked.stderr
    allowed = ok(
        train(
            cfg,
            "optim.lr=0.01",
            "checkpoint.allow_fingerprint_change=true",
            "batch.stop_after_steps=5",
        )
    )
    assert "resuming despite changed optim" in allowed.stdout


def test_two_workers_to_one_resumes_through_universal_checkpoint(
    reference, tiny, small_train, tmp_path
) -> None:
    """Same global batch (4 x 2 x 2 -> 4 x 4 x 1): same samples per step, same schedule.
    Only the reduction order differs, so the trajectory matches to float tolerance."""
    reference("zero2")  # runs beside this test's own runs
    out = tmp_path / "run"
    cfg = config(tiny, small_train, out, "zero2")
    ok(train(cfg, "batch.stop_after_steps=17"))
    resumed = ok(train(cfg, "cluster.num_workers=1", "batch.grad_accum=4"))
    ref = reference("zero2").result()
    # converted by `distft train` before Ray (no process group, no collective timeout),
    # then found intact by the worker
    assert "reshard: step_00000017 (saved by 2 workers) converted to a universal " in (
        resumed.stderr
    ), resumed.stderr[-3000:]
    assert "was saved by 2 workers, this run has 1: resharding through a universal" in (
        resumed.stdout
    )
    assert "converting again" not in resumed.stdout
    assert "at step 17" in resumed.stdout
    assert (out / "checkpoints" / ".universal" / "step_00000017" / "zero").is_dir()
    mine, theirs = losses(out), losses(ref)
    assert mine.keys() == theirs.keys()
    for step in mine:  # reductions over 1 rank instead of 2: reassociated sums
        assert_close(mine[step], theirs[step], torch.float32, Kind.REASSOCIATED, f"step {step}")

    def seen(run: Path) -> list[float]:
        return [r["train/samples_seen"] for r in read_metrics(run) if "train/samples_seen" in r]

    assert seen(out) == seen(ref)  # the same samples, step by step, on 1 worker as on 2
    a, b = weights(out), weights(ref)
    lr = yaml.safe_load(cfg.read_text())["optim"]["lr"]
    for k in a:  # Adam: rounding in the gradients moves weights relative to lr per step
        assert_close(a[k], b[k], torch.float32, Kind.REASSOCIATED, k, lr * len(mine))
