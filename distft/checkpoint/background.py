"""Checkpoint saves written in the background (`checkpoint.async_save`).

The loop pays for a snapshot only: while DeepSpeed's `save_checkpoint` runs, its
checkpoint engine is `Snapshots`, which copies every state dict it is handed (tensors to
host memory, everything else deep-copied) instead of writing it. The training continues
and a thread writes the copies, then hashes and fsyncs this rank's files and reports them
in `.written_rank<r>.json` in the staging directory. Rank 0's thread waits for every
rank's report and commits exactly as a synchronous save does: manifest last, rename,
`latest`, retention. A process killed at any point before the rename leaves a staging
directory without a manifest, which is never loaded: the previous checkpoint stays in use.

No collective runs outside the loop's thread: the ranks meet through the shared output
directory (its sharing is checked at start, `distft.launch.preflight`). A failed write is
reported the same way (`.failed_rank<r>`), and every rank raises it at its next save or at
the end (`Pending.result`): they agree on it in one all-reduce on the loop's thread.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distft import faults
from distft.checkpoint.fingerprint import hash_file

WRITTEN = ".written_rank{rank}.json"
FAILED = ".failed_rank{rank}"
POLL_S = 0.05


def snapshot(obj: Any) -> Any:
    """A deep copy whose tensors are host copies: later in-place updates of the live state
    do not reach it. Tensors that view the same storage with the same geometry stay one
    tensor (tied weights are saved once, as torch.save would)."""
    memo: dict[int, Any] = {}
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            key = (
                x.untyped_storage().data_ptr(),
                x.storage_offset(),
                tuple(x.shape),
                x.stride(),
                x.dtype,
            )
            if key not in copies:
                copies[key] = x.detach().to("cpu", copy=True)
            memo[id(x)] = copies[key]
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, list | tuple):
            for v in x:
                visit(v)

    visit(obj)
    return copy.deepcopy(obj, memo)


def snapshot_engine(live: Any) -> Any:
    """A checkpoint engine for one `save_checkpoint` call: `save` keeps a snapshot and the
    path (`jobs`), `write_all` writes them later with the live engine's serialization."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    class Snapshots(TorchCheckpointEngine):
        def __init__(self) -> None:
            super().__init__(None)
            self.zipfile_serialization = getattr(live, "zipfile_serialization", False)
            self.jobs: list[tuple[str, Any]] = []

        def save(self, state_dict: Any, path: str) -> None:
            self.jobs.append((path, snapshot(state_dict)))

        def write_all(self) -> None:
            for path, state in self.jobs:
                torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            self.jobs.clear()

    return Snapshots()


class Pending:
    """One background save: this rank's write, and on rank 0 the commit after everyone's."""

    def __init__(
        self,
        staging: Path,
        rank: int,
        world_size: int,
        step: int,
        write: Callable[[], None],
        own_files: list[str],
        commit: Callable[[dict[str, str]], None] | None,
    ):
        self.staging, self.rank, self.world_size, self.step = staging, rank, world_size, step
        self._write, self._own_files, self._commit = write, own_files, commit
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"ckpt-{step}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._write()
            faults.maybe_crash("save", self.step, self.rank)  # a kill mid-background-save
            names = self._own_files
            hashes = {n: hash_file(self.staging / n, sync=True) for n in names}
            report = self.staging / WRITTEN.format(rank=self.rank)
            tmp = report.with_suffix(".tmp")
            tmp.write_text(json.dumps(hashes))
            tmp.rename(report)  # complete or absent
            if self._commit is not None:
                self._commit(self._gather(hashes))
        except BaseException as e:  # noqa: BLE001 - re-raised on the loop's thread
            self.error = e
            with contextlib.suppress(OSError):  # the loop's thread raises `e` in any case
                (self.staging / FAILED.format(rank=self.rank)).write_text(repr(e))

    def _gather(self, mine: dict[str, str]) -> dict[str, str]:
        """Rank 0: every rank's reported hashes, once all have reported (or one failed)."""
        hashes = dict(mine)
        waiting = set(range(self.world_size)) - {self.rank}
        while waiting:
            for r in sorted(waiting):
                if (self.staging / FAILED.format(rank=r)).exists():
                    raise RuntimeError(f"rank {r} failed to write its part of step {self.step}")
                report = self.staging / WRITTEN.format(rank=r)
                if report.is_file():
                    hashes.update(json.loads(report.read_text()))
                    waiting.discard(r)
            if waiting:
                time.sleep(POLL_S)
        for r in range(self.world_size):
            (self.staging / WRITTEN.format(rank=r)).unlink()
        return hashes

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> BaseException | None:
        """Wait for this rank's part (and on rank 0 the commit); its error, if any."""
        self._thread.join()
        return self.error
