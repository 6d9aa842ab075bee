"""Metrics written off the training loop's thread.

`log` hands a step's metrics to one writer thread through a bounded queue (it waits only
when the writer is `QUEUE` rows behind) and returns; the thread writes them, in order,
through the inner logger (JSONL first, then the trackers). A row may be a function that
returns the metrics (the loop's step rows, whose values arrive with an all-reduce still
in flight): the thread calls it, and waits for them there. `flush` waits until every row
handed over is written: the worker flushes before a checkpoint commits, so the JSONL is
never behind a committed checkpoint and a killed-and-resumed run logs each step exactly
once (`SkipLogged`). An error in the writer (a full disk, a tracker that fails) is raised
on the loop's thread by the next `log`, `flush` or `close`, as the same exception; the
rows after it are not written.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distft.metrics import Tracker

Row = dict[str, float] | Callable[[], dict[str, float]]  # the metrics, or how to get them

QUEUE = 64  # rows in flight at most; a slow tracker then slows the loop rather than memory
_row = threading.local()  # the writer thread's row: when the loop logged it


def logged_at() -> float:
    """When the loop logged the row being written (`time.time()` then): JSONL's `time` is
    the step's, not the writer's. Now, for a row written on the caller's thread."""
    at: float | None = getattr(_row, "at", None)
    return time.time() if at is None else at


class BackgroundLogger:
    """`inner`'s rows written by a thread of their own (see the module docstring)."""

    def __init__(self, inner: Tracker):
        self._inner = inner
        self._rows: queue.Queue[tuple[Row, int, float] | None] = queue.Queue(QUEUE)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="distft-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: Row, step: int) -> None:
        self._raise_error()
        row = metrics if callable(metrics) else dict(metrics)  # a copy: the caller may change its
        self._rows.put((row, step, time.time()))

    def flush(self) -> None:
        """Return once every row logged so far is written (or raise the writer's error)."""
        self._rows.join()
        self._raise_error()

    def close(self) -> None:
        """Write what is queued, end the thread, close the inner logger."""
        if self._thread.is_alive():
            self._rows.put(None)
            self._thread.join()
        self._raise_error()
        self._inner.close()

    def _write(self) -> None:
        while True:
            row = self._rows.get()
            try:
                if row is None:
                    return
                if self._error is None:  # after an error nothing more is written
                    metrics, step, _row.at = row
                    self._inner.log(metrics() if callable(metrics) else metrics, step)
            except BaseException as e:  # raised on the loop's thread (`_raise_error`)
                self._error = e
            finally:
                self._rows.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
