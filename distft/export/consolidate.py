"""Read the weights of a DeepSpeed checkpoint tensor by tensor, with bounded memory.

DeepSpeed's `zero_to_fp32` knows the layouts but holds too much at once: it `torch.load`s
the model-state files whole (under ZeRO-1/2 `mp_rank_00` holds the entire module) and
concatenates every rank's fp32 partition of a ZeRO-1/2 group into one full-model vector.
Its pseudo-tensors for ZeRO-3 stay lazy, but all shards stay memory-mapped to the end, so
the pages it touched add up to the whole model in the process's resident memory.

Here the layout is read once into a *plan*: for every output tensor, the fragments of
which files (and which slice of which flat tensor) make it up. The files are memory-mapped
(`torch.load(mmap=True)`) only while one batch of tensors is materialized and are
released after it, so peak memory is about one output shard plus the input pages that
shard touched. The fp32 master weights come from the optimizer-state shards:

* ZeRO-1/2: each param group is one flat vector, cut into equal partitions, one per rank
  (`single_partition_of_fp32_groups`); a parameter sits at a running offset in the
  concatenation (plus DeepSpeed's per-parameter alignment padding).
* ZeRO-3: every parameter is split into `ceil(numel / world)` elements per rank, at the
  same offset of each rank's flat partition (`fp32_flat_groups`); the last one is padded.
* Stage 0 (no ZeRO): the module state in `mp_rank_00_model_states.pt` (training dtype).

DeepSpeed files are opened after the checkpoint manifest was verified, and unpickled with
torch's restricted (`weights_only`) loader.
"""

from __future__ import annotations

import gc
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import (
    BUFFER_NAMES,
    FP32_FLAT_GROUPS,
    FROZEN_PARAM_SHAPES,
    OPTIMIZER_STATE_DICT,
    PARAM_ALIGNMENT_PADDINGS,
    PARAM_SHAPES,
    PARTITION_COUNT,
    SINGLE_PARTITION_OF_FP32_GROUPS,
    ZERO_STAGE,
)
from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

from distft.errors import UserError
from distft.safeload import deepspeed_pickled_classes

Key = tuple[str | int, ...]


class ConsolidationError(UserError):
    """A checkpoint whose DeepSpeed files do not add up (missing shards, bad layout)."""


