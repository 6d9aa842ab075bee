"""Hang watchdog: a daemon thread per rank that notices a step, eval or save that never
ends (a dead NIC, a stuck rank), dumps every rank's Python stacks and fails the worker
group so that the launcher restarts it from the newest checkpoint.

The loop and the worker mark their phases with `phase(name, step)` (or `begin`/`end`):
a time read and one assignment, no communication. The thread checks the open phase once
a second against its deadline (`Deadlines`). Past it, every rank's own thread (it runs
while the main thread is blocked in a collective or a sleep) writes
`<output_dir>/hang/step_<N>/rank<R>.txt` (all thread stacks) and `rank<R>.json` (where
the watched thread is). Rank 0 waits a moment for the other ranks' files, then prints
and writes `summary.txt`: which rank is stuck where and which ranks wait in a collective.
Each rank then hands a `HangError` to Ray Train (so the driver's message names the hang)
and, if the process is still alive a little later, exits with `EXIT_HUNG`.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distft.config.sections import WatchdogConfig

EXIT_HUNG = 86  # the process exit code of a rank whose watchdog ended it
MIN_MEASURED = 3  # steps timed before the step deadline follows their median
RECENT = 20  # step times the median is taken over
SETTLE_S = 10.0  # rank 0 waits this long for the other ranks' stack dumps
REQUEST = "request.json"  # in hang/: the first rank past a deadline asks the others to dump
EXIT_GRACE_S = 20.0  # after reporting to Ray, exit if the process is still alive

_PKG = str(Path(__file__).resolve().parent) + os.sep
_COMM = (f"torch{os.sep}distributed{os.sep}", f"deepspeed{os.sep}comm{os.sep}")


class HangError(RuntimeError):
    """A phase ran past its deadline; the message is the summary of where ranks were."""


@dataclass
class Deadlines:
    """How long a phase may take: a step max(min_s, slow_factor x median of the recent
    steps), capped at max_s (max_s until MIN_MEASURED steps are timed); eval and save
    max_s."""

    cfg: WatchdogConfig
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def record_step(self, seconds: float) -> None:
        self.recent.append(seconds)

    def limit(self, phase: str) -> float:
        times = list(self.recent)  # one C-level copy: safe against the main thread
        if phase != "step" or len(times) < MIN_MEASURED:
            return self.cfg.max_s
        return min(
            self.cfg.max_s, max(self.cfg.min_s, self.cfg.slow_factor * statistics.median(times))
        )


@dataclass(frozen=True)
class _Open:
    name: str
    step: int
    started: float
    thread: int


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, output_dir: Path, rank: int, world_size: int):
        self.deadlines = Deadlines(cfg)
        self.hang_root = Path(output_dir) / "hang"
        self.rank, self.world_size = rank, world_size
        self.poll_s = min(1.0, cfg.min_s / 4)
        self._open: _Open | None = None
        self._last: _Open | None = None  # the newest phase, for its thread when idle
        self._born = time.time()  # requests older than this are an earlier group's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distft-watchdog", daemon=True)

    # --- called by the loop and the worker: cheap ---------------------------------------
    def begin(self, name: str, step: int) -> None:
        self._open = self._last = _Open(name, step, time.monotonic(), threading.get_ident())

    def end(self) -> None:
        opened, self._open = self._open, None
        if opened is not None and opened.name == "step":
            self.deadlines.record_step(time.monotonic() - opened.started)

    # --- the thread ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        """Once per poll: this rank's open phase against its deadline, then whether
        another rank has asked for stacks (one small file read)."""
        while not self._stop.wait(self.poll_s):
            opened = self._open
            if opened is not None:
                elapsed, limit = (
                    time.monotonic() - opened.started,
                    self.deadlines.limit(opened.name),
                )
                if elapsed > limit:
                    late = f"{elapsed:.1f} s > limit {limit:.1f} s"
                    head = f"hang at step {opened.step} (phase {opened.name}, {late})"
                    where = self.hang_root / f"step_{opened.step:05d}"
                    self._ask_all(head, where)
                    self._on_hang(head, where)
                    return
            asked = self._asked()
            if asked is not None:
                self._on_hang(*asked)
                return

    def _ask_all(self, head: str, where: Path) -> None:
        """Ask every rank for its stacks, whatever its own deadline (a rank stuck in a
        save waits for max_s while the others' steps time out sooner)."""
        request = {"head": head, "dir": where.name, "rank": self.rank, "time": time.time()}
        try:
            self.hang_root.mkdir(parents=True, exist_ok=True)
            tmp = self.hang_root / f".{REQUEST}.rank{self.rank}"
            tmp.write_text(json.dumps(request))
            os.replace(tmp, self.hang_root / REQUEST)
        except OSError:
            pass  # the dump below reports the broken storage

    def _asked(self) -> tuple[str, Path] | None:
        try:
            request = json.loads((self.hang_root / REQUEST).read_text())
        except (OSError, ValueError):
            return None
        if request["time"] < self._born:
            return None
        return request["head"], self.hang_root / request["dir"]

    def _on_hang(self, head: str, where: Path) -> None:
        """Dump, summarise (rank 0), fail the worker group, end this process."""
        try:
            message = self._dump(head, where)
        except Exception as e:  # e.g. the output dir is gone: still fail the group
            message = f"{head} on rank {self.rank}; writing its stacks failed: {e}"
        sys.stderr.write(f"[distft] error: {message}\n")
        sys.stderr.flush()
        ray_errors = _ray_exception_queue()
        if ray_errors is not None:
            ray_errors.put(_ray_error(HangError(message)))
            time.sleep(EXIT_GRACE_S)  # Ray Train fails the group and ends this process
        os._exit(EXIT_HUNG)

    def _dump(self, head: str, where: Path) -> str:
        dump_stacks(where, self.rank, self._open or self._last)
        if self.rank != 0:
            time.sleep(SETTLE_S + 2)  # let rank 0 read every dump and report first
            return f"{head} on rank {self.rank}; stacks in {where}"
        message = f"{head}: {summarise(where, self.world_size, SETTLE_S)}; stacks in {where}"
        (where / "summary.txt").write_text(message + "\n")
        return message


# --- the process-wide hooks --------------------------------------------------------------
_active: Watchdog | None = None


def begin(name: str, step: int) -> None:
    if _active is not None:
        _active.begin(name, step)


def end() -> None:
    if _active is not None:
        _active.end()


@contextmanager
def phase(name: str, step: int) -> Iterator[None]:
    begin(name, step)
    try:
        yield
    finally:
        end()


@contextmanager
def watching(cfg: WatchdogConfig, output_dir: Path, rank: int, world_size: int) -> Iterator[None]:
    """Run a watchdog for this rank while the block runs (nothing when disabled)."""
    global _active
    if not cfg.enabled:
        yield
        return
    dog = Watchdog(cfg, output_dir, rank, world_size)
    dog.start()
    _active = dog
    try:
        yield
    finally:
        _active = None
        dog.stop()


# --- stacks and the summary --------------------------------------------------------------
def locate(frames: list[traceback.FrameSummary]) -> dict[str, Any]:
    """The innermost distft frame of a stack (outermost first) and the collective it waits
    in, if any (the innermost torch.distributed / deepspeed.comm frame below it)."""
    ours = [i for i, f in enumerate(frames) if f.filename.startswith(_PKG)]
    own = frames[ours[-1]] if ours else (frames[-1] if frames else None)
    below = frames[ours[-1] + 1 :] if ours else frames
    comm = [f for f in below if any(c in f.filename for c in _COMM)]
    return {
        "where": f"{Path(own.filename).name}:{own.lineno} {own.name}" if own else "?",
        "code": (own.line or "").strip()[:80] if own else "",
        "collective": comm[-1].name if comm else None,
    }


def dump_stacks(where: Path, rank: int, opened: _Open | None) -> None:
    """Write this rank's stacks (every thread) and where its watched thread is."""
    where.mkdir(parents=True, exist_ok=True)
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    thread = opened.thread if opened else None
    watched = traceback.extract_stack(frames[thread]) if thread in frames else []
    phase = _phase_text(opened)
    info = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "phase": phase}
    info.update(locate(watched))
    lines = [f"rank {rank} on {info['host']} pid {info['pid']}: {phase}"]
    for ident, frame in sorted(frames.items(), key=lambda item: item[0] != thread):
        mark = " (watched)" if ident == thread else ""
        lines.append(f"\n--- thread {names.get(ident, ident)}{mark} ---")
        lines.extend(s.rstrip("\n") for s in traceback.format_stack(frame))
    (where / f"rank{rank}.txt").write_text("\n".join(lines) + "\n")
    (where / f"rank{rank}.json").write_text(json.dumps(info))


