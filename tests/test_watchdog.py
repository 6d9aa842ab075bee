"""The hang watchdog (distft.watchdog): its deadlines in-process, and a real 2-worker run
in which rank 1 hangs (DISTFT_FAULT=hang:...): every rank dumps its stacks, rank 0 names
the stuck rank, the group fails and the restarted group resumes from the checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from distft import watchdog
from distft.config.sections import WatchdogConfig
from tests.support import read_metrics, run_cli, tiny_config, write_config

PKG = Path(watchdog.__file__).parent


def test_step_deadline_is_max_s_until_a_few_steps_are_timed() -> None:
    d = watchdog.Deadlines(WatchdogConfig(slow_factor=10, min_s=5, max_s=100))
    for _ in range(watchdog.MIN_MEASURED - 1):
        d.record_step(2.0)
        assert d.limit("step") == 100
    d.record_step(2.0)
    assert d.limit("step") == 20  # 10 x the median
    assert d.limit("eval") == d.limit("save") == 100


def test_step_deadline_follows_the_median_within_min_s_and_max_s() -> None:
    d = watchdog.Deadlines(WatchdogConfig(slow_factor=10, min_s=5, max_s=100))
    for t in (0.1, 0.2, 0.1, 50.0):  # one slow outlier does not move the median
        d.record_step(t)
    assert d.limit("step") == 5  # 10 x 0.15 = 1.5, raised to min_s
    for _ in range(watchdog.RECENT):
        d.record_step(30.0)  # only the recent steps count
    assert d.limit("step") == 100  # 300, capped at max_s


def test_phases_time_steps_only() -> None:
    dog = watchdog.Watchdog(WatchdogConfig(), Path("/nonexistent"), rank=0, world_size=1)
    dog.begin("eval", 0)
    dog.end()
    dog.begin("step", 1)
    time.sleep(0.01)
    dog.end()
    assert len(dog.deadlines.recent) == 1 and dog.deadlines.recent[0] >= 0.01


def test_the_first_rank_past_its_deadline_asks_every_rank_for_stacks(tmp_path: Path) -> None:
    """A rank stuck in a save (deadline max_s) dumps when another rank's step times out."""
    cfg = WatchdogConfig()
    saving = watchdog.Watchdog(cfg, tmp_path, rank=1, world_size=2)
    assert saving._asked() is None
    stepping = watchdog.Watchdog(cfg, tmp_path, rank=0, world_size=2)
    stepping._ask_all("hang at step 5 (...)", tmp_path / "hang" / "step_00005")
    assert saving._asked() == ("hang at step 5 (...)", tmp_path / "hang" / "step_00005")
    time.sleep(0.01)
    next_group = watchdog.Watchdog(cfg, tmp_path, rank=1, world_size=2)
    assert next_group._asked() is None  # an earlier worker group's request


def _frame(path: Path, line: int, name: str, code: str = "") -> traceback.FrameSummary:
    return traceback.FrameSummary(str(path), line, name, line=code)


def test_locate_names_the_innermost_distft_frame_and_the_collective() -> None:
    torch_dir = Path("/venv/site-packages/torch/distributed")
    stack = [
        _frame(PKG / "worker.py", 10, "run_worker"),
        _frame(PKG / "train.py", 90, "train", "engine.backward(s * scale)"),
        _frame(Path("/venv/site-packages/deepspeed/runtime/engine.py"), 5, "backward"),
        _frame(torch_dir / "c10d_logger.py", 1, "wrapper"),
        _frame(torch_dir / "distributed_c10d.py", 2, "all_reduce"),
    ]
    assert watchdog.locate(stack) == {
        "where": "train.py:90 train",
        "code": "engine.backward(s * scale)",
        "collective": "all_reduce",
    }
    stuck = [*stack[:2], _frame(PKG / "faults.py", 40, "maybe_hang", "time.sleep(3600)")]
    assert watchdog.locate(stuck)["collective"] is None


def test_summary_puts_the_stuck_rank_first_and_lists_silent_ranks(tmp_path: Path) -> None:
    waiting = {"where": "train.py:90 train", "code": "x", "collective": "all_reduce"}
    infos = [
        {"rank": 0, "phase": "step 5", **waiting},
        {
            "rank": 1,
            "phase": "save at step 4",
            "where": "faults.py:40 f",
            "code": "y",
            "collective": None,
        },
        {"rank": 2, "phase": "step 5", **waiting},
    ]
    for info in infos:
        (tmp_path / f"rank{info['rank']}.json").write_text(json.dumps(info))
    assert watchdog.summarise(tmp_path, 4, settle_s=0.1) == (
        "rank 1 in faults.py:40 f (y) [save at step 4]; "
        "ranks 0, 2 waiting in all_reduce at train.py:90 train (x) [step 5]; "
        "rank 3 wrote no stacks (dead, or stuck outside Python)"
    )


