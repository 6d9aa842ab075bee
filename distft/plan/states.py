"""Model states per rank: weights, gradients, fp32 master weights and AdamW moments, and
DeepSpeed's buffers, laid out the way DeepSpeed 0.19 lays them out for the ZeRO stage and
offload of the run's DeepSpeed config (`engine.build_ds_config`, the same dict training
uses).

Partitioning, as DeepSpeed does it (checked against real engines in tests/test_plan.py):
- ZeRO 0: no partitions; bf16/fp16 runs keep an fp32 master copy of every trainable
  parameter (`FP16_Optimizer`), fp32 runs none (the torch optimizer updates the params).
- ZeRO 1/2: each optimizer param group (decay: >= 2-D weights, no decay: the rest) is one
  flat 16-bit buffer padded to a multiple of 2 x world; a rank owns 1/world of it.
- ZeRO 3: every parameter is padded to a multiple of world and split; parameters of at
  most `stage3_param_persistence_threshold` elements also stay whole on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from distft import quant
from distft.plan.shape import ModelShape

FP32 = 4
ADAM_MOMENTS = 2  # exp_avg, exp_avg_sq, fp32 each


@dataclass(frozen=True)
class Partition:
    """Elements one rank owns (what the test compares with a real engine)."""

    weights: int  # 16-bit (or fp32) parameter elements held between steps
    master: int  # fp32 master weights (0 when the params are fp32 themselves, ZeRO 0)
    moments: int  # AdamW state elements (2 x the partition)
    grads: int  # gradient elements held between micro-steps


@dataclass(frozen=True)
class States:
    """Bytes per rank. `device`: on the accelerator; `host`: in CPU RAM (pinned)."""

    partition: Partition
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _bytes_of(ds: dict[str, Any]) -> int:
    if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled"):
        return 2
    return FP32


def _groups(shape: ModelShape) -> list[list[int]]:
    """The trainable params' sizes in `engine.param_groups` order: decay, then no decay."""
    decay = [p.numel for p in shape.params if p.trainable and p.ndim >= 2]
    no_decay = [p.numel for p in shape.params if p.trainable and p.ndim < 2]
    return [g for g in (decay, no_decay) if g]


def partition(shape: ModelShape, ds: dict[str, Any], world: int) -> Partition:
    """Elements of each model state on one rank."""
    zero = ds.get("zero_optimization", {})
    stage, e = int(zero.get("stage", 0)), _bytes_of(ds)
    frozen = shape.total - shape.trainable
    if stage == 0:
        nt = shape.trainable
        return Partition(shape.total, nt if e == 2 else 0, ADAM_MOMENTS * nt, nt)
    if stage in (1, 2):
        align = 2 * world  # nccl_start_alignment_factor x world
        padded = sum(math.ceil(sum(g) / align) * align for g in _groups(shape))
        owned = padded // world
        grads = padded if stage == 1 else owned  # ZeRO-1 keeps whole 16-bit grads
        return Partition(frozen + padded, owned, ADAM_MOMENTS * owned, grads)
    owned = sum(math.ceil(n / world) for g in _groups(shape) for n in g)
    frozen_owned = sum(math.ceil(p.numel / world) for p in shape.params if not p.trainable)
    master = owned if e == 2 else 0  # fp32 runs update the fp32 partitions in place
    return Partition(owned + frozen_owned, master, ADAM_MOMENTS * owned, owned)


def quantized_bytes(shape: ModelShape, bits: int, e: int) -> int:
    """Bytes of the frozen weights when the base model's linear layers are quantised to
    `bits` (QLoRA's 4-bit NF4: bits/8 per element plus one fp32 absmax per 64-element
    block); embeddings, the head, norms and trained params stay in `e` bytes."""
    total = 0
    for p in shape.params:
        linear = (
            not p.trainable
            and p.ndim >= 2
            and not any(k in p.name for k in ("embed", "lm_head", "wte", "wpe"))
        )
        if linear and bits == 4:  # bitsandbytes' NF4/FP4 with double quant, as distft.quant
            total += quant.quantized_bytes(p.numel)
        elif linear:
            total += p.numel * bits // 8 + FP32 * -(-p.numel // 64)
        else:
            total += e * p.numel
    return total