def _phase_text(opened: _Open | None) -> str:
    if opened is None:
        return "before its first phase"
    return (
        f"step {opened.step}" if opened.name == "step" else f"{opened.name} at step {opened.step}"
    )


def summarise(where: Path, world_size: int, settle_s: float) -> str:
    """Wait up to settle_s for every rank's dump, then one clause per location and phase:
    ranks outside a collective (the stuck ones) first, then those waiting in one."""
    deadline = time.monotonic() + settle_s
    while len(list(where.glob("rank*.json"))) < world_size and time.monotonic() < deadline:
        time.sleep(0.2)
    groups: dict[tuple[str, str], list[int]] = {}
    seen = set()
    for path in where.glob("rank*.json"):
        info = json.loads(path.read_text())
        seen.add(info["rank"])
        at = f"{info['where']} ({info['code']})" if info["code"] else info["where"]
        at += f" [{info['phase']}]"
        text = f"waiting in {info['collective']} at {at}" if info["collective"] else f"in {at}"
        groups.setdefault((str(bool(info["collective"])), text), []).append(info["rank"])
    missing = sorted(set(range(world_size)) - seen)
    clauses = [f"{_ranks(r)} {text}" for (_, text), r in sorted(groups.items())]
    if missing:
        clauses.append(f"{_ranks(missing)} wrote no stacks (dead, or stuck outside Python)")
    return "; ".join(clauses)


def _ranks(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


# --- Ray Train ---------------------------------------------------------------------------
def _ray_exception_queue() -> Any:
    """Ray Train's queue for errors raised in threads other than the training thread (its
    own background uploads use it); None outside a Ray Train worker."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().execution_context.training_thread_runner.get_exception_queue()
    except (ImportError, AttributeError, RuntimeError):  # no Ray Train v2 / another layout /
        return None  # not in a worker (RuntimeError: "TrainContext has not been initialized")


def _ray_error(error: HangError) -> Any:
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return UserExceptionWithTraceback(error, traceback_str=f"HangError: {error}")
