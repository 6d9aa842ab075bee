"""DPO's frozen reference: the starting weights (LoRA: the base, adapters off).

**Precomputed** (`objective.dpo.reference: precomputed`, the default): before training,
and before any checkpoint is restored (so the engine holds the starting weights whatever
the run's history), one pass of the engine in eval mode, without gradients, computes the
summed response log-probs of every chosen and rejected sequence of every preference
source. Each rank computes its share (ZeRO-3: all ranks run as many forwards); the shares
meet in one all-reduce per chunk, and local rank 0 of each node writes them next to the
preprocessing cache (`<data cache>/reference/<key>/`), so no file system needs to be
shared. The key covers the source's cache entry (the data and everything that changed its
tokens), the model (path, revision, weight files' names, sizes and mtimes), the precision
and the attention kernel. A chunk written is not computed again (the pass resumes), and a
finished source is loaded, not computed. Training then holds no reference model.

**Resident** (`reference: resident`): the reference runs each step on the same batch.
Under LoRA it is the engine itself with the adapters switched off (no memory); otherwise
a second, frozen copy of the model (a DeepSpeed ZeRO-3 engine without optimizer under
ZeRO-3, a plain module otherwise).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import xxhash

from distft.checkpoint.fingerprint import base_weights_key
from distft.config import Config
from distft.data import PairSplit, Split, eval_batches
from distft.data.cache import cache_root
from distft.data.pipeline import DataSplits
from distft.data.store import TokenArrays
from distft.dist import DistContext
from distft.model import resolved_attention
from distft.objectives.base import Objective
from distft.objectives.preference import Preference, Reference, sequence_logps
from distft.objectives.reward import Reward
from distft.objectives.sft import Sft

CHUNK_BATCHES = 16  # micro-batches per rank between two saved chunks


@contextmanager
def _frozen_view(model: Any, adapters_off: bool) -> Iterator[None]:
    """Eval mode (no dropout) and, for LoRA, the adapters off, for the duration."""
    module = getattr(model, "module", model)  # DeepSpeedEngine.module
    was = module.training
    module.eval()
    try:
        with module.disable_adapter() if adapters_off else nullcontext(), torch.no_grad():
            yield
    finally:
        module.train(was)


def _part_dir(part: TokenArrays) -> Path:
    """The cache entry a memory-mapped source was loaded from."""
    filename = getattr(part.ids, "filename", None)
    if filename is None:
        raise RuntimeError("the reference pass needs sources loaded from the data cache")
    return Path(filename).parent


def reference_key(cfg: Config, part: TokenArrays) -> str:
    model = Path(cfg.model.name_or_path)
    ident = {
        "data": _part_dir(part).name,
        "model": str(model.resolve()) if model.is_dir() else cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "weights": base_weights_key(model) if model.is_dir() else None,
        "precision": cfg.deepspeed.precision.value,
        "dtype": cfg.model.dtype,
        "attention": resolved_attention(cfg),
        "added_tokens": cfg.model.add_special_tokens,
    }
    return xxhash.xxh3_64_hexdigest(json.dumps(ident, sort_keys=True).encode())


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)


def _pass(
    engine: Any, part: TokenArrays, out: Path, cfg: Config, dist: DistContext, pad_id: int
) -> np.ndarray:
    """The summed response log-probs of every row of `part` (one pair per two rows)."""
    pairs = PairSplit(Split([part]))
    n, micro = len(pairs), cfg.eval.micro_batch_size
    chunk = CHUNK_BATCHES * micro * dist.world_size  # pairs per chunk
    partial = out / "chunks"
    partial.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, chunk):
        path = partial / f"{start:012d}.npy"
        if path.exists():
            continue
        ids = np.arange(start, min(start + chunk, n))
        view = pairs.select(ids)
        values = torch.zeros(2 * len(ids), dtype=torch.float64, device=dist.device)
        mine = np.arange(len(ids))[np.argsort(-view.lengths, kind="stable")][
            dist.rank :: dist.world_size
        ]
        with _frozen_view(engine, cfg.lora.enabled):
            for k, batch in enumerate(eval_batches(view, micro, dist, pad_id)):
                sums, _ = sequence_logps(engine, batch.to(dist.device))
                got = mine[k * micro : (k + 1) * micro]
                for j, p in enumerate(got.tolist()):
                    values[2 * p : 2 * p + 2] = sums[2 * j : 2 * j + 2].double()
        if tdist.is_initialized() and dist.world_size > 1:
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)  # each pair on one rank only
        if dist.local_rank == 0:
            _atomic_save(path, values.cpu().numpy())
        dist.barrier()
    result = np.concatenate(
        [np.load(partial / f"{s:012d}.npy") for s in range(0, n, chunk)] or [np.zeros(0)]
    )
    return result.astype(np.float32)


def precompute(engine: Any, data: DataSplits, cfg: Config, dist: DistContext, pad_id: int) -> None:
    """Attach the reference's log-probs of every pair to the splits (computed now, or
    loaded from the cache). Call before a checkpoint is restored into `engine`."""
    splits: list[PairSplit] = [s for s in (data.train, *data.eval_sets().values())]  # type: ignore[misc]
    parts = {id(p): p for s in splits for p in s.parts}
    reference: dict[int, np.ndarray] = {}
    for pid, part in parts.items():
        out = cache_root(cfg.data) / "reference" / reference_key(cfg, part)
        final = out / "logps.npy"
        if final.exists():
            dist.log(f"reference log-probs: cached ({out.name}, {len(part) // 2:,} pairs)")
        else:
            dist.log(f"reference log-probs: computing {len(part) // 2:,} pairs ({out.name})")
            values = _pass(engine, part, out, cfg, dist, pad_id)
            if dist.local_rank == 0:
                _atomic_save(final, values)
            dist.barrier()
        reference[pid] = np.load(final)
        if len(reference[pid]) != len(part):
            raise RuntimeError(f"{final}: {len(reference[pid])} values for {len(part)} rows")
    for split in splits:
        split.reference = reference


def resident(cfg: Config, ds_config: dict[str, Any], device: torch.device) -> Reference:
    """A reference computed with the batch: LoRA's base (adapters off) or a frozen copy."""
    if cfg.lora.enabled:

        def adapters_off(model: Any, batch: Any) -> torch.Tensor:
            with _frozen_view(model, adapters_off=True):
                return sequence_logps(model, batch)[0]

        return adapters_off
    frozen = _frozen_copy(cfg, ds_config, device)

    def copy(_model: Any, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return sequence_logps(frozen, batch)[0]

    return copy


def _frozen_copy(cfg: Config, ds_config: dict[str, Any], device: torch.device) -> Any:
    import deepspeed

    from distft.model import build_model

    plain = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"gradient_checkpointing": False})}
    )
    model = build_model(plain, ds_config)
    model.requires_grad_(False)
    model.eval()
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        return model.to(device)
    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def objective_for(
    cfg: Config,
    engine: Any,
    data: DataSplits,
    dist: DistContext,
    ds_config: dict[str, Any],
    pad_id: int,
) -> Objective:
    """The run's objective. For `dpo`, its reference: precomputed now (attached to `data`'s
    splits, in the eval batches' layout, padded with `pad_id`; call before a checkpoint is
    restored) or resident."""
    method = cfg.objective
    if not method.preference:
        return Sft(cfg.model.loss_chunk_size)
    if method.method == "reward":
        return Reward(method.reward, pad_id)
    if method.method != "dpo":
        return Preference(method)
    if method.dpo.reference == "precomputed":
        precompute(engine, data, cfg, dist, pad_id)
        return Preference(method)
    return Preference(method, resident(cfg, ds_config, dist.device))