def states(
    shape: ModelShape,
    ds: dict[str, Any],
    world: int,
    quant_bits: int | None = None,
    gpu: bool = True,
) -> States:
    """Bytes per rank of every model state and DeepSpeed buffer, on device and host.
    `quant_bits`: the base model's linear layers quantised (QLoRA; under ZeRO-3 the
    packed storage is what is partitioned). `gpu`: GPU workers (ZeRO 0-2 load straight to
    the device there: `distft.model.placement`)."""
    zero = ds.get("zero_optimization", {})
    stage, e = int(zero.get("stage", 0)), _bytes_of(ds)
    part = partition(shape, ds, world)
    off_opt = zero.get("offload_optimizer", {}).get("device") == "cpu"
    off_param = zero.get("offload_param", {}).get("device") == "cpu"
    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    notes: list[str] = []
    weights = e * part.weights
    if stage == 3:
        threshold = int(zero.get("stage3_param_persistence_threshold", 100_000))
        persistent = sum(p.numel for p in shape.params if p.numel <= threshold)
        prefetch = int(zero.get("stage3_prefetch_bucket_size", 50_000_000))
        live = int(zero.get("stage3_max_live_parameters", 1_000_000_000))
        gathered = min(live, shape.largest_module() + prefetch)
        dev["weights (gathered layer + prefetch)"] = e * gathered
        dev["weights (persistent small params)"] = e * persistent
        if quant_bits is not None:  # the packed 4-bit storage is what ZeRO-3 partitions
            weights = -(-quantized_bytes(shape, quant_bits, e) // world)
        (host if off_param else dev)["weights (partition)"] = weights
    elif quant_bits is not None:
        dev[f"weights ({quant_bits}-bit base)"] = quantized_bytes(shape, quant_bits, e)
    else:
        dev["weights"] = weights
    opt = host if off_opt else dev
    opt["fp32 master weights"] = FP32 * part.master
    opt["AdamW moments"] = FP32 * part.moments
    if off_opt:  # the reduced partition is copied to pinned fp32 buffers on the host
        host["gradients (fp32 partition)"] = FP32 * (part.grads if stage != 1 else part.master)
        if stage == 1:
            dev["gradients"] = e * part.grads
    else:
        dev["gradients"] = e * part.grads
        # the optimizer step reads fp32 gradients of the partition (a transient copy;
        # ZeRO-3: one sub-group of `sub_group_size` elements at a time)
        step = (
            part.master if stage < 3 else min(part.master, int(zero.get("sub_group_size", 10**9)))
        )
        dev["fp32 gradients at step"] = FP32 * step
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        buckets = 2 if zero.get("overlap_comm", False) else 1
        dev["reduce buckets"] = buckets * e * int(zero.get("reduce_bucket_size", 500_000_000))
    elif stage == 3:
        dev["reduce bucket"] = e * int(zero.get("reduce_bucket_size", 500_000_000))
    if stage < 3 and not gpu:
        host["model load (whole model per rank)"] = e * shape.total
        notes.append(
            "ZeRO 0-2 CPU ranks load the whole model (page cache shared by a node's ranks)"
        )
    else:  # ZeRO-3 partitions as it loads; ZeRO 0-2 GPU ranks load straight to the GPU
        host["model load (largest module)"] = e * shape.largest_module()
    return States(
        part,
        {k: v for k, v in dev.items() if v},
        {k: v for k, v in host.items() if v},
        tuple(notes),
    )


def deepspeed_estimate(
    shape: ModelShape, ds: dict[str, Any], world: int, gpus_per_node: int = 8
) -> tuple[int, int] | None:
    """DeepSpeed's own estimate of model states (host bytes, device bytes per GPU), for
    full fine-tuning (it assumes every parameter trains) at ZeRO 2 and 3; None at 0/1."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    per_node = min(world, gpus_per_node)
    nodes = math.ceil(world / per_node)
    off_opt = zero.get("offload_optimizer", {}).get("device") == "cpu"
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.total,
            shape.largest_module(),
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=off_opt,
            cpu_offload_params=zero.get("offload_param", {}).get("device") == "cpu",
            zero_init=True,
        )
        return int(cpu), int(gpu)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.total, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=off_opt
        )
        return int(cpu), int(gpu)
    return None