def test_dump_shows_where_a_blocked_thread_is(tmp_path: Path) -> None:
    release = threading.Event()
    blocked = threading.Thread(target=release.wait, name="blocked")
    blocked.start()
    try:
        assert blocked.ident is not None
        opened = watchdog._Open("save", 7, time.monotonic(), blocked.ident)
        watchdog.dump_stacks(tmp_path, 3, opened)
    finally:
        release.set()
        blocked.join()
    info = json.loads((tmp_path / "rank3.json").read_text())
    assert info["rank"] == 3 and info["where"].startswith("threading.py:")
    text = (tmp_path / "rank3.txt").read_text()
    assert text.startswith("rank 3 on ") and ": save at step 7\n" in text
    assert "--- thread blocked (watched) ---" in text and "--- thread MainThread ---" in text


def test_injected_hang_matches_step_and_rank_once_per_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distft import faults

    monkeypatch.setenv(faults.ENV, "hang:5:1")
    faults.maybe_hang(4, 1, tmp_path)  # other step: returns
    faults.maybe_hang(5, 0, tmp_path)  # other rank: returns
    (tmp_path / ".fault-hang-step5-rank1").touch()  # hung once already (before a restart)
    faults.maybe_hang(5, 1, tmp_path)


HANG_ONE_RANK = """
import sys, time
from pathlib import Path
from distft import watchdog
from distft.config.sections import WatchdogConfig

cfg = WatchdogConfig(min_s=0.1, max_s=0.5)
with watchdog.watching(cfg, Path(sys.argv[1]), rank=0, world_size=1):
    with watchdog.phase("save", 3):
        time.sleep(30)
"""


def test_a_hung_process_dumps_summarises_and_exits(tmp_path: Path) -> None:
    """The thread itself, outside Ray: past max_s it writes the dump and the summary and
    ends the process with EXIT_HUNG."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", HANG_ONE_RANK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == watchdog.EXIT_HUNG, proc.stderr
    assert time.monotonic() - t0 < 25  # not the 30 s sleep
    summary = (tmp_path / "hang" / "step_00003" / "summary.txt").read_text()
    assert summary.startswith("hang at step 3 (phase save, "), summary
    assert "rank 0 in <string>:10 <module> [save at step 3]; stacks in " in summary
    assert f"error: {summary.strip()}" in proc.stderr


@pytest.mark.slow
def test_hung_rank_is_dumped_named_and_restarted(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny,
        out,
        checkpoint={"output_dir": str(out), "every_n_steps": 3},
        cluster={"num_workers": 2, "max_failures": 1},
        watchdog={"min_s": 4, "slow_factor": 2, "max_s": 120},
    )
    monkeypatch.setenv("DISTFT_FAULT", "hang:5:1")  # rank 1 sleeps in step 5, once
    t0 = time.monotonic()
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), timeout=600)
    console = proc.stdout + proc.stderr
    print(f"run took {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, console[-4000:]

    hang = out / "hang" / "step_00005"
    assert sorted(p.name for p in hang.glob("rank*.txt")) == ["rank0.txt", "rank1.txt"]
    stuck = (hang / "rank1.txt").read_text()
    assert re.search(r"faults\.py.*maybe_hang\n\s+time\.sleep\(3600\)", stuck), stuck
    summary = (hang / "summary.txt").read_text().strip()
    print(summary)
    assert summary.startswith("hang at step 5 (phase step, "), summary
    assert "rank 1 in faults.py:" in summary and "rank 0 waiting in " in summary, summary
    assert f"stacks in {hang}" in summary
    # the driver's restart line names the hang (rank 0's HangError) and the hang/ dir
    restart = [line for line in console.splitlines() if "restarting the workers (1 of 1)" in line]
    assert len(restart) == 1 and "HangError: hang at step 5" in restart[0], console[-4000:]
    assert f"stacks in {hang}" in restart[0]
    print(restart[0])

    assert re.findall(r"resumed from \S+ at step (\d+)", console) == ["3"], console[-4000:]
    steps = [row["step"] for row in read_metrics(out) if "train/loss" in row]
    assert sorted(set(steps)) == list(range(1, 9)) and steps.count(8) == 1
