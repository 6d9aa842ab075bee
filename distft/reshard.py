"""Resume on a different number of workers through DeepSpeed's universal checkpoint.

A ZeRO checkpoint's optimizer state is partitioned for the data-parallel size it was
saved with. To load it on another size, rank 0 converts the (already verified) checkpoint
once with `deepspeed.checkpoint.ds_to_universal` into `checkpoints/.universal/<tag>`
(per-parameter fp32 weights and Adam moments) next to hard links of the model-state
files, and every rank loads that with `load_universal_checkpoint` switched on for the one
call. The data position is carried by the global sample count, so nothing is skipped or
repeated (see `distft.data.loader`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any

from distft.dist import DistContext

DONE = "CONVERTED"


def to_universal(ckpt: Path, dist: DistContext) -> Path:
    """Collective: the universal copy of `ckpt`, converted by rank 0 if not done yet."""
    target = ckpt.parent / ".universal" / ckpt.name
    if dist.is_main and not (target / DONE).is_file():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        staging = target.with_name(f".{ckpt.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(ckpt),
            output_folder=str(staging),
            num_extract_workers=1,  # in-process: no fork inside a Ray worker
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # needed for checkpoints DeepSpeed wrote itself
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its progress chatter
            ds_to_universal(args)
        for f in ckpt.glob("*model_states.pt"):  # those DeepSpeed did not write itself
            if not (staging / f.name).exists():
                os.link(f, staging / f.name)
        (staging / DONE).write_text(ckpt.name)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    dist.barrier()
    return target


def load_universal(engine: Any, universal: Path) -> Any:
    """`engine.load_checkpoint` from a universal checkpoint (DeepSpeed reads the switch
    from its config at load time; it is restored right after)."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(
            str(universal.parent),
            tag=universal.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    finally:
        config.load_universal_checkpoint = False
    return path
