"""The background save's parts without a launch (the end-to-end kill during a background
write, and the resume from a background save, are in test_checkpoint_e2e.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from distft.checkpoint import background
from distft.checkpoint.fingerprint import hash_file


def test_snapshot_is_independent_of_the_live_state_and_keeps_aliases() -> None:
    flat = torch.arange(8, dtype=torch.float32)
    weight = flat[:4].view(2, 2)
    scaler = {"cur_scale": 2.0**16, "history": [1, 2]}
    state = {"module": {"w": weight, "tied": flat[:4].view(2, 2)}, "opt": [flat], "s": scaler}
    snap = background.snapshot(state)
    flat.add_(100.0)  # the next optimizer step, in place
    scaler["history"].append(3)
    assert torch.equal(snap["opt"][0], torch.arange(8, dtype=torch.float32))
    assert torch.equal(snap["module"]["w"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert snap["module"]["w"] is snap["module"]["tied"]  # one view, one copy: saved once
    assert snap["s"]["history"] == [1, 2]


def _pending(staging: Path, rank: int, world: int, committed: list, fail: bool = False):
    def write() -> None:
        if fail:
            raise OSError(28, "No space left on device")
        (staging / f"shard{rank}.pt").write_bytes(bytes([rank]) * 100)

    def commit(hashes: dict[str, str]) -> None:
        committed.append(hashes)

    return background.Pending(
        staging, rank, world, 3, write, [f"shard{rank}.pt"], commit if rank == 0 else None
    )


def test_rank0_commits_once_every_rank_reported_its_hashes(tmp_path: Path) -> None:
    committed: list[dict[str, str]] = []
    rank0 = _pending(tmp_path, 0, 2, committed)
    time.sleep(0.5)
    assert not rank0.done() and committed == []  # rank 1 has not reported yet
    rank1 = _pending(tmp_path, 1, 2, committed)
    assert rank1.result() is None and rank0.result() is None
    expected = {f"shard{r}.pt": hash_file(tmp_path / f"shard{r}.pt") for r in (0, 1)}
    assert committed == [expected]
    assert not list(tmp_path.glob(".written_rank*"))  # the reports are not checkpoint files


def test_a_rank_that_fails_is_raised_there_and_stops_rank0_waiting(tmp_path: Path) -> None:
    committed: list[dict[str, str]] = []
    rank0 = _pending(tmp_path, 0, 2, committed)
    rank1 = _pending(tmp_path, 1, 2, committed, fail=True)
    assert isinstance(rank1.result(), OSError)
    error = rank0.result()
    assert isinstance(error, RuntimeError) and "rank 1 failed" in str(error)
    assert committed == []
    assert "No space left" in (tmp_path / ".failed_rank1").read_text()


@pytest.mark.parametrize("zipfile", [False, True])
def test_snapshot_engine_writes_what_it_was_handed_then(tmp_path: Path, zipfile: bool) -> None:
    class Live:
        zipfile_serialization = zipfile

    engine = background.snapshot_engine(Live())
    t = torch.ones(3)
    engine.save({"t": t, "step": 1}, str(tmp_path / "a.pt"))
    t.zero_()
    assert not (tmp_path / "a.pt").exists()  # nothing written on the loop's thread
    engine.write_all()
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["t"], torch.ones(3)) and loaded["step"] == 1
    assert json.dumps(sorted(loaded)) == '["step", "t"]'
