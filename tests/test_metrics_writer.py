"""The metrics writer thread (distft.metrics.writer): rows written in order, `flush`
waits for all of them, and a writer's error (a full disk) reaches the loop's thread as
the same one-line error, with nothing written after it. The multi-process contract
(each step once across a kill and a resume) is tests/test_trackers_e2e.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from distft import diskspace
from distft.metrics import BackgroundLogger, FanOut, JsonlLogger, read_jsonl
from distft.metrics.writer import QUEUE

FULL = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk


def test_rows_are_written_in_order_and_flush_waits_for_them(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    logger = BackgroundLogger(JsonlLogger(path))
    steps = range(1, 3 * QUEUE)  # more than the queue holds: log waits, nothing is dropped
    for s in steps:
        row = {"train/loss": 1 / s}
        logger.log(row, s)
        row["train/loss"] = -1.0  # the caller's dict changes afterwards: the row does not
    logger.flush()
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(path)] == [(s, 1 / s) for s in steps]
    logger.log({"train/loss": 0.5}, 1000)
    logger.close()  # writes what is queued
    assert read_jsonl(path)[-1]["step"] == 1000


@pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full")
def test_a_full_disk_in_the_writer_is_the_same_error_on_the_loops_thread() -> None:
    with pytest.raises(diskspace.WriteFailed) as direct:
        JsonlLogger(FULL).log({"train/loss": 1.0}, 1)
    logger = BackgroundLogger(JsonlLogger(FULL))
    logger.log({"train/loss": 1.0}, 1)  # handed over; written (and failing) on the thread
    with pytest.raises(diskspace.WriteFailed) as flushed:
        logger.flush()
    assert str(flushed.value) == str(direct.value)
    with pytest.raises(diskspace.WriteFailed):  # the next step's log raises it too
        logger.log({"train/loss": 2.0}, 2)
    with pytest.raises(diskspace.WriteFailed):  # and so does the end of the run
        logger.close()


def test_nothing_is_written_after_the_writers_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    good = JsonlLogger(path)

    class FailsAtStep3:  # a tracker after JSONL that fails once (FanOut's order)
        def log(self, metrics: dict[str, float], step: int) -> None:
            good.log(metrics, step)
            if step == 3:
                raise OSError(28, "No space left on device")

        def close(self) -> None:
            good.close()

    logger = BackgroundLogger(FailsAtStep3())
    for s in range(1, 6):
        try:
            logger.log({"train/loss": float(s)}, s)
        except OSError:
            break
    with pytest.raises(OSError, match="No space left"):
        logger.flush()
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_jsonl_time_is_when_the_loop_logged_the_row(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    released = threading.Event()

    class Held:  # holds the writer until the loop has moved on
        def log(self, metrics: dict[str, float], step: int) -> None:
            released.wait(timeout=60)

        def close(self) -> None:
            pass

    logger = BackgroundLogger(FanOut([Held(), JsonlLogger(path)]))
    before = time.time()
    logger.log({"train/loss": 1.0}, 1)
    after = time.time()
    released.set()  # only now is the row written
    logger.close()
    (row,) = read_jsonl(path)
    assert before <= row["time"] <= after  # the step's time, not the writer's
