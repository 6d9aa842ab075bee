"""Output-directory ownership: `distft train` writes only into a `checkpoint.output_dir`
that is missing, empty, or already a distft run, and marks the ones it takes.

A run is recognised by its marker `<output_dir>/.distft` (JSON: the distft version and
the time the directory was taken), or, for runs started by a distft that wrote no
marker, by its `checkpoints/` layout or its `metrics.jsonl`/`launches.jsonl` next to
`config.yaml`. Anything else in the directory is somebody else's, and a refusal touches
none of it.

A run is finished when its newest committed checkpoint records that the schedule ended
at its step (`TrainState.finished_at_step`), it was trained with this config (same
fingerprint) and, with `save_final_model`, `final/` was written after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from distft import __version__
from distft.config import Config
from distft.errors import UserError

MARKER = ".distft"
KEY = "checkpoint.output_dir"
_LEGACY_LOGS = ("metrics.jsonl", "launches.jsonl")


def is_run(out: Path) -> bool:
    """Whether `out` holds a distft run (marked, or written by an older distft)."""
    if (out / MARKER).is_file():
        return True
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and ((ckpts / "latest").is_file() or any(ckpts.glob("step_*"))):
        return True
    return (out / "config.yaml").is_file() and any((out / n).is_file() for n in _LEGACY_LOGS)


def check(cfg: Config) -> None:
    """Read-only: raise UserError unless distft may train into the output directory (it
    is missing and could be made, empty, or a distft run). A data cache configured
    inside it does not count as somebody else's files."""
    out = cfg.output_dir
    if out.is_symlink() and not out.exists():
        raise UserError(f"{KEY}: {out} is a dangling symlink")
    if out.exists() and not out.is_dir():
        raise UserError(f"{KEY}: {out} is a file, not a directory")
    if not out.exists():
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise UserError(f"{KEY}: cannot create {out}: {blocker} is not a directory")
        return
    if is_run(out):
        return
    foreign = _foreign_entries(out, cfg.data.cache_dir)
    if foreign:
        raise UserError(
            f"{KEY}: {out} is not empty and not a distft run (it holds {foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
            "use a new or empty directory"
        )


def _foreign_entries(out: Path, cache_dir: str | None) -> list[str]:
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise UserError(f"{KEY}: cannot read {out} ({e.strerror or e})") from None
    cache = Path(cache_dir) if cache_dir else None
    return [n for n in names if cache is None or not _holds(out / n, cache)]


def _holds(entry: Path, path: Path) -> bool:
    return entry == path or entry in path.parents


def claim(out: Path) -> None:
    """Make `out` (and the parents it needs) and mark it as a distft run, or check that an
    existing run can be written to. Call after `check` and every other refusal; a failure
    is one line naming the key and leaves no directory behind."""
    existed = out.is_dir()
    if existed and (out / MARKER).is_file():
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"{KEY}: cannot write in {out} (not writable)")
        return
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_marker(out)
    except OSError as e:
        for p in made:  # deepest first
            _rmdir_quietly(p)
        verb = "write in" if existed else "create"
        raise UserError(f"{KEY}: cannot {verb} {out} ({e.strerror or e})") from None


def _write_marker(out: Path) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"distft": __version__, "created": created}) + "\n")
    os.replace(tmp, out / MARKER)


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def finished(cfg: Config) -> str | None:
    """The line to print when this run has nothing left to do, else None. Cheap: a
    listing, one state file and the config's fingerprint; hashes are not verified."""
    from distft.checkpoint import MANIFEST, STATE, TrainState
    from distft.checkpoint.fingerprint import fingerprint, fingerprint_changes

    if cfg.checkpoint.resume != "auto":
        return None
    out = cfg.output_dir
    committed = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / MANIFEST).is_file())
    if not committed:
        return None
    ckpt = committed[-1]
    try:
        state = TrainState.from_json((ckpt / STATE).read_text())
    except (OSError, ValueError, TypeError):
        return None
    if state.finished_at_step is None or state.finished_at_step != state.step:
        return None
    if fingerprint_changes(state.fingerprint, fingerprint(cfg)):
        return None  # allowed to change (or refused before): the workers decide
    if cfg.checkpoint.save_final_model and not _written_after(out / "final", ckpt / MANIFEST):
        return None
    return (
        f"already finished: step {state.step} of {state.finished_at_step} committed in {out} "
        "(nothing to do; use a new checkpoint.output_dir to train again)"
    )


def _written_after(final: Path, manifest: Path) -> bool:
    """`final/` is published (renamed into place) after the last checkpoint's commit."""
    try:
        return final.is_dir() and final.stat().st_mtime >= manifest.stat().st_mtime
    except OSError:
        return False
