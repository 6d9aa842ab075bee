"""Tokenized samples as flat arrays (the on-disk cache format) and splits over them.

`TokenArrays` holds one source: all samples' ids and labels concatenated (int32) plus
offsets, saved as `.npy` files and memory-mapped when loaded, so every rank of a node
shares one copy in the page cache and a row is a zero-copy slice. A `Split` is an
ordered selection of rows (repeats allowed, for mixing weights) over several sources.

`TokenWriter` builds the files as samples arrive: ids and labels go straight to their
`.npy` files (the header, a fixed 128 bytes for any length, is written again with the
final shape), so the tokens are never held in memory; only 16 bytes a sample are (the
offsets and target counts). The files are the bytes `np.save` writes.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from distft.data.tokenize import IGNORE

_ARRAYS = ("ids", "labels", "offsets", "targets")


@dataclass(frozen=True)
class TokenArrays:
    ids: np.ndarray  # int32, every sample's tokens back to back
    labels: np.ndarray  # int32, IGNORE where there is no loss
    offsets: np.ndarray  # int64, sample i is [offsets[i], offsets[i+1])
    targets: np.ndarray  # int64, predicted tokens per sample: labels after the first

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[Any, Any]]) -> TokenArrays:
        ids, labels, lengths = [], [], [0]
        for i, lab in rows:
            ids.append(np.asarray(i, dtype=np.int32))
            labels.append(np.asarray(lab, dtype=np.int32))
            lengths.append(len(i))
        targets = np.array([int((lab[1:] != IGNORE).sum()) for lab in labels], dtype=np.int64)
        return cls(
            ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            labels=np.concatenate(labels) if labels else np.zeros(0, np.int32),
            offsets=np.cumsum(np.array(lengths, dtype=np.int64)),
            targets=targets,
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, directory: Path, meta: dict) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name), allow_pickle=False)
        (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> tuple[TokenArrays, dict]:
        arrays = {n: np.load(directory / f"{n}.npy", mmap_mode="r") for n in _ARRAYS}
        return cls(**arrays), json.loads((directory / "meta.json").read_text())


class TokenWriter:
    """Appends samples to `directory`'s ids/labels files; `finish` completes the store."""

    _HEADER = 128  # np.save's header for a 1-D int32 array of any length we can write

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.files: dict[str, IO[bytes]] = {}
        for name in ("ids", "labels"):
            f = (directory / f"{name}.npy").open("wb")
            self.files[name] = f
            self._header(f, 0)
        self.offsets = array("q", [0])
        self.targets = array("q")

    def _header(self, f: IO[bytes], n: int) -> None:
        f.seek(0)
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.int32).str, "fortran_order": False, "shape": (n,)}
        )
        assert f.tell() == self._HEADER, f.tell()

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        self.files["ids"].write(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
        labels = np.ascontiguousarray(labels, dtype=np.int32)
        self.files["labels"].write(labels.tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.targets.append(int((labels[1:] != IGNORE).sum()))

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def finish(self, meta: dict) -> None:
        """Final headers, offsets, target counts and `meta.json` (after `close`)."""
        for name in ("ids", "labels"):
            with (self.dir / f"{name}.npy").open("r+b") as f:
                self._header(f, self.tokens)
        for name, values in (("offsets", self.offsets), ("targets", self.targets)):
            np.save(self.dir / f"{name}.npy", np.frombuffer(values, np.int64), allow_pickle=False)
        (self.dir / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    def close(self) -> None:
        for f in self.files.values():
            f.close()  # flushes what was buffered


class Split:
    """Rows `(part[k], row[k])` for k = 0..len-1, over the sources in `parts`."""

    def __init__(
        self,
        parts: list[TokenArrays],
        part: np.ndarray | None = None,
        row: np.ndarray | None = None,
    ):
        self.parts = parts
        if part is None or row is None:
            sizes = np.array([len(p) for p in parts], dtype=np.int64)
            part = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
            row = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(
                np.cumsum(sizes) - sizes, sizes
            )
        self.part, self.row = part.astype(np.int64), row.astype(np.int64)
        self.lengths = np.zeros(len(self.row), np.int64)
        self.targets = np.zeros(len(self.row), np.int64)
        for i, p in enumerate(parts):
            sel = self.part == i
            self.lengths[sel] = p.lengths[self.row[sel]]
            self.targets[sel] = p.targets[self.row[sel]]

    @classmethod
    def from_lists(cls, ids: list[list[int]], labels: list[list[int]]) -> Split:
        """A one-source split from Python lists (tests, small in-memory data)."""
        arrays = TokenArrays.from_rows(zip(ids, labels, strict=True))
        return cls([arrays])

    def __len__(self) -> int:
        return len(self.row)

    def sample(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.parts[self.part[k]]
        a, b = p.offsets[self.row[k]], p.offsets[self.row[k] + 1]
        return p.ids[a:b], p.labels[a:b]

    def select(self, indices: np.ndarray) -> Split:
        return Split(self.parts, self.part[indices], self.row[indices])

    @staticmethod
    def concat(splits: list[Split]) -> Split:
        parts: list[TokenArrays] = []
        part, row = [], []
        for s in splits:
            part.append(s.part + len(parts))
            row.append(s.row)
            parts += s.parts
        return Split(parts, np.concatenate(part), np.concatenate(row))
