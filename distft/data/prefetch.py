"""The next optimizer step's micro-batches, prepared while this step runs.

One background thread collates step `s + 1` (and, on a GPU, copies it into pinned host
memory) while the loop runs step `s`: one step ahead, never more, so at most two steps'
batches are alive. The loop then moves each micro-batch to the device just before its
forward, non-blocking from pinned memory on CUDA, so only one micro-batch at a time (not
all `grad_accum` of them) sits on the device waiting. On CPU the thread also builds packed
rows' masks (`Batch.to`), off the loop's thread.

The batches are the same as `data.for_step(s)` (a pure function of the step): the order,
the loss and the resume position do not depend on the prefetching. An error in the
thread (a bad sample) is raised by `take` in the loop, inside the step's watchdog phase.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Protocol

import torch

from distft.data.loader import Batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """A host batch on `device` without making the host wait on a GPU: in pinned memory
    (copied there unless it is already), then to the device non-blocking."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


class StepSource(Protocol):
    total_steps: int

    def for_step(self, step: int) -> list[Batch]: ...


class Prefetcher:
    """`take(step)`: that step's micro-batches on the host (pinned for CUDA, already on
    the device for CPU); the next step's are prepared in the background meanwhile."""

    def __init__(self, data: StepSource, device: torch.device):
        self._data, self._device = data, device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distft-batches")
        self._next: tuple[int, Future[list[Batch]]] | None = None

    def take(self, step: int) -> list[Batch]:
        if self._next is not None and self._next[0] == step:
            current = self._next[1]
        else:  # the first step, or a loop that skipped ahead
            if self._next is not None:
                self._next[1].cancel()
            current = self._pool.submit(self._prepare, step)
        self._next = None
        if step + 1 < self._data.total_steps:
            self._next = (step + 1, self._pool.submit(self._prepare, step + 1))
        return current.result()

    def to_device(self, batch: Batch) -> Batch:
        """One micro-batch on the loop's device, just before its forward (already pinned
        on CUDA: `pin_memory` returns it as it is)."""
        return to_device(batch, self._device)

    def _prepare(self, step: int) -> list[Batch]:
        batches = self._data.for_step(step)
        if self._device.type == "cuda":
            return [b.pin_memory() for b in batches]
        return [b.to(self._device) for b in batches]  # CPU: masks built here

    def close(self) -> None:
        """Drop a step prepared for nothing (the loop stopped early) and end the thread."""
        if self._next is not None:
            self._next[1].cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
