"""Preemption: stop at a step boundary with a committed checkpoint, then exit 75.

The driver (`distft train`) turns SIGTERM/SIGINT into a flag file in the output dir
(shared storage on multi-node runs). Each rank checks the flag after every optimizer
step and the ranks agree in the step's all-reduce (read one step later, `distft.train`),
so all of them stop at the same step, save, and return. The driver then exits with
EXIT_PREEMPTED; `launch/slurm` requeues on that code, and the restarted run resumes from
the checkpoint exactly.

A Ray node drain (spot preemption: `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`)
is the same stop without a signal: each rank also votes to stop once Ray announces a drain
of a node of its worker group (`drain_announced`); a rank that saw it writes the flag with
"ray drain: ..." after the checkpoint, and the Ray launcher starts a new worker group (Ray
schedules nothing new on a draining node) instead of exiting 75.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again
FLAG = "PREEMPT"
DRAIN = "ray drain: "  # the flag's text when a Ray node drain stopped the run


def requested(output_dir: Path) -> bool:
    return (output_dir / FLAG).exists()


def clear(output_dir: Path) -> None:
    (output_dir / FLAG).unlink(missing_ok=True)


def drain_announced() -> str | None:
    """Why this Ray Train worker should stop, if Ray announced a drain of a node of its
    worker group; else None. Cheap enough for every step: no barrier, no RPC until a drain.

    Ray Train (>= 2.60) polls Ray Core's draining nodes every 5 s (its PreemptionWatcher)
    and stores a `PreemptionInfo` on every worker of the group (`mark_preempt`). The
    public `ray.train.get_preemption_info()` is a barrier across the workers, so this reads
    the worker's own copy through Ray's private training context instead. Private API:
    any other layout (another Ray version, a non-Ray launch) reads as "no drain"."""
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is None:  # not in a Ray Train v2 worker: never imports Ray
        return None
    try:
        info = context.get_train_context().preemption_context.preemption_info
        nodes = list(info.preempted_node_to_ranks) if info is not None else []
        deadline_ms = info.deadline_ms if info is not None else None
    except (AttributeError, RuntimeError):  # another layout; no context in this process
        return None
    if not nodes:
        return None
    when = (
        f"deadline in {max(0.0, deadline_ms / 1000 - time.time()):.0f} s"
        if deadline_ms
        else "no deadline"
    )
    return f"{_describe_nodes(nodes)} {'is' if len(nodes) == 1 else 'are'} being drained ({when})"


def _describe_nodes(node_ids: list[str]) -> str:
    """The nodes by address and short id, e.g. `node 10.0.0.7 (1a2b3c4d)`; the id alone
    where Ray cannot say the address."""
    ips: dict[str, str] = {}
    with contextlib.suppress(ImportError):
        import ray
        from ray.exceptions import RayError

        with contextlib.suppress(RayError, RuntimeError, OSError):  # GCS unreachable
            ips = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()}
    names = [f"{ips[n]} ({n[:8]})" if ips.get(n) else n[:8] for n in sorted(node_ids)]
    return ("node " if len(names) == 1 else "nodes ") + ", ".join(names)


def note_drain(output_dir: Path, text: str) -> None:
    """Record that a Ray drain stopped the run (`text`: which node, the step), unless the
    flag is already there (a signal to the driver takes precedence)."""
    try:
        with (output_dir / FLAG).open("x") as f:
            f.write(f"{DRAIN}{text}\n")
    except FileExistsError:
        pass


def drain_reason(output_dir: Path) -> str | None:
    """The flag's text after "ray drain: " when a Ray node drain stopped the run."""
    try:
        text = (output_dir / FLAG).read_text()
    except OSError:
        return None
    return text[len(DRAIN) :].strip() if text.startswith(DRAIN) else None


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
