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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from distft import __version__, diskspace, faults, reshard, safeload
from distft.config import Config
from distft.dist import DistContext
from distft.errors import CheckpointError
from distft.fingerprint import fingerprint_changes, hash_file

MANIFEST = "manifest.json"
STATE = "train_state.json"


@dataclass
class TrainState:
    """Everything distft needs besides DeepSpeed's own state to continue exactly.

    Checkpoints are taken at optimizer-step boundaries, so the gradient-accumulation
    position is always 0 there; it is recorded to make that explicit.
    """

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    samples_seen: int = 0  # global samples consumed: independent of the world size
    world_size: int = 1
    micro_step_in_accum: int = 0
    eval_loss: float | None = None  # latest eval loss, measured at eval_step
    eval_step: int | None = None  # keep_best ranks a checkpoint only if this == step
    wandb_run_id: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)
    version: str = __version__
    finished_at_step: int | None = None  # == step: the schedule ended here (rerun: no-op)

    def record_eval(self, loss: float) -> None:
        """The eval loss measured now, after `step` optimizer steps."""
        self.eval_loss, self.eval_step = loss, self.step

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


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


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state: Any = np.random.get_state()
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
    def __init__(self, root: Path, dist: DistContext, keep_last: int, keep_best: bool = False):
        self.root, self.dist = root, dist
        self.keep_last, self.keep_best = keep_last, keep_best
        self.partial = root / ".partial"

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
    def save(self, engine: Any, state: TrainState) -> Path:
        """Collective: every rank must call it at the same step. A write the storage
        refuses (full, over quota, read-only, I/O error) removes the partial directory
        and raises `diskspace.WriteFailed`: the previous checkpoint stays the newest."""
        staging = self.partial / f"step_{state.step:08d}"
        try:
            return self._save(engine, state, staging)
        except Exception as e:
            failed = diskspace.checkpoint_save_failed(e, self.root, staging, self.committed())
            if failed is None:
                raise
            raise failed from None

    def _save(self, engine: Any, state: TrainState, staging: Path) -> Path:
        t0 = time.perf_counter()
        tag = staging.name
        if self.dist.is_main and staging.exists():
            shutil.rmtree(staging)  # leftovers of a crashed save at this step
        self.dist.barrier()
        t_write = time.perf_counter()
        # Frozen parameters (a LoRA run's base) are left out: they never change, and a
        # resume rebuilds them from model.name_or_path (`load_trainable`, fingerprinted)
        engine.save_checkpoint(
            str(self.partial), tag=tag, save_latest=False, exclude_frozen_parameters=True
        )
        faults.maybe_crash("save", state.step, self.dist.rank)
        (staging / f"rng_rank{self.dist.rank}.json").write_text(
            json.dumps(rng_state(self.dist.device))
        )
        if self.dist.is_main:
            (staging / STATE).write_text(json.dumps(asdict(state), indent=1))
        self.dist.barrier()
        names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        t_hash = time.perf_counter()
        hashes = self._hash_spread(staging, names, sync=True)
        t_commit = time.perf_counter()
        final = self.root / tag
        if self.dist.is_main:
            files: dict[str, dict[str, Any]] = {
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
            size = sum(f["size"] for f in files.values())
            now = time.perf_counter()
            self.dist.log(
                f"checkpoint {tag} committed: {size / 1e6:.1f} MB in {now - t0:.2f}s (write "
                f"{t_hash - t_write:.2f}s, hash+fsync {t_commit - t_hash:.2f}s, commit "
                f"{now - t_commit:.2f}s)"
            )
        self.dist.barrier()
        return final

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


def check_before_launch(cfg: Config) -> None:
    """On the driver, before Ray starts and before anything is written: what the workers
    would refuse about resuming (`resume: never` over saved checkpoints, a missing resume
    path, a newest checkpoint saved with another fingerprint). Cheap: a listing and one
    state file; the workers still verify hashes and decide (a torn newest checkpoint is
    left to them: they skip it)."""
    from distft.fingerprint import fingerprint

    coordinator = CheckpointCoordinator(cfg.output_dir / "checkpoints", _DRIVER, 1)
    committed = coordinator.committed()
    resume = cfg.checkpoint.resume
    if resume == "never":
        if committed:
            raise _never_but_saved(coordinator.root)
        return
    if resume != "auto" and not (Path(resume) / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint.resume: {resume}: no manifest")
    ckpt = Path(resume) if resume != "auto" else (committed[-1] if committed else None)
    if ckpt is None or cfg.checkpoint.allow_fingerprint_change:
        return
    try:
        saved = coordinator.read_state(ckpt).fingerprint
    except (OSError, ValueError, TypeError):
        return
    changed = fingerprint_changes(saved, fingerprint(cfg))
    if changed:
        raise _changed(ckpt, changed)


_DRIVER = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


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
