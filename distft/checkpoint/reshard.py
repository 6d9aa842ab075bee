"""Resume on a different number of workers through DeepSpeed's universal checkpoint.

A ZeRO checkpoint's optimizer state is partitioned for the data-parallel size it was
saved with. To load it on another size, rank 0 converts the (already verified) checkpoint
once with `deepspeed.checkpoint.ds_to_universal` into `checkpoints/.universal/<tag>`
(per-parameter fp32 weights and Adam moments) next to hard links of the model-state
files, and every rank loads that with `load_universal_checkpoint` switched on for the one
call. The data position is carried by the global sample count, so nothing is skipped or
repeated (see `distft.data.loader`).

Safety: DeepSpeed's converter and universal loader call `torch.load(weights_only=False)`;
here they run under `safeload.forced()` (tensors, containers and the allow-listed
DeepSpeed classes only). The conversion writes `universal_manifest.json` last (each
file's hash and the source checkpoint's manifest hash); a `.universal/<tag>` folder is
reused only if it matches, else it is converted again.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from distft import safeload
from distft.checkpoint.fingerprint import hash_file
from distft.dist import DistContext
from distft.errors import CheckpointError

MANIFEST = "universal_manifest.json"


def to_universal(ckpt: Path, dist: DistContext, processes: int = 1) -> Path:
    """Collective: the universal copy of `ckpt` (which the caller has verified against its
    manifest), converted by rank 0 unless an intact copy of this very checkpoint exists.
    In a worker it converts in-process (no fork inside a Ray worker): `distft train` does
    it before Ray starts instead (`convert_before_launch`)."""
    target = ckpt.parent / ".universal" / ckpt.name
    if dist.is_main:
        problem = check_universal(target, ckpt) if target.exists() else None
        if problem:
            dist.log(f"converting again: {problem}")
        if problem or not target.exists():
            _convert(ckpt, target, processes)
    dist.barrier()
    return target


def convert_for_resume(cfg: Any) -> str | None:
    """`distft train`: the checkpoint the resume will take, converted here when it was
    saved by another number of workers (`convert_before_launch`)."""
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    source = cfg.output_dir if resume == "auto" else Path(resume)
    return convert_before_launch(source, cfg.cluster.num_workers, strict=False)


def convert_before_launch(source: Path, num_workers: int | None, strict: bool = True) -> str | None:
    """On the driver, before Ray starts: when the checkpoint a resume will take (`source`:
    a run's output_dir, its newest checkpoint; or a checkpoint) was saved by another
    number of workers than `num_workers` (None: whatever it was saved by), verify it and
    convert it with one process per core. Outside any process group, so no collective
    timeout bounds it, and the workers find the copy ready. A copy already converted (and
    intact) is kept. A checkpoint that fails verification raises `CheckpointError` when
    `strict`, else is left to the workers (they skip or refuse it). Returns the line to
    print, or None when there is nothing to do."""
    import time

    from distft.checkpoint import MANIFEST as CKPT_MANIFEST
    from distft.checkpoint import CheckpointCoordinator
    from distft.checkpoint.preflight import DRIVER

    if (source / CKPT_MANIFEST).is_file():
        ckpt = source
    else:  # the newest, verified below only if it needs converting
        committed = CheckpointCoordinator(source / "checkpoints", DRIVER, 1).committed()
        if not committed:
            if strict:
                raise CheckpointError(f"{source}: no committed checkpoint")
            return None
        ckpt = committed[-1]
    coordinator = CheckpointCoordinator(ckpt.parent, DRIVER, 1)
    saved_by = coordinator.read_state(ckpt).world_size
    if num_workers is not None and saved_by == num_workers:
        return None
    target = ckpt.parent / ".universal" / ckpt.name
    if target.exists() and check_universal(target, ckpt) is None:
        return f"reshard: {target} is ready (converted before)"
    if problem := coordinator.verify(ckpt):
        if strict:
            raise CheckpointError(problem)
        return f"reshard: not converted: {problem}"
    t0, processes = time.perf_counter(), max(1, os.cpu_count() or 1)
    to_universal(ckpt, DRIVER, processes)
    return (
        f"reshard: {ckpt.name} (saved by {saved_by} workers) converted to a universal "
        f"checkpoint in {time.perf_counter() - t0:.1f}s with {processes} processes: {target}"
    )


def _convert(ckpt: Path, target: Path, processes: int = 1) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging = target.with_name(f".{ckpt.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(staging),
        num_extract_workers=processes,  # 1: in-process (no fork inside a Ray worker)
        num_merge_workers=processes,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # needed for checkpoints DeepSpeed wrote itself
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), safeload.forced():  # its chatter
            ds_to_universal(args)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for f in ckpt.glob("*model_states.pt"):  # those DeepSpeed did not write itself
        if not (staging / f.name).exists():
            os.link(f, staging / f.name)
    write_universal_manifest(staging, ckpt)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def _source_id(ckpt: Path) -> str:
    """The converted checkpoint's identity: the hash of its (verified) manifest."""
    return hash_file(ckpt / "manifest.json")


def _files(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_universal_manifest(folder: Path, ckpt: Path) -> None:
    """Written last: every file's xxh3-128 (as in a checkpoint's manifest) and the source."""
    files = {name: hash_file(folder / name, sync=True) for name in _files(folder)}
    manifest = {"source": ckpt.name, "source_manifest": _source_id(ckpt), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def check_universal(folder: Path, ckpt: Path) -> str | None:
    """None if `folder` is an intact conversion of `ckpt`, else one line saying why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        source = manifest["source_manifest"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{folder}: no valid {MANIFEST} ({type(e).__name__})"
    if source != _source_id(ckpt):
        return f"{folder}: converted from another {ckpt.name}"
    present = _files(folder)
    if present != sorted(files):
        extra = sorted(set(present) ^ set(files))
        return f"{folder}: files differ from its manifest ({', '.join(extra[:3])})"
    for name in present:
        if hash_file(folder / name) != files[name]:
            return f"{folder}: {name} does not match its hash"
    return None


def load_universal(engine: Any, universal: Path) -> Any:
    """`engine.load_checkpoint` from a universal checkpoint (DeepSpeed reads the switch
    from its config at load time; it is restored right after), weights only."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        with safeload.forced():
            path, _ = engine.load_checkpoint(
                str(universal.parent),
                tag=universal.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
    finally:
        config.load_universal_checkpoint = False
    return path
