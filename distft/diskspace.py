"""Write failures that are the storage's fault, not a crash to retry: a full disk
(ENOSPC), an exceeded quota (EDQUOT), an I/O error (EIO), a read-only mount (EROFS).

torch and DeepSpeed rarely pass the OSError through: a short write inside `torch.save`
surfaces as `RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos ...`.
So a failure is recognised by its errno, by its text, or, for an OSError/RuntimeError
without either, by the file system having (almost) no space left.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from distft.errors import UserError

REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only file system",
}
_TEXTS = {
    "no space left": REASONS[errno.ENOSPC],
    "quota exceeded": REASONS[errno.EDQUOT],
    "input/output error": REASONS[errno.EIO],
    "read-only file system": REASONS[errno.EROFS],
    "unexpected pos": REASONS[errno.ENOSPC],  # torch.save's short write (inline_container)
    "file write failed": REASONS[errno.ENOSPC],
}
NEARLY_FULL = 1 << 20  # bytes: below this, a failed write is taken for a full disk


class WriteFailed(UserError):
    """The storage refused a write; the message names the directory and the space."""


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def write_failure(exc: BaseException, where: Path) -> str | None:
    """Why `exc` is the storage's fault (one of REASONS), or None if it is not."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in REASONS:
            return REASONS[e.errno]
        text = str(e).lower()
        for needle, reason in _TEXTS.items():
            if needle in text:
                return reason
    if isinstance(exc, OSError | RuntimeError) and free_bytes(where) < NEARLY_FULL:
        return REASONS[errno.ENOSPC]
    return None


def dir_bytes(path: Path) -> int:
    """Bytes in the files under `path` (0 if it is gone)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            total += p.stat().st_size if p.is_file() else 0
    return total


def checkpoint_save_failed(
    exc: BaseException, root: Path, staging: Path, committed: list[Path]
) -> WriteFailed | None:
    """A failed save into `root` (`<output_dir>/checkpoints`): None if the storage is not
    to blame; else the partial `staging` directory is removed and the one-line error is
    returned. Bytes needed: the newest committed checkpoint's size, else what this save
    had written when it failed."""
    reason = write_failure(exc, staging)
    if reason is None:
        return None
    output_dir, previous = root.parent, (committed[-1] if committed else None)
    needed = dir_bytes(previous) if previous is not None else dir_bytes(staging)
    shutil.rmtree(staging, ignore_errors=True)
    kept = (
        f"checkpoint {previous.name} is intact and a rerun resumes from it"
        if previous is not None
        else "no checkpoint was saved yet"
    )
    return WriteFailed(
        f"checkpoint.output_dir: {output_dir}: {reason} while saving checkpoint "
        f"{staging.name}: it needs about {needed:,} bytes, {free_bytes(output_dir):,} bytes "
        f"are free; {kept} (free space or set another checkpoint.output_dir)"
    )


def logging_write_failed(exc: OSError, path: Path) -> WriteFailed | None:
    """A failed metrics write (metrics.jsonl in the run directory), or None."""
    reason = write_failure(exc, path)
    if reason is None:
        return None
    return WriteFailed(
        f"checkpoint.output_dir: {path.parent}: {reason} while writing {path.name}: "
        f"{free_bytes(path):,} bytes are free (free space or set another "
        "checkpoint.output_dir)"
    )
