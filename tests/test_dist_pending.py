"""`DistContext.sum_later`: the loop's per-step all-reduce, started at a step's end and read
one step later (`distft.train.StepRow`). Real gloo process group, two processes."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from distft.dist import DistContext


def _rank(rank: int, port: int, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist = DistContext(rank, 2, rank, torch.device("cpu"))
    own = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float32)
    norm = torch.tensor([0.5 + rank])
    pending = dist.sum_later(own, norm)
    own.fill_(100.0)  # the caller may reuse its tensors at once (the next step's sums)
    norm.fill_(100.0)
    # other collectives run while it is in flight (eval, a checkpoint's agreement, the
    # next step's gradient reduce); the ranks issue them in the same order
    during = dist.sum([float(rank)])
    results: list[tuple[list[float], list[float]]] = []
    reader = threading.Thread(target=lambda: results.append(pending.result()))
    reader.start()  # the logger's thread reads the row ...
    mine = pending.result()  # ... and the loop the vote, in either order
    reader.join()
    torch.save({"during": during, "mine": mine, "thread": results[0]}, f"{out}/rank{rank}.pt")
    tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sum_later_sums_over_ranks_and_keeps_own_values(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # small integers and halves: every sum is exact in float64, so == is right
        assert got["during"] == [1.0]
        assert got["mine"] == ([3.0, 10.0], [0.5 + rank])
        assert got["thread"] == got["mine"]


def test_sum_later_on_one_process_returns_its_values() -> None:
    dist = DistContext(0, 1, 0, torch.device("cpu"))  # no process group: nothing to reduce
    pending = dist.sum_later(torch.tensor([1.5, 2.0]), torch.zeros(0))
    assert pending.result() == ([1.5, 2.0], [])
    assert dist.on_device([1.0, 3.0]).dtype == torch.float64
    assert dist.sum([1.0, 3.0]) == [1.0, 3.0]  # float64 round trip of small floats: exact
