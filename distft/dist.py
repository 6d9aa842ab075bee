"""The only place that reads rank/world and initialises distributed communication."""

from __future__ import annotations

import os
import sys
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
        """All-reduce (sum) a few scalars across ranks in one collective, in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if tdist.is_initialized() and self.world_size > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t.tolist()


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
