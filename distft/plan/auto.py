"""`batch.micro_batch_size: auto`: the largest micro batch (a power of two, at most 64)
whose plan fits the memory of one worker's device, resolved on the driver before Ray
starts, so config.yaml and the workers see a number."""

from __future__ import annotations

import os

from distft.config import Config
from distft.errors import UserError
from distft.plan import Plan, make_plan
from distft.plan.shape import ModelShape

MAX_AUTO = 64
_GIB = 2**30


def with_micro(cfg: Config, micro: int) -> Config:
    return cfg.model_copy(
        update={"batch": cfg.batch.model_copy(update={"micro_batch_size": micro})}
    )


def worker_memory(cfg: Config) -> int | None:
    """Bytes of one worker's device: the GPU of this node (the driver's GPU 0: the
    workers' model on a uniform cluster), or for CPU workers this host's RAM shared by
    the workers; None for GPU workers seen from a node without a GPU."""
    if cfg.cluster.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(0).total_memory)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // cfg.cluster.num_workers)


def choose_micro_batch(
    cfg: Config, memory: int, shape: ModelShape | None = None
) -> tuple[int, Plan]:
    """The largest power of two <= MAX_AUTO whose plan's device total fits `memory`."""
    best: tuple[int, Plan] | None = None
    micro = 1
    while micro <= MAX_AUTO:
        plan = make_plan(with_micro(cfg, micro), shape)
        shape = plan.shape
        if not plan.fits(memory, None):
            break
        best, micro = (micro, plan), micro * 2
    if best is None:
        raise UserError(
            f"batch.micro_batch_size: auto: not even 1 sequence of {cfg.data.max_seq_len} "
            f"tokens fits {memory / _GIB:.2f} GiB per worker (`distft plan CONFIG "
            f"--gpu-memory ...` proposes a change)"
        )
    return best


def resolve_auto(cfg: Config, memory: int | None = None) -> tuple[Config, str | None]:
    """`cfg` with a number for an `auto` micro batch, and the line that says so."""
    if cfg.batch.micro_batch_size != "auto":
        return cfg, None
    memory = memory if memory is not None else worker_memory(cfg)
    if memory is None:
        raise UserError(
            "batch.micro_batch_size: auto needs the workers' GPU memory and this node has "
            "no GPU; set a number (`distft plan CONFIG --gpu-memory 80GiB` shows what fits)"
        )
    micro, plan = choose_micro_batch(cfg, memory)
    line = (
        f"batch.micro_batch_size: auto -> {micro} ({plan.device_total / _GIB:.2f} of "
        f"{memory / _GIB:.2f} GiB per worker)"
    )
    return with_micro(cfg, micro), line
