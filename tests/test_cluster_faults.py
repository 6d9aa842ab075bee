"""Worker-failure recovery: SIGKILL one Ray Train worker process at a random step of a
2-worker ZeRO-2 run with `cluster.max_failures: 1`. distft's launcher starts a new worker
group (Ray's own retries are off: they would retry bad input too), the workers resume
from the newest committed checkpoint, and the run ends with the same
per-step losses and final weights as an uninterrupted run, bit for bit.

The worker pids come from `<output_dir>/launches.jsonl`, which every worker group writes
when it starts (distft.launch.preflight).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_run import STEPS, assert_same_training, cluster_config, launches, losses
from tests.support import DISTFT, REPO

pytestmark = pytest.mark.slow

EVERY = 4


def test_sigkilled_worker_restarts_and_matches_uninterrupted_run(
    cluster_reference: Path, tiny: Any, tmp_path: Path
) -> None:
    rng = random.Random()
    kill_step, victim = rng.randrange(EVERY + 2, STEPS - 4), rng.randrange(2)
    where = f"kill after step >= {kill_step}, rank {victim}"
    out = tmp_path / "run"
    # resume: never forbids resuming someone else's checkpoints, not this run's own after
    # a restart
    ckpt = {"every_n_steps": EVERY, "keep_last": 2, "resume": "never"}
    cfg = cluster_config(tiny, out, checkpoint=ckpt, cluster={"max_failures": 1})
    proc = subprocess.Popen(
        [DISTFT, "train", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed_pid = killed_after = None
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            done, starts = losses(out), launches(out)
            if done and max(done) >= kill_step and starts:
                killed_pid = starts[0]["workers"][victim]["pid"]
                killed_after = max(done)
                os.kill(killed_pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        stdout, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_pid is not None, f"{where}: the run ended first:\n{stdout[-4000:]}"
    assert proc.returncode == 0, f"{where}:\n{stdout[-4000:]}"
    starts = launches(out)
    assert [s["restart"] for s in starts] == [0, 1], (where, starts)
    assert len({s["launch_id"] for s in starts}) == 1
    assert killed_pid not in {w["pid"] for w in starts[1]["workers"]}
    assert "restart 1 of this launch after a worker failure" in stdout, stdout[-4000:]
    assert "restarting the workers (1 of 1)" in stdout, stdout[-4000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", stdout)]
    assert len(resumed) == 1, (where, stdout[-4000:])
    # the newest checkpoint committed before the kill (the one at the kill may be torn)
    assert resumed[0] % EVERY == 0 and 0 < resumed[0] <= killed_after + 1, (where, resumed)
    print(f"{where}: killed pid {killed_pid} after step {killed_after}; resumed at {resumed[0]}")
    assert_same_training(out, cluster_reference)
