"""Raw records from local files and folders (JSON, JSONL, Parquet, CSV) and from `datasets`
hub names. Every record comes with where it was found (`file:line`), for error messages.

`where` is `file:line` for JSONL and CSV (the CSV line where the record ends), the 1-based
position for a JSON array and for Parquet rows, and `hub-name[split]:row` for hub data.
A line that cannot be parsed is yielded as a `DataError` so the caller can count or raise it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distft.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(UserError):
    """Unusable input data; the message names `file:line` (or the config key)."""


Raw = tuple[str, Any]  # (where, record) where record may be a DataError


def data_files(path: Path) -> list[Path]:
    """A file as itself; a folder as its data files (recursive, sorted, no hidden ones)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: data file not found")
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
    return files


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _json_records(path: Path) -> Iterator[Raw]:
    """JSONL, or a JSON array in a `.json` file (items named by their 1-based position)."""
    text = _text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield f"{path}:{i + 1}", item
        return
    # Only "\n" ends a line: str.splitlines() would also split on characters that are
    # legal inside JSON strings (U+2028, U+2029, U+0085, ...) and shift the line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")


def _csv_records(path: Path) -> Iterator[Raw]:
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:  # more cells than header columns
            yield where, DataError(f"{where}: more values than the header has columns")
        else:
            yield where, row


def _parquet_records(path: Path) -> Iterator[Raw]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    for batch in reader.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:{n}", row


def file_records(path: Path) -> Iterator[Raw]:
    if path.suffix == ".parquet":
        return _parquet_records(path)
    if path.suffix == ".csv":
        return _csv_records(path)
    return _json_records(path)


def hub_records(name: str, subset: str | None, split: str, revision: str | None) -> Iterator[Raw]:
    """Rows of a `datasets` hub dataset (or a local dataset directory given by name)."""
    ds = load_hub(name, subset, split, revision)
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:{i + 1}", row


def load_hub(name: str, subset: str | None, split: str, revision: str | None) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, subset, split=split, revision=revision)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{name}: hub dataset is not in the local cache and could not be downloaded "
            f"({reason}); download it on a machine with network access first"
        ) from None
    except ValueError as e:  # e.g. an unknown split or subset
        raise DataError(f"{name}: {str(e).splitlines()[0]}") from None
