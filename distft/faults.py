"""Deterministic fault injection for distft's own crash-safety tests.

`DISTFT_FAULT=<point>:<step>[:<rank>]` makes the matching worker SIGKILL itself at that
point (e.g. `save:4:1`: rank 1, while writing the step-4 checkpoint, after DeepSpeed's
shards and before the commit). Unset in normal use; reading one env var costs nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "DISTFT_FAULT"


def maybe_crash(point: str, step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return
    if len(parts) > 2 and int(parts[2]) != rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)
