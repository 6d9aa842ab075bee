"""The only place that reads rank/world and initialises distributed communication."""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp_size: int = 1  # ranks that split each sequence (deepspeed.sequence_parallel_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # Sequence parallelism: consecutive ranks [g*sp, (g+1)*sp) form sequence-parallel group
    # g (DeepSpeed's parallel_state_sp builds the same groups); group g is data-parallel
    # rank g and reads one share of the data, each of its ranks one slice of every sequence.
    @property
    def dp_world_size(self) -> int:
        """Data-parallel ranks: the groups that read distinct batches."""
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's slice of each sequence."""
        return self.rank % self.sp_size

    def data_view(self) -> DistContext:
        """The context the data layout sees: one rank per data-parallel group (with
        sequence parallelism off, this context itself)."""
        if self.sp_size == 1:
            return self
        return DistContext(self.dp_rank, self.dp_world_size, self.local_rank, self.device)

    def log(self, message: str) -> None:
        """One line on rank 0's stdout, nothing elsewhere. Written to the stream directly:
        Ray Train's patched `print` would emit it twice when stdout is wrapped."""
        if self.is_main:
            sys.stdout.write(f"[distft] {message}\n")
            sys.stdout.flush()

    def barrier(self) -> None:
        if tdist.is_initialized():
            tdist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """All-reduce (sum) a few scalars across ranks in one collective, in float64, and
        wait for it (`sum_later`, read at once)."""
        t = self.on_device(values)
        return self.sum_later(t, t.new_zeros(0)).result()[0]

    def sum_later(self, summed: torch.Tensor, kept: torch.Tensor) -> PendingSum:
        """Start an all-reduce (sum) of `summed` and read it, with `kept` (this rank's own
        values, not reduced), when `PendingSum.result` is called: neither the collective
        nor the copy to the host makes the caller wait now. Both are 1-D on the device."""
        reduce = tdist.is_initialized() and self.world_size > 1
        summed, kept = summed.to(torch.float64, copy=True), kept.to(torch.float64, copy=True)
        return PendingSum(summed, kept, reduce)  # copies: the caller may reuse its tensors

    def on_device(self, values: list[float]) -> torch.Tensor:
        """Host floats as a float64 tensor on the device, copied without waiting for the
        device (pinned memory, non-blocking) on a GPU."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)


class PendingSum:
    """An all-reduce (sum) in flight and its values once read (`DistContext.sum_later`).

    The training loop reads a step's scalars (loss, metric sums, the vote to stop) one step
    later, so no step ends in a wait: on CPU, gloo runs the collective on its own thread
    while the next step computes, and the ranks do not meet in lockstep once more per step;
    on a GPU, NCCL's collective and the copy to pinned host memory are queued on the stream
    behind the step and an event marks them: reading them waits for that step alone, not
    for the kernels queued after it. `result` may be called from any
    thread, any number of times."""

    def __init__(self, summed: torch.Tensor, kept: torch.Tensor, reduce: bool):
        self._n = summed.numel()
        self._work = (
            tdist.all_reduce(summed, op=tdist.ReduceOp.SUM, async_op=True) if reduce else None
        )
        self._both: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._parts = (summed, kept)
        if summed.device.type == "cuda":
            if self._work is not None:
                self._work.wait()  # NCCL: the current stream waits for it, the host does not
                self._work = None
            self._both = torch.cat([summed, kept]).to("cpu", non_blocking=True)  # pinned
            self._event = torch.cuda.Event()
            self._event.record()
        self._values: list[float] | None = None
        self._lock = threading.Lock()

    def result(self) -> tuple[list[float], list[float]]:
        """(the sums over ranks, this rank's kept values); waits for them if need be."""
        with self._lock:
            if self._values is None:
                if self._event is not None and self._both is not None:
                    self._event.synchronize()
                    self._values = self._both.tolist()
                else:
                    if self._work is not None:
                        self._work.wait()
                    self._values = torch.cat(self._parts).tolist()
        return self._values[: self._n], self._values[self._n :]


def _prefer_own_ninja() -> None:
    """On CPU, DeepSpeed JIT-builds its shared-memory comm op with the `ninja` on PATH.
    Two ninja versions (this environment's and the system's) rewrite each other's build
    log and rebuild the op (~30 s) whenever they alternate; use this Python's own."""
    own = Path(sys.executable).parent
    if (own / "ninja").is_file():
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[0] != str(own):
            os.environ["PATH"] = f"{own}{os.pathsep}{path}"


def init(use_gpu: bool, sp_size: int = 1) -> DistContext:
    """Join the process group that Ray Train set up and hand it to DeepSpeed.

    Ray Train's TorchTrainer has already called `init_process_group` (gloo on CPU, nccl on
    GPU); DeepSpeed wraps that group instead of creating its own. The env vars are the
    ones DeepSpeed and transformers read.
    """
    import deepspeed
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    local_rank = ctx.get_local_rank()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
    )
    _prefer_own_ninja()
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(
        dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False, verbose=False
    )
    if world % sp_size:
        raise ValueError(
            f"deepspeed.sequence_parallel_size: {sp_size} does not divide the {world} ranks"
        )
    return DistContext(rank, world, local_rank, device, sp_size)
