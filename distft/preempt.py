"""Preemption: stop at a step boundary with a committed checkpoint, then exit 75.

The driver (`distft train`) turns SIGTERM/SIGINT into a flag file in the output dir
(shared storage on multi-node runs). Each rank checks the flag after every optimizer
step and the ranks agree with one all-reduce, so all of them stop at the same step,
save, and return. The driver then exits with EXIT_PREEMPTED; `launch/slurm` requeues
on that code, and the restarted run resumes from the checkpoint exactly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again
FLAG = "PREEMPT"


def requested(output_dir: Path) -> bool:
    return (output_dir / FLAG).exists()


def clear(output_dir: Path) -> None:
    (output_dir / FLAG).unlink(missing_ok=True)


@contextmanager
def on_signal(output_dir: Path) -> Iterator[list[int]]:
    """Within the block, SIGTERM/SIGINT request a preemption; yields the signals seen.
    A second signal restores the previous handlers' behaviour (hard stop)."""
    seen: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        if seen:
            for s, h in previous.items():
                signal.signal(s, h)
            signal.raise_signal(signum)
            return
        seen.append(signum)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FLAG).write_text(f"signal {signum}\n")
        print(
            f"[distft] got signal {signum}: stopping at the next step with a checkpoint "
            "(send it again to stop now)",
            flush=True,
        )

    for s in previous:
        signal.signal(s, handler)
    try:
        yield seen
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
