"""Checkpoint coordinator: the one owner of checkpoint I/O.

Layout under `<output_dir>/checkpoints/`:

    step_00000040/                  a committed checkpoint
        <DeepSpeed per-rank shards> model + optimizer (+ lr scheduler) states
        rng_rank{r}.json            every rank's python/numpy/torch(/cuda) RNG state
        train_state.json            distft's train state (step, samples, W&B id, ...)
        manifest.json               written last: every file's size + xxh3-128 hash
    .partial/step_00000040/         being written; never read
    latest                          name of the newest committed checkpoint

Commit protocol: all ranks write into `.partial/<tag>`; after a barrier the files are
hashed (spread over ranks), rank 0 writes the manifest, renames the directory into place
and atomically replaces `latest` (temp file, fsync, rename). A directory without a valid
manifest is never loaded. Old checkpoints are removed only after the new one is committed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import xxhash

from distft import __version__
from distft.dist import DistContext
from distft.errors import UserError

MANIFEST = "manifest.json"
STATE = "train_state.json"
_CHUNK = 1 << 22


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, torn, corrupted, incompatible)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # global samples consumed: independent of the world size
    world_size: int = 1
    wandb_run_id: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)
    version: str = __version__


# ------------------------------------------------------------------------ small pieces


def _hash_file(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


# ------------------------------------------------------------------------ coordinator


class CheckpointCoordinator:
    def __init__(self, root: Path, dist: DistContext, keep_last: int):
        self.root, self.dist, self.keep_last = root, dist, keep_last
        self.partial = root / ".partial"

    # -- listing and verification
    def committed(self) -> list[Path]:
        """Committed-looking step dirs, oldest first (manifest present, not yet verified)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.glob("step_*") if (p / MANIFEST).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def _hash_spread(self, root: Path, names: list[str]) -> dict[str, str]:
        """Hash files, each rank taking every W-th one; every rank gets all hashes."""
        mine = {n: _hash_file(root / n) for n in names[self.dist.rank :: self.dist.world_size]}
        if self.dist.world_size == 1 or not tdist.is_initialized():
            return mine
        parts: list[dict[str, str]] = [{} for _ in range(self.dist.world_size)]
        tdist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def verify(self, ckpt: Path) -> str | None:
        """None if `ckpt` is intact, else one line saying what is wrong (same on all ranks)."""
        try:
            manifest = json.loads((ckpt / MANIFEST).read_text())
            files: dict[str, dict[str, Any]] = manifest["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{ckpt}: unreadable manifest ({e})"
        problem = None
        for name, meta in files.items():
            p = ckpt / name
            if not p.is_file():
                problem = f"{ckpt}: missing file {name}"
            elif p.stat().st_size != meta["size"]:
                problem = (
                    f"{ckpt}: {name} has {p.stat().st_size} bytes, manifest says {meta['size']}"
                )
            if problem:
                return problem
        hashes = self._hash_spread(ckpt, sorted(files))
        for name in sorted(files):
            if hashes[name] != files[name]["xxh3_128"]:
                return f"{ckpt}: {name} does not match its hash (corrupted)"
        return None

    def find_resume(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `never`, `auto` (newest valid) or a path."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            problem = self.verify(path) if (path / MANIFEST).is_file() else f"{path}: no manifest"
            if problem:
                raise CheckpointError(f"checkpoint.resume: {problem}")
            return path
        for ckpt in reversed(self.committed()):
            problem = self.verify(ckpt)
            if problem is None:
                return ckpt
            self.dist.log(f"skipping checkpoint: {problem}")
        return None

    # -- save
    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step."""
        tag = f"step_{state.step:08d}"
        staging = self.partial / tag
        if self.dist.is_main and staging.exists():
            shutil.rmtree(staging)  # leftovers of a crashed save at this step
        self.dist.barrier()
        engine.save_checkpoint(str(self.partial), tag=tag, save_latest=False)
        (staging / f"rng_rank{self.dist.rank}.json").write_text(
            json.dumps(rng_state(self.dist.device))
        )
        if self.dist.is_main:
            (staging / STATE).write_text(json.dumps(asdict(state), indent=1))
        self.dist.barrier()
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        hashes = self._hash_spread(staging, names)
        final = self.root / tag
        if self.dist.is_main:
            files = {
                n: {"size": (staging / n).stat().st_size, "xxh3_128": hashes[n]} for n in names
            }
            manifest = {
                "step": state.step,
                "world_size": self.dist.world_size,
                "files": files,
                "fingerprint": state.fingerprint,
                "version": __version__,
            }
            _atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1))
            if final.exists():  # an older save of the same step, superseded
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(self.root)
            _atomic_write(self.root / "latest", tag)
            self._retain()
        self.dist.barrier()
        return final

    def _retain(self) -> None:
        for old in self.committed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- load
    def load(self, engine: Any, ckpt: Path) -> TrainState:
        """Restore engine (module, optimizer, lr scheduler), RNG and train state."""
        state = TrainState(**json.loads((ckpt / STATE).read_text()))
        if state.world_size != self.dist.world_size:
            raise CheckpointError(
                f"{ckpt}: saved with {state.world_size} workers, this run has "
                f"{self.dist.world_size}; resuming on a different world size needs a "
                "universal checkpoint"
            )
        path, _ = engine.load_checkpoint(
            str(ckpt.parent),
            tag=ckpt.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        rng_file = ckpt / f"rng_rank{self.dist.rank}.json"
        set_rng_state(json.loads(rng_file.read_text()), self.dist.device)
        return state
