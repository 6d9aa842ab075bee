"""The JSONL metrics file: always written on rank 0; the record every tracker is compared
with, and the one a resume reads to know the last step already logged."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distft import diskspace
from distft.metrics.writer import logged_at


class JsonlLogger:
    """Appends `{"step": ..., "time": ..., **metrics}` lines (`time`: when the loop logged
    the row); flushed on every write."""

    def __init__(self, path: Path):
        self._path = path
        with self._refused():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self._refused():
            self._f.write(json.dumps({"step": step, "time": logged_at(), **metrics}) + "\n")
            self._f.flush()

    @contextlib.contextmanager
    def _refused(self) -> Iterator[None]:
        """A full (or read-only, ...) disk under the run directory: one line, no retry."""
        try:
            yield
        except OSError as e:
            failed = diskspace.logging_write_failed(e, self._path)
            if failed is None:
                raise
            raise failed from None

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
