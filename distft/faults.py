"""Deterministic fault injection for distft's own crash-safety tests.

`DISTFT_FAULT=<point>:<step>[:<rank>]` makes the matching worker fail at that point:
- `save:<step>`: SIGKILL itself while writing that step's checkpoint, after DeepSpeed's
  shards and before the commit (e.g. `save:4:1`: rank 1, at step 4);
- `hang:<step>`: sleep forever at the start of that step (1-based: the step that would
  complete as step N), for the hang watchdog. Once per output dir: a marker file there
  records it, so the restarted worker group does not hang again.
Unset in normal use; reading one env var costs nothing.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "DISTFT_FAULT"


def _matches(point: str, step: int, rank: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return False
    return len(parts) < 3 or int(parts[2]) == rank


def maybe_crash(point: str, step: int, rank: int) -> None:
    if _matches(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_hang(step: int, rank: int, output_dir: Path) -> None:
    if not _matches("hang", step, rank):
        return
    marker = Path(output_dir) / f".fault-hang-step{step}-rank{rank}"
    if marker.exists():
        return
    marker.touch()
    while True:  # the injected hang: the watchdog's stack dump shows the sleep
        time.sleep(3600)
