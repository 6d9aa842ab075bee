"""What every worker group does first, on every launch path: check that the output dir is
shared storage, and record the start (hosts, pids, restart count) in `launches.jsonl`.

Called from `distft.worker.run_worker` right after the process group is up, before any
data or model is loaded, so a multi-node run on node-local storage fails in seconds with
one line instead of at its first checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as tdist

from distft.dist import DistContext
from distft.errors import UserError

LAUNCHES = "launches.jsonl"
_VISIBLE_WITHIN_S = 10.0  # NFS-style attribute caches may hide a new file for a moment


class SharedStorageError(UserError):
    """The output dir is not the same directory on every node."""


def _gather(dist: DistContext, obj: Any) -> list[Any]:
    if dist.world_size == 1 or not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def _node_ip() -> str:
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except Exception:  # outside a Ray worker (unit use): the host name is enough
        return socket.gethostname()


def _sees(path: Path, expected: str) -> bool:
    deadline = time.monotonic() + _VISIBLE_WITHIN_S
    while True:
        try:
            if path.read_text() == expected:
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def check_shared_storage(output_dir: Path, dist: DistContext) -> list[dict[str, Any]]:
    """Every rank writes a rank-specific probe file, then reads rank 0's back and compares
    it with the token rank 0 sent over the network. Raises the same one-line
    SharedStorageError on every rank if any rank cannot see it. Returns each rank's
    {rank, host, node_ip, pid}."""
    me: dict[str, Any] = {
        "rank": dist.rank,
        "host": socket.gethostname(),
        "node_ip": _node_ip(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
    }
    workers = _gather(dist, me)
    token0 = workers[0]["token"]
    output_dir.mkdir(parents=True, exist_ok=True)
    mine = output_dir / f".probe-{token0}.rank{dist.rank}"
    mine.write_text(me["token"])
    dist.barrier()
    ok = _gather(dist, _sees(output_dir / f".probe-{token0}.rank0", token0))
    dist.barrier()
    mine.unlink(missing_ok=True)
    blind = [w for w, seen in zip(workers, ok, strict=True) if not seen]
    if blind:
        hosts = ", ".join(sorted({f"{w['host']} ({w['node_ip']})" for w in blind}))
        w0 = workers[0]
        raise SharedStorageError(
            f"checkpoint.output_dir: {output_dir} is not shared storage: workers on {hosts} "
            f"cannot see the file worker 0 on {w0['host']} ({w0['node_ip']}) wrote there; "
            "on a multi-node run every node must mount it at the same path"
        )
    return [{k: w[k] for k in ("rank", "host", "node_ip", "pid")} for w in workers]


def record_start(
    output_dir: Path, dist: DistContext, launch_id: str | None, workers: list[dict[str, Any]]
) -> int:
    """Rank 0 appends this worker group's start to `launches.jsonl`; returns how many
    times this launch (one `distft train` process) has restarted its workers so far."""
    path = output_dir / LAUNCHES
    restarts = 0
    if dist.is_main:
        if launch_id is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    restarts += json.loads(line).get("launch_id") == launch_id
                except ValueError:
                    continue  # a torn last line from a killed writer
        row = {
            "launch_id": launch_id,
            "restart": restarts,
            "time": time.time(),
            "world_size": dist.world_size,
            "workers": workers,
        }
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return int(_gather(dist, restarts)[0])


def preflight(output_dir: Path, dist: DistContext, launch_id: str | None) -> int:
    """Shared-storage check + start record; logs and returns the restart count."""
    workers = check_shared_storage(output_dir, dist)
    restarts = record_start(output_dir, dist, launch_id, workers)
    nodes = {w["node_ip"] for w in workers}
    where = f"{len(workers)} workers on {len(nodes)} node{'s' if len(nodes) > 1 else ''}"
    if restarts:
        dist.log(f"restart {restarts} of this launch after a worker failure ({where})")
    else:
        dist.log(f"workers up: {where}; all see the output dir")
    return restarts
