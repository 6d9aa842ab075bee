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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from distft import __version__, diskspace, faults, safeload
from distft.checkpoint import background, reshard
from distft.checkpoint.fingerprint import fingerprint_changes, hash_file
from distft.checkpoint.state import TrainState, rng_state, set_rng_state
from distft.config import Config
from distft.dist import DistContext
from distft.errors import CheckpointError

MANIFEST = "manifest.json"
STATE = "train_state.json"


# ------------------------------------------------------------------------ small pieces


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


# ------------------------------------------------------------------------ coordinator


class CheckpointCoordinator:
    def __init__(self, root: Path, dist: DistContext, keep_last: int, keep_best: bool = False):
        self.root, self.dist = root, dist
        self.keep_last, self.keep_best = keep_last, keep_best
        self.partial = root / ".partial"
        self._pending: background.Pending | None = None  # a save still being written

    # -- listing and verification
    def committed(self) -> list[Path]:
        """Committed-looking step dirs, oldest first (manifest present, not yet verified)."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.glob("step_*") if (p / MANIFEST).is_file()]
        return sorted(dirs, key=lambda p: p.name)

    def _hash_spread(self, root: Path, names: list[str], sync: bool = False) -> dict[str, str]:
        """Hash (and with `sync`, fsync) files, the bytes spread evenly over the ranks
        (largest file first, to the rank with the fewest bytes so far); every rank gets
        all hashes."""
        sizes = {n: (root / n).stat().st_size for n in names}
        load = [0] * self.dist.world_size
        owner: dict[str, int] = {}
        for n in sorted(names, key=lambda n: (-sizes[n], n)):
            owner[n] = min(range(self.dist.world_size), key=lambda r: (load[r], r))
            load[owner[n]] += sizes[n]
        mine = {n: hash_file(root / n, sync) for n in names if owner[n] == self.dist.rank}
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
    def save(self, engine: Any, state: TrainState, in_background: bool = False) -> Path:
        """Collective: every rank must call it at the same step. A write the storage
        refuses (full, over quota, read-only, I/O error) removes the partial directory
        and raises `diskspace.WriteFailed`: the previous checkpoint stays the newest.
        `in_background`: return once the state is snapshotted; the files are written,
        hashed and committed by a thread (`distft.checkpoint.background`), and `wait`
        (or the next save) raises what failed there. Returns the committed path (to be,
        in the background)."""
        self.wait()
        staging = self.partial / f"step_{state.step:08d}"
        try:
            return self._save(engine, state, staging, in_background)
        except Exception as e:
            raise self._failed(e, staging) from None

    def wait(self) -> None:
        """Collective: the background save in flight, if any, is committed (rank 0 joins
        its commit before the all-reduce); a failure on any rank is raised on every rank."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        error = pending.result()
        failed = self.dist.sum([float(error is not None)])[0]
        if error is not None:
            raise self._failed(error, pending.staging)
        if failed:
            raise CheckpointError(
                f"checkpoint {pending.staging.name}: its background save failed on another "
                "rank (its log says why)"
            )

    def _failed(self, e: BaseException, staging: Path) -> BaseException:
        failed = diskspace.checkpoint_save_failed(e, self.root, staging, self.committed())
        return e if failed is None else failed

    def _save(self, engine: Any, state: TrainState, staging: Path, in_background: bool) -> Path:
        t0 = time.perf_counter()
        tag = staging.name
        if self.dist.is_main and staging.exists():
            shutil.rmtree(staging)  # leftovers of a crashed save at this step
        self.dist.barrier()
        live = engine.checkpoint_engine
        snaps = background.snapshot_engine(live) if in_background else None
        engine.checkpoint_engine = snaps or live
        try:
            # Frozen parameters (a LoRA run's base) are left out: they never change, and a
            # resume rebuilds them from model.name_or_path (`load_trainable`, fingerprinted)
            engine.save_checkpoint(
                str(self.partial), tag=tag, save_latest=False, exclude_frozen_parameters=True
            )
        finally:
            engine.checkpoint_engine = live
        rng_file = f"rng_rank{self.dist.rank}.json"
        (staging / rng_file).write_text(json.dumps(rng_state(self.dist.device)))
        if self.dist.is_main:
            (staging / STATE).write_text(json.dumps(asdict(state), indent=1))
        if snaps is not None:
            return self._save_in_background(snaps, staging, state, rng_file, t0)
        faults.maybe_crash("save", state.step, self.dist.rank)
        self.dist.barrier()
        t_hash = time.perf_counter()
        hashes = self._hash_spread(staging, _files(staging), sync=True)
        if self.dist.is_main:
            t_commit = time.perf_counter()
            self._commit(staging, state.step, state.fingerprint, hashes)
            now = time.perf_counter()
            how = f"write {t_hash - t0:.2f}s, hash+fsync {t_commit - t_hash:.2f}s, commit "
            self._log_commit(tag, t0, how + f"{now - t_commit:.2f}s")
        self.dist.barrier()
        return self.root / tag

    def _save_in_background(
        self, snaps: Any, staging: Path, state: TrainState, rng_file: str, t0: float
    ) -> Path:
        own = [str(Path(path).relative_to(staging)) for path, _ in snaps.jobs]
        own += [rng_file] + ([STATE] if self.dist.is_main else [])
        step, fp = state.step, dict(state.fingerprint)
        stall = time.perf_counter() - t0

        def commit(hashes: dict[str, str]) -> None:
            names = _files(staging)
            for n in names:  # what DeepSpeed wrote itself, on rank 0 (its recovery script)
                if n not in hashes:
                    hashes[n] = hash_file(staging / n, sync=True)
            self._commit(staging, step, fp, hashes)
            self._log_commit(staging.name, t0, f"in the background; the loop paused {stall:.2f}s")

        self._pending = background.Pending(
            staging,
            self.dist.rank,
            self.dist.world_size,
            step,
            snaps.write_all,
            own,
            commit if self.dist.is_main else None,
        )
        return self.root / staging.name

    def _commit(self, staging: Path, step: int, fp: dict[str, str], hashes: dict[str, str]) -> None:
        """Rank 0: manifest (written last), rename into place, `latest`, retention."""
        names = _files(staging)
        files = {n: {"size": (staging / n).stat().st_size, "xxh3_128": hashes[n]} for n in names}
        manifest = {
            "step": step,
            "world_size": self.dist.world_size,
            "files": files,
            "fingerprint": fp,
            "version": __version__,
        }
        _atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / staging.name
        if final.exists():  # an older save of the same step, superseded
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(self.root)
        _atomic_write(self.root / "latest", staging.name)
        self._retain()

    def _log_commit(self, tag: str, t0: float, how: str) -> None:
        manifest = json.loads((self.root / tag / MANIFEST).read_text())
        size = sum(f["size"] for f in manifest["files"].values())
        now = time.perf_counter()
        self.dist.log(f"checkpoint {tag} committed: {size / 1e6:.1f} MB in {now - t0:.2f}s ({how})")

    def _retain(self) -> None:
        """Runs only after a commit: the newest `keep_last` (which include the one just
        committed) and, with keep_best, the lowest eval loss measured at its own step."""
        committed = self.committed()
        keep = set(committed[-self.keep_last :])
        if self.keep_best:
            scored = [(s, p) for p in committed if (s := _eval_loss(p)) is not None]
            if scored:
                keep.add(min(scored, key=lambda sp: sp[0])[1])
        for old in committed:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- load
    def restore(
        self, engine: Any, cfg: Config, fresh: TrainState, restarted: bool = False
    ) -> TrainState:
        """Resume per `checkpoint.resume`, or return `fresh` when there is nothing to
        resume. Refuses a checkpoint whose fingerprint differs unless allowed. A worker
        group `restarted` after a failure continues from this run's newest checkpoint
        once it has one, whatever `resume` says."""
        resume = cfg.checkpoint.resume
        if restarted and self.committed():
            resume = "auto"
        if resume == "never" and self.committed():
            raise _never_but_saved(self.root)
        ckpt = self.find_resume(resume)
        if ckpt is None:
            return fresh
        changed = fingerprint_changes(self.read_state(ckpt).fingerprint, fresh.fingerprint)
        if changed and not cfg.checkpoint.allow_fingerprint_change:
            raise _changed(ckpt, changed)
        t0 = time.perf_counter()
        state = self.load(engine, ckpt)
        if changed:
            self.dist.log(f"resuming despite changed {', '.join(changed)} (allowed by config)")
        state.fingerprint, state.world_size = fresh.fingerprint, fresh.world_size
        self.dist.log(
            f"resumed from {ckpt} at step {state.step} (loaded in {time.perf_counter() - t0:.2f}s)"
        )
        return state

    def load(self, engine: Any, ckpt: Path) -> TrainState:
        """Restore engine (module, optimizer, lr scheduler), RNG and train state from
        `ckpt`, which the caller has verified (`find_resume`): only then is it resharded."""
        state = self.read_state(ckpt)
        engine.checkpoint_engine = safeload.checkpoint_engine()
        if state.world_size == self.dist.world_size:
            path, _ = engine.load_checkpoint(
                str(ckpt.parent),
                tag=ckpt.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                custom_load_fn=load_trainable,
            )
        else:
            self.dist.log(
                f"{ckpt} was saved by {state.world_size} workers, this run has "
                f"{self.dist.world_size}: resharding through a universal checkpoint"
            )
            path = reshard.load_universal(engine, reshard.to_universal(ckpt, self.dist))
        if path is None:
            raise CheckpointError(f"{ckpt}: DeepSpeed could not load it")
        rng_file = ckpt / f"rng_rank{self.dist.rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()), self.dist.device)
        else:  # a rank the saving run did not have: a fresh, rank-specific stream
            seed = 1_000_003 * state.step + self.dist.rank
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        return state

    @staticmethod
    def read_state(ckpt: Path) -> TrainState:
        return TrainState.from_json((ckpt / STATE).read_text())


def _files(staging: Path) -> list[str]:
    """The files of a checkpoint being written, relative, sorted (the background save's
    per-rank reports left out)."""
    return sorted(
        str(p.relative_to(staging))
        for p in staging.rglob("*")
        if p.is_file() and not p.name.startswith((".written_rank", ".failed_rank"))
    )


def _eval_loss(ckpt: Path) -> float | None:
    """The eval loss of the weights saved in `ckpt`; None if it was measured at another step
    (a checkpoint saved between evals) or not at all."""
    try:
        state = TrainState.from_json((ckpt / STATE).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return state.eval_loss if state.eval_step == state.step else None


def _never_but_saved(root: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint.resume: 'never', but {root} already holds checkpoints; "
        "use a new checkpoint.output_dir or resume: auto"
    )


def _changed(ckpt: Path, changed: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{ckpt}: saved with a different {', '.join(changed)}; set "
        "checkpoint.allow_fingerprint_change=true to resume anyway, or use a new "
        "checkpoint.output_dir"
    )


def load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module load (`custom_load_fn`) for checkpoints saved without frozen
    parameters: exactly the frozen parameters may be missing (they keep the weights the
    model was built with); any other missing or unexpected key is an error, as with a
    strict load."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
