"""A checkpoint save that runs out of disk: one line naming the output dir and the bytes,
exit 2 (not retried), the partial step directory removed, the previous checkpoint intact.
Real: the run's output dir is a small tmpfs (needs root: `mount -t tmpfs`). W&B is
disabled here: its files would live on the same full disk, in W&B's own process."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from distft import diskspace
from distft.checkpoint import CheckpointCoordinator
from distft.dist import DistContext
from tests.support import run_cli, tiny_config, write_config

# A tiny checkpoint is ~2.3 MB (1 worker, ZeRO-2, fp32): the first fits, the second not.
DISK = "3500k"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_checkpoint_is_one_line_and_keeps_the_previous(
    tiny: Any, small_disk: Path, tmp_path: Path
) -> None:
    out = small_disk / "run"
    cfg = tiny_config(
        tiny,
        out,
        batch={"max_steps": 3, "grad_accum": 1},
        cluster={"num_workers": 1},
        deepspeed={"zero_stage": 2, "precision": "fp32"},
        checkpoint={"output_dir": str(out), "every_n_steps": 1},
        logging={"every_n_steps": 1, "wandb": {"mode": "disabled"}},
    )
    proc = run_cli("train", str(write_config(tmp_path / "config.yaml", cfg)))
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, both[-4000:]
    assert re.fullmatch(
        rf"error: checkpoint\.output_dir: {re.escape(str(out))}: no space left on device while "
        r"saving checkpoint step_00000002: it needs about [\d,]+ bytes, [\d,]+ bytes are free; "
        r"checkpoint step_00000001 is intact and a rerun resumes from it \(free space or set "
        r"another checkpoint\.output_dir\)",
        errors[0],
    ), errors[0]
    assert "restarting the workers" not in both  # a full disk is not retried
    # no traceback of ours (Ray may still print its own, e.g. a resource-request timeout
    # on an overloaded machine): not the torch error, not a distft frame
    assert "enforce fail" not in both and "unexpected pos" not in both, both[-4000:]
    assert not re.search(r'File "[^"]*/distft/', both), both[-4000:]
    ckpts = out / "checkpoints"
    assert not (ckpts / ".partial" / "step_00000002").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001"]
    one = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    coordinator = CheckpointCoordinator(ckpts, one, keep_last=1)
    assert coordinator.verify(ckpts / "step_00000001") is None
    assert coordinator.find_resume("auto") == ckpts / "step_00000001"


def test_torch_short_write_and_errnos_are_recognised(tmp_path: Path) -> None:
    """How torch.save reports a short write, and the errnos, without filling a disk."""
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert diskspace.write_failure(short, tmp_path) == "no space left on device"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert diskspace.write_failure(quota, tmp_path) == "disk quota exceeded"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert diskspace.write_failure(wrapped, tmp_path) == "read-only file system"
    assert diskspace.write_failure(ValueError("bad shape"), tmp_path) is None
    staging = tmp_path / ".partial" / "step_00000004"
    staging.mkdir(parents=True)
    (staging / "shard.pt").write_bytes(b"x" * 100)
    failed = diskspace.checkpoint_save_failed(short, tmp_path / "checkpoints", staging, [])
    assert failed is not None and not staging.exists()
    assert "it needs about 100 bytes" in str(failed) and "no checkpoint was saved yet" in str(
        failed
    )


def test_metrics_write_on_a_full_disk_is_one_line(small_disk: Path) -> None:
    """The run directory also holds metrics.jsonl: a full disk there is the same one line."""
    from distft.metrics import JsonlLogger

    out = small_disk / "run"
    logger = JsonlLogger(out / "metrics.jsonl")
    ballast = small_disk / "ballast"
    with ballast.open("wb") as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with pytest.raises(diskspace.WriteFailed) as failed:
        logger.log({"train/loss": 1.0, "pad": "x" * 10_000}, 1)  # type: ignore[dict-item]
    assert str(failed.value) == (
        f"checkpoint.output_dir: {out}: no space left on device while writing "
        f"metrics.jsonl: {diskspace.free_bytes(out):,} bytes are free (free space or set "
        "another checkpoint.output_dir)"
    )
