"""DeepSpeed engine: the DeepSpeed config from one pure function, then `deepspeed.initialize`.

`build_ds_config` turns the typed `Config` into the dict DeepSpeed reads and deep-merges the
user's raw `deepspeed.ds_config` on top, reporting which keys the user's dict won.
`create_engine` builds the optimizer (unless the config names one, which it does for ZeRO
CPU offload so DeepSpeed picks DeepSpeedCPUAdam), the lr schedule and the engine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from distft.config import Config, OptimConfig, Precision

# We log ourselves; DeepSpeed's own progress print would fire every this-many steps.
_NEVER_PRINT = 2**31 - 1

_BUCKET_SIZE = 500_000_000  # reduce/allgather bucket, elements (DeepSpeed's default)
_STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
_STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000  # params smaller than this stay unpartitioned
_STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000


def build_ds_config(cfg: Config, world_size: int) -> tuple[dict[str, Any], list[str]]:
    """Pure: the DeepSpeed config dict for this run, and the dotted keys that the user's
    raw cfg.deepspeed.ds_config overrode (deep-merged on top of the generated dict).
    `world_size`: the data-parallel ranks (all ranks / deepspeed.sequence_parallel_size),
    the size DeepSpeed checks `train_batch_size` against."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    ds, batch, optim = cfg.deepspeed, cfg.batch, cfg.optim
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch.micro,
        "gradient_accumulation_steps": batch.grad_accum,
        "train_batch_size": batch.micro * batch.grad_accum * world_size,
        "gradient_clipping": 0.0 if optim.max_grad_norm is None else optim.max_grad_norm,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
        # Only consulted when ZeRO offloads the optimizer and we pass our own (torch) one,
        # e.g. because a raw ds_config turned offload on: allow it rather than refuse.
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": _zero_section(cfg),
    }
    if ds.precision == Precision.bf16:
        generated["bf16"] = {"enabled": True}
    elif ds.precision == Precision.fp16:
        # loss_scale 0 = dynamic loss scaling, starting at 2**16.
        generated["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if ds.offload_optimizer == "cpu":
        # Named in the config so DeepSpeed builds DeepSpeedCPUAdam for the offloaded states.
        generated["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    return _deep_merge(generated, ds.ds_config)


def _zero_section(cfg: Config) -> dict[str, Any]:
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 0:
        return zero
    zero.update(
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_bucket_size=_BUCKET_SIZE,
        allgather_bucket_size=_BUCKET_SIZE,
    )
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        if ds.offload_param == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero.update(
            stage3_prefetch_bucket_size=_STAGE3_PREFETCH_BUCKET_SIZE,
            stage3_param_persistence_threshold=_STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=_STAGE3_MAX_LIVE_PARAMETERS,
            # Export gathers the weights itself; DeepSpeed's gather would be a second copy.
            stage3_gather_16bit_weights_on_model_save=False,
        )
    return zero


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Merge `override` into a deep copy of `base`: dicts merge, anything else replaces.

    Returns the merged dict and the sorted dotted keys where the override changed a value
    or added one (a key set to the value it already had is not reported).
    """
    merged = copy.deepcopy(base)
    changed: list[str] = []
    _merge_into(merged, override, "", changed)
    return merged, sorted(changed)


def _merge_into(dst: dict[str, Any], src: dict[str, Any], prefix: str, changed: list[str]) -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(dst.get(key), dict):
                if key in dst or not value:  # a non-dict replaced, or an empty section added
                    changed.append(dotted)
                dst[key] = {}
            _merge_into(dst[key], value, f"{dotted}.", changed)
        else:
            if key not in dst or dst[key] != value:
                changed.append(dotted)
            dst[key] = copy.deepcopy(value)


# ----------------------------------------------------------------------------- schedule


def lr_lambda(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Multiplier of `optim.lr` after `step` optimizer steps (what LambdaLR expects).

    Same shape as transformers.get_scheduler: linear warmup from 0 over `warmup_steps`,
    then cosine or linear decay to `min_lr_ratio` at `total_steps` (held there after),
    or constant 1.0.
    """
    if step < optim.warmup_steps:
        return step / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape


def make_lr_scheduler(
    optim: OptimConfig, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A callable DeepSpeed calls with its basic optimizer; it steps the result per
    optimizer step and saves it in its checkpoints."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (got {total_steps})")

    def multiplier(step: int) -> float:
        return lr_lambda(step, optim, total_steps)

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

    return build


# ----------------------------------------------------------------------------- engine


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decay on >=2-D weights (matrices, embeddings),
    none on biases and norm weights. Decided on the full shape: under ZeRO-3 every
    parameter is a 1-D partition and its shape is in `ds_shape`."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            full_shape = getattr(param, "ds_shape", param.shape)
            (decay if len(full_shape) >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_engine(
    model: torch.nn.Module,
    cfg: Config,
    ds_config: dict[str, Any],
    total_steps: int,
    mpu: Any = None,
) -> deepspeed.DeepSpeedEngine:
    """`deepspeed.initialize` with our optimizer (or the config's) and lr schedule. `mpu`:
    the sequence-parallel groups (`distft.seqpar.register`); DeepSpeed then reduces
    gradients and partitions ZeRO states over all ranks and averages over the data-parallel
    ones (`build_ds_config` gets their number).

    Needs the process group up (`deepspeed.init_distributed`) before it is called.
    """
    optim = cfg.optim
    groups = param_groups(model, optim.weight_decay)
    optimizer: torch.optim.Optimizer | None = None
    if "optimizer" not in ds_config:
        # Params are on the accelerator once deepspeed.initialize has moved the module.
        fused = get_accelerator().device_name() == "cuda"
        optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        config=ds_config,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=make_lr_scheduler(optim, total_steps),
        mpu=mpu,
    )
    return engine
