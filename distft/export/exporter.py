"""Export: a checkpoint (`distft export`) or the live engine (end of `distft train`) -> a
Hugging Face folder (layout: `distft.export.hf_folder`), verified by logits
(`distft.export.verify`).

A folder is written under a temporary name next to its destination and renamed into
place once it is complete and verified, so a folder with the destination's name is whole.
Memory: full models are consolidated one output shard at a time (`distft.export.consolidate`);
LoRA adapters are small; a merge holds the base model in fp32 once (twice while verifying).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch

from distft import config as config_mod
from distft import model as model_mod
from distft.checkpoint import CheckpointCoordinator
from distft.config import Config
from distft.dist import DistContext
from distft.errors import UserError
from distft.export import hf_folder as hf
from distft.export import verify as v
from distft.export.consolidate import (
    Layout,
    iter_shards,
    materialize,
    out_dtype,
    plan_shards,
    read_layout,
)
from distft.model_files import is_reward_model
from distft.tolerance import Kind


class ExportError(UserError):
    """An export that cannot start: bad source, destination or option."""


@dataclass
class ExportResult:
    out: Path
    kind: str  # "full model", "LoRA adapter", "merged model"
    dtype: str
    files: int
    seconds: float
    verdict: str  # what was verified, with the max |Δ|, or that it was skipped

    def line(self) -> str:
        return (
            f"exported {self.kind} ({self.dtype}, {self.files} weight file(s)) to {self.out} "
            f"in {self.seconds:.1f}s; {self.verdict}"
        )


# ------------------------------------------------------------------------ distft export


def resolve_source(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) for a run dir (its `checkpoints/latest`) or a checkpoint."""
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        ckpt, run_dir = path / "checkpoints" / latest.read_text().strip(), path
    elif (path / "manifest.json").is_file() or path.name.startswith("step_"):
        ckpt, run_dir = path, path.parent.parent
    else:
        raise ExportError(f"{path}: not a run directory (no checkpoints/latest) or a checkpoint")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: no config.yaml (the run's resolved config) for {ckpt}")
    return ckpt, run_dir


def _verified_checkpoint(source: Path) -> tuple[Path, Config]:
    ckpt, run_dir = resolve_source(source)
    cfg = config_mod.load(run_dir / "config.yaml")
    dist = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    problem = CheckpointCoordinator(ckpt.parent, dist, keep_last=1).verify(ckpt)
    if problem:
        raise ExportError(problem)
    return ckpt, cfg


def _staging(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out: {out} exists and is not empty")
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _publish(staging: Path, out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)  # empty (checked before), or the previous final/
    os.replace(staging, out)


def export_checkpoint(
    source: Path,
    out: Path,
    *,
    merge_lora: bool = False,
    dtype: str = "auto",
    verify: bool = True,
    max_shard_size: str = hf.DEFAULT_SHARD_SIZE,
    log: Callable[[str], None] = lambda line: None,
) -> ExportResult:
    """`distft export`: consolidate `source` into `out`, then check its logits."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    max_bytes = hf.parse_size(max_shard_size)
    if dtype not in ("auto", *hf.DTYPES):
        raise ExportError(f"--dtype: expected auto, {', '.join(hf.DTYPES)} (got {dtype!r})")
    ckpt, cfg = _verified_checkpoint(source)
    if dtype == "auto":
        dtype = "fp32" if cfg.deepspeed.precision.value == "fp32" else "bf16"
    if merge_lora and not cfg.lora.enabled:
        raise ExportError(f"--merge-lora: {ckpt} is from a full fine-tune, not a LoRA run")
    staging = _staging(out)
    try:
        layout = read_layout(ckpt, trainable_only=cfg.lora.enabled)
        log(f"{ckpt}: intact; ZeRO stage {layout.stage}, {layout.world_size} rank(s)")
        kind, files = _write(staging, layout, cfg, hf.DTYPES[dtype], merge_lora, max_bytes)
        verdict = "not verified (--no-verify)"
        if verify:
            log("checking the export's logits against the checkpoint")
            verdict = _verify(staging, ckpt, cfg)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out, kind, dtype, files, time.perf_counter() - t0, verdict)


def _write(
    out: Path, layout: Layout, cfg: Config, dtype: torch.dtype, merge: bool, max_bytes: int
) -> tuple[str, int]:
    tokenizer = hf.training_tokenizer(cfg)
    if not cfg.lora.enabled:
        n, shards = iter_shards(layout, dtype, max_bytes)
        _write_all(hf.WeightWriter(out, n, hf.meta_model(cfg, lora=False)), shards)
        hf.write_metadata(out, cfg, tokenizer, dtype)
        return "full model", n
    adapter = materialize(layout, list(layout.tensors), torch.float32)
    if merge:
        n = _write_merged(out, adapter, cfg, dtype, max_bytes)
        hf.write_metadata(out, cfg, tokenizer, dtype)
        return "merged model", n
    skeleton = hf.meta_model(cfg, lora=True)
    if set(hf.lora_names(skeleton)) != set(adapter):
        raise ExportError(f"{layout.ckpt}: its trained tensors do not match the LoRA config")
    skeleton.save_pretrained(
        out,
        state_dict={k: t.to(dtype) for k, t in adapter.items()},
        save_embedding_layers=False,  # the trained rows are in it; the base is resized on load
    )
    hf.write_metadata(out, cfg, tokenizer, None)
    return "LoRA adapter", 1


def _write_all(writer: hf.WeightWriter, shards: Iterable[dict[str, torch.Tensor]]) -> None:
    for tensors in shards:
        writer.write(tensors)
        del tensors  # before the next shard is built: one shard in memory at a time
    writer.close()


def _write_merged(
    out: Path, adapter: dict[str, torch.Tensor], cfg: Config, dtype: torch.dtype, max_bytes: int
) -> int:
    """W + (alpha / r) * B @ A folded in by peft (in fp32), written in `dtype`."""
    model = hf.with_lora(hf.base_model(cfg), cfg)
    v.load_weights(model, adapter, torch.float32, hf.lora_names(model))
    merged = model.merge_and_unload()
    items = hf.weights_of(merged)
    sizes = [t.numel() * out_dtype(t, dtype).itemsize for _, t in items]
    groups = plan_shards(sizes, max_bytes)
    shards = (
        {items[i][0]: items[i][1].to(out_dtype(items[i][1], dtype)) for i in g} for g in groups
    )
    _write_all(hf.WeightWriter(out, len(groups), merged), shards)
    return len(groups)


# ------------------------------------------------------------------------ verification


def verify_export(out: Path, source: Path) -> str:
    """Check an export folder against its checkpoint (run dir or checkpoint dir); one line
    with the max |Δ| of the logits on the probe inputs. Raises VerificationFailed."""
    return _verify(out, *_verified_checkpoint(source))


def _verify(out: Path, ckpt: Path, cfg: Config) -> str:
    tokenizer = hf.training_tokenizer(cfg)
    config = hf.hf_config(cfg)
    rows, added = hf.vocab_rows(cfg, config, tokenizer), hf.added_ids(cfg, tokenizer)
    inputs = v.probe_inputs(tokenizer, rows, hf.max_positions(config), added)
    if (out / "adapter_config.json").is_file():
        return _verify_adapter(out, ckpt, cfg, inputs)
    dtype = getattr(torch, json.loads((out / "config.json").read_text())["dtype"])
    if cfg.lora.enabled:
        return _verify_merged(out, ckpt, cfg, dtype, inputs)
    return _verify_full(out, ckpt, dtype, inputs)


def _verify_full(out: Path, ckpt: Path, dtype: torch.dtype, inputs: list) -> str:
    model = _load_exported(out)
    got = v.logits(model, inputs)
    layout = read_layout(ckpt)
    if layout.stage:
        reference = v.deepspeed_reference(ckpt, trainable_only=False)
    else:  # no ZeRO: the module state is the reference (DeepSpeed's reader needs ZeRO)
        reference = materialize(layout, list(layout.tensors), torch.float32)
    v.load_weights(model, reference, dtype, [n for n, _ in model.named_parameters()])
    # The same module object recomputed in fp32 on the reference weights rounded through
    # the export's dtype: only the kernels' rounding may differ.
    diff = v.check(
        "export vs checkpoint", got, v.logits(model, inputs), torch.float32, Kind.RECOMPUTED
    )
    return f"verified: logits {diff} vs the checkpoint on {len(inputs)} probe inputs"


def _verify_adapter(out: Path, ckpt: Path, cfg: Config, inputs: list) -> str:
    from peft import PeftModel
    from safetensors import safe_open

    with safe_open(out / hf.ADAPTER, "pt") as f:
        names = list(f.keys())
        dtype = f.get_slice(names[0]).get_dtype() if names else "F32"
    v.check_adapter_file(out / hf.ADAPTER, len(read_layout(ckpt, trainable_only=True).tensors))
    model = PeftModel.from_pretrained(hf.base_model(cfg, trained=True), out)
    got = v.logits(model, inputs)
    with model.disable_adapter():
        changed = v.check_changes(got, v.logits(model, inputs), torch.float32)
    reference = v.deepspeed_reference(ckpt, trainable_only=True)
    v.load_weights(model, reference, _SAFETENSORS_DTYPES[dtype], hf.lora_names(model))
    diff = v.check(
        "adapter vs checkpoint", got, v.logits(model, inputs), torch.float32, Kind.RECOMPUTED
    )
    return (
        f"verified: logits {diff} vs the checkpoint on {len(inputs)} probe inputs; "
        f"the adapter moves the base model's logits by up to {changed:.3g}"
    )


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _verify_merged(out: Path, ckpt: Path, cfg: Config, dtype: torch.dtype, inputs: list) -> str:
    base = hf.base_model(cfg)
    base_logits = v.logits(base, inputs)
    adapted = hf.with_lora(base, cfg)
    reference = v.deepspeed_reference(ckpt, trainable_only=True)
    v.load_weights(adapted, reference, torch.float32, hf.lora_names(adapted))
    want = v.logits(adapted, inputs)
    changed = v.check_changes(want, base_logits, torch.float32)
    del base, adapted
    got = v.logits(_load_exported(out), inputs)
    # Both in fp32: W + s·B·A folded into one weight is reassociated arithmetic; a bf16 or
    # fp16 merge also rounds the folded weight to that dtype.
    kind = Kind.REASSOCIATED if dtype == torch.float32 else Kind.ROUNDED
    diff = v.check("merged model vs the checkpoint's adapter", got, want, dtype, kind)
    return (
        f"verified: logits {diff} vs base + the checkpoint's adapter on "
        f"{len(inputs)} probe inputs; the merge moves the base logits by up to {changed:.3g}"
    )


def _load_exported(out: Path) -> Any:
    """The export as a user loads it, in fp32 (exact for fp32, bf16 and fp16 weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if is_reward_model(out) else AutoModelForCausalLM
    loaded: Any = auto.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    model, info = loaded
    bad = [
        f"{k}: {', '.join(sorted(map(str, info[k]))[:3])}"
        for k in info
        if k != "error_msgs" and info[k]
    ]
    if bad:
        raise v.VerificationFailed(f"{out}: transformers reports {'; '.join(bad)}")
    return model


# ------------------------------------------------------------------------ end of training


def save_final(engine: Any, tokenizer: Any, cfg: Config, dist: DistContext) -> None:
    """Collective: write `<output_dir>/final` from the live engine in the same layout as
    `distft export` (weights in the training dtype), then check it (`_verify_final`).
    Under ZeRO-3 parameters are gathered one at a time; rank 0 holds one shard at most."""
    out = cfg.output_dir / "final"
    staging = out.parent / ".final.partial"
    module = engine.module
    dtype = next(module.parameters()).dtype
    tokenizer = hf.training_tokenizer(cfg, tokenizer)
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if cfg.lora.enabled:
        state = {n: _gather(p, dist) for n, p in module.named_parameters() if p.requires_grad}
        if dist.is_main:
            module.save_pretrained(staging, state_dict=state, save_embedding_layers=False)
            hf.write_metadata(staging, cfg, tokenizer, None)
    else:
        items = hf.weights_of(module)
        sizes = [_full_numel(t) * out_dtype(t, dtype).itemsize for _, t in items]
        groups = plan_shards(sizes, hf.parse_size(hf.DEFAULT_SHARD_SIZE))
        writer = hf.WeightWriter(staging, len(groups), module)
        for g in groups:
            shard = {items[i][0]: _gather(items[i][1], dist) for i in g}
            if dist.is_main:
                writer.write(shard)
            del shard  # before the next one is gathered
        if dist.is_main:
            writer.close()
            hf.write_metadata(staging, cfg, tokenizer, dtype)
    verdict = _verify_final(engine, staging, cfg, dist, tokenizer, dtype)
    if dist.is_main:
        _publish(staging, out)
    dist.barrier()
    dist.log(f"final model written to {out}; {verdict}")


def _full_numel(t: torch.Tensor) -> int:
    return int(getattr(t, "ds_numel", t.numel()))


def _gather(t: torch.Tensor, dist: DistContext) -> torch.Tensor:
    """The full tensor on rank 0 (a CPU copy), an empty one elsewhere. Collective for
    ZeRO-3 partitioned parameters."""
    if hasattr(t, "ds_id"):
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.detach().cpu().clone() if dist.is_main else torch.empty(0)
    return t.data.detach().cpu().clone() if dist.is_main else torch.empty(0)


def _verify_final(
    engine: Any, out: Path, cfg: Config, dist: DistContext, tokenizer: Any, dtype: torch.dtype
) -> str:
    """On CPU workers, rank 0 reloads `out` with plain transformers/peft in the training
    dtype and compares its logits with the engine's (the same weights recomputed:
    `distft.tolerance.Kind.RECOMPUTED`). GPU runs skip it: a CPU reload would neither
    compute bit-alike nor fit next to a large model; `distft export` verifies their
    checkpoint instead."""
    if dist.device.type != "cpu":
        return "not verified on GPU workers (`distft export` checks the checkpoint)"
    config = engine.module.config  # vocab_size: resized for added tokens
    added = hf.added_ids(cfg, tokenizer)
    inputs = v.probe_inputs(tokenizer, config.vocab_size, hf.max_positions(config), added)
    want = v.logits(engine, inputs, dist.device)  # every rank: ZeRO-3 forwards are collective
    if not dist.is_main:
        return ""
    model: Any
    if cfg.lora.enabled:
        from peft import PeftModel

        v.check_adapter_file(out / hf.ADAPTER, len(hf.lora_names(engine.module)))
        model = PeftModel.from_pretrained(hf.base_model(cfg, dtype, trained=True), out)
        got = v.logits(model, inputs)
        with model.disable_adapter():
            v.check_changes(got, v.logits(model, inputs), dtype)
    else:
        model = model_mod.auto_class(cfg).from_pretrained(out, dtype=dtype)
        got = v.logits(model, inputs)
    # Same weights, same dtype; the engine's wrappers (ZeRO-3's linear) may order the
    # arithmetic differently from the plain module.
    diff = v.check(
        f"{out.parent / 'final'} vs the trained engine", got, want, dtype, Kind.RECOMPUTED
    )
    return f"verified: logits {diff} vs the engine on {len(inputs)} probe inputs"