@dataclass(frozen=True)
class Fragment:
    file: int  # index into Layout.files
    key: Key  # path to a tensor inside that file
    start: int  # element offset in the flattened tensor
    numel: int


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the stored data (fp32 masters, or the module's dtype)
    fragments: tuple[Fragment, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: torch.dtype) -> int:
        return self.numel * (dtype if self.dtype.is_floating_point else self.dtype).itemsize


@dataclass(frozen=True)
class Layout:
    ckpt: Path
    stage: int
    world_size: int
    files: tuple[Path, ...]
    tensors: tuple[TensorPlan, ...]  # module order; tied aliases left out
    tied: dict[str, str]  # alias -> the name it shares storage with


def _load(path: Path) -> dict[str, Any]:
    """Memory-mapped, unpickling nothing but tensors, containers and DeepSpeed's plain
    state classes (as `distft.checkpoint` loads for a resume)."""
    with torch.serialization.safe_globals(deepspeed_pickled_classes()):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConsolidationError(f"{path}: refused to unpickle ({first})") from None


def check_pickles(ckpt: Path) -> None:
    """Every DeepSpeed file of `ckpt` unpickles with the restricted loader, so a reader
    that unpickles without restrictions (DeepSpeed's own) can only get the same objects."""
    for path in sorted(ckpt.glob("*.pt")):
        _load(path)  # mapped, not read; released right away


def _files(ckpt: Path, suffix: str) -> list[Path]:
    def rank_key(p: Path) -> list[int | str]:
        return [int(t) if t.isdigit() else t for t in p.name.replace("_", " ").split()]

    return sorted(ckpt.glob(f"*{suffix}"), key=rank_key)


def read_layout(ckpt: Path, trainable_only: bool = False) -> Layout:
    """The plan for every tensor of `ckpt`. `trainable_only`: the parameters the
    optimizer trained (LoRA adapters) without frozen weights or buffers."""
    model_files = _files(ckpt, "_model_states.pt")
    if not model_files:
        raise ConsolidationError(f"{ckpt}: no DeepSpeed *_model_states.pt files")
    meta = _load(model_files[0])
    try:
        optim_files = _files(ckpt, "_optim_states.pt")
        stage, world, groups, paddings = 0, 1, [], None
        if optim_files:
            osd = _load(optim_files[0])[OPTIMIZER_STATE_DICT]
            if ZERO_STAGE in osd:
                stage = int(osd[ZERO_STAGE])
                count = osd[PARTITION_COUNT]
                world = max(count) if isinstance(count, list) else int(count)
                groups = [_group_sizes(f, stage) for f in optim_files]
                paddings = osd.get(PARAM_ALIGNMENT_PADDINGS)
            del osd
        if stage and len(optim_files) != world:
            raise ConsolidationError(
                f"{ckpt}: {len(optim_files)} optimizer shards for a world size of {world}"
            )
        files = [model_files[0], *optim_files] if stage else [model_files[0]]
        if stage == 0:
            plans = _module_plans(meta, trainable_only)
        else:
            shapes = meta[PARAM_SHAPES]
            if stage <= 2:
                plans = _zero2_plans(ckpt, shapes, groups, world, paddings)
            else:
                plans = _zero3_plans(ckpt, shapes, groups, world)
            if not trainable_only:
                if meta.get(FROZEN_PARAM_SHAPES):
                    raise ConsolidationError(
                        f"{ckpt}: frozen parameters in a full fine-tune are not supported"
                    )
                plans = _buffer_plans(meta) + plans
        tied = dict(meta.get("shared_params") or {})  # None under stage 0
        plans = [p for p in plans if p.name not in tied]
        return Layout(ckpt, stage, world, tuple(files), tuple(plans), tied)
    finally:
        del meta
        gc.collect()


def _group_sizes(path: Path, stage: int) -> list[tuple[int, torch.dtype]]:
    osd = _load(path)[OPTIMIZER_STATE_DICT]
    key = SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else FP32_FLAT_GROUPS
    return [(t.numel(), t.dtype) for t in osd[key]]


def _groups_key(stage: int) -> Key:
    return (
        OPTIMIZER_STATE_DICT,
        SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else FP32_FLAT_GROUPS,
    )


def _module_plans(meta: dict[str, Any], trainable_only: bool) -> list[TensorPlan]:
    """Stage 0: the module state itself (file 0)."""
    if trainable_only:
        raise ConsolidationError("LoRA export from a ZeRO stage 0 checkpoint is not supported")
    module = meta["module"]
    return [_whole(name, t) for name, t in module.items()]


def _whole(name: str, t: torch.Tensor) -> TensorPlan:
    return TensorPlan(name, tuple(t.shape), t.dtype, (Fragment(0, ("module", name), 0, t.numel()),))


def _buffer_plans(meta: dict[str, Any]) -> list[TensorPlan]:
    module = meta["module"]
    return [_whole(n, module[n]) for n in meta.get(BUFFER_NAMES, []) if n in module]


def _zero2_plans(
    ckpt: Path,
    param_shapes: list[dict[str, Any]],
    groups: list[list[tuple[int, torch.dtype]]],
    world: int,
    paddings: list[list[int]] | None,
) -> list[TensorPlan]:
    """Group g is the concatenation of every rank's equal-size partition g (file 1 + rank)."""
    plans = []
    key = _groups_key(2)
    for g, shapes in enumerate(param_shapes):
        part, dtype = groups[0][g]
        if any(sizes[g][0] != part for sizes in groups):
            raise ConsolidationError(f"{ckpt}: ZeRO partitions of group {g} differ in size")
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            frags, pos, left = [], offset, numel
            while left:
                rank, local = divmod(pos, part)
                take = min(left, part - local)
                frags.append(Fragment(1 + rank, (*key, g), local, take))
                pos, left = pos + take, left - take
            plans.append(TensorPlan(name, tuple(shape), dtype, tuple(frags)))
            offset += numel + (paddings[g][i] if paddings else 0)
        align = 2 * world  # DeepSpeed pads each group to a multiple of 2 * world
        if math.ceil(offset / align) * align != math.ceil(part * world / align) * align:
            raise ConsolidationError(
                f"{ckpt}: group {g} holds {part * world} elements, its parameters {offset}"
            )
    return plans


def _zero3_plans(
    ckpt: Path,
    param_shapes: list[dict[str, Any]],
    groups: list[list[tuple[int, torch.dtype]]],
    world: int,
) -> list[TensorPlan]:
    """Each rank holds ceil(numel / world) elements of every parameter at the same offset
    of its flat partition (the concatenation of its sub-groups)."""
    sizes = [n for n, _ in groups[0]]
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    dtype = groups[0][0][1]
    key = _groups_key(3)
    plans, offset = [], 0
    for name, shape in ((n, s) for d in param_shapes for n, s in d.items()):
        numel = math.prod(shape)
        per_rank, _ = zero3_partitioned_param_info(numel, world)
        frags = []
        for rank in range(world):
            pos, left = offset, per_rank
            while left:
                g = max(i for i, s in enumerate(starts) if s <= pos)
                local = pos - starts[g]
                take = min(left, sizes[g] - local)
                frags.append(Fragment(1 + rank, (*key, g), local, take))
                pos, left = pos + take, left - take
        plans.append(TensorPlan(name, tuple(shape), dtype, tuple(frags)))
        offset += per_rank
    if offset != sum(sizes):
        raise ConsolidationError(
            f"{ckpt}: ZeRO-3 partitions hold {sum(sizes)} elements, its parameters {offset}"
        )
    return plans


def materialize(
    layout: Layout, plans: list[TensorPlan], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Full tensors for `plans` (floating point ones cast to `dtype`), owning their memory.
    The files are mapped only for the duration of this call. (No autograd: the fp32
    partitions are saved as parameters, and a graph from a copy back to its source would
    keep the whole mapped file alive as long as the copy.)"""
    opened = {
        i: _load(layout.files[i]) for i in sorted({f.file for p in plans for f in p.fragments})
    }
    try:
        out = {}
        with torch.no_grad():
            for p in plans:  # fragments in order; ZeRO-3 pads the last rank's one
                full = torch.empty(p.numel, dtype=dtype if p.dtype.is_floating_point else p.dtype)
                pos = 0
                for f in p.fragments:
                    take = min(f.numel, p.numel - pos)
                    src = _flat(opened[f.file], f.key)[f.start : f.start + take]
                    full[pos : pos + take].copy_(src)
                    pos += take
                out[p.name] = full.view(p.shape)
        return out
    finally:
        del opened
        gc.collect()


def _flat(obj: Any, key: Key) -> torch.Tensor:
    for k in key:
        obj = obj[k]
    return obj.detach().reshape(-1)


def out_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating point tensors are written in `dtype`; integer buffers keep theirs."""
    return dtype if t.is_floating_point() else t.dtype


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy, order-keeping split of tensors (by byte size) into shards of at most
    `max_bytes` (a single larger tensor gets a shard of its own)."""
    shards: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, size in enumerate(sizes):
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        shards.append(current)
    return shards


def iter_shards(
    layout: Layout, dtype: torch.dtype, max_bytes: int
) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """(number of shards, iterator over each shard's tensors), one shard in memory."""
    plans = list(layout.tensors)
    groups = plan_shards([p.nbytes(dtype) for p in plans], max_bytes)

    def gen() -> Iterator[dict[str, torch.Tensor]]:
        for idx in groups:
            yield materialize(layout, [plans[i] for i in idx], dtype)

    return len(groups), gen()
