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
    """The file's UTF-8 text, without a byte order mark (spreadsheet exports write one).
    Only a `.json` array is read whole (a JSON value is parsed at once)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, ending with its "\n" (the last may have none),
    read one line at a time: memory follows the longest line, not the file. Only "\n"
    ends a line; the first loses a byte order mark. Each line is decoded with its "\n",
    so a bad byte is reported as decoding the whole file would."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def _json(text: str) -> Any:
    """`json.loads`, with every way it can refuse text as a ValueError."""
    try:
        return json.loads(text)
    except RecursionError:  # nesting deeper than Python's recursion limit
        raise ValueError("nested too deeply") from None


def _json_problem(e: ValueError) -> str:
    """What is wrong, for `invalid JSON (...)` (JSONDecodeError, or an integer too long)."""
    return e.msg if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0]


def _json_records(path: Path) -> Iterator[Raw]:
    """JSONL, or a JSON array in a `.json` file (items named by their 1-based position)."""
    first = _first_char(path) if path.suffix == ".json" else ""
    if first == "[":
        text = _text(path)
        try:
            items = _json(text)
        except ValueError as e:
            at = e.lineno if isinstance(e, json.JSONDecodeError) else 1
            raise DataError(f"{path}:{at}: invalid JSON ({_json_problem(e)})") from None
        for i, item in enumerate(items):
            yield f"{path}:{i + 1}", item
        return
    checked = first != "{"  # a .json file opening with "{": one object over many lines?
    for lineno, line in _lines(path):
        # Only "\n" ends a line: str.splitlines() would also split on characters that are
        # legal inside JSON strings (U+2028, U+2029, U+0085, ...) and shift the line numbers.
        line = line.removesuffix("\n").removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = _json(line)
        except ValueError as e:
            if not checked:
                _refuse_json_object(path, _text(path))
            record = DataError(f"{path}:{lineno}: invalid JSON ({_json_problem(e)})")
        checked = True
        yield f"{path}:{lineno}", record


def _first_char(path: Path) -> str:
    """The first character that is not white space ("" for none), reading no further."""
    for _, line in _lines(path):
        if stripped := line.lstrip():
            return stripped[0]
    return ""


def _refuse_json_object(path: Path, text: str) -> None:
    """A `.json` file that is one JSON object over several lines (`{"data": [...]}`, or a
    pretty-printed record) holds no records in either form we read: say so at line 1.
    (Only asked when its first line is not a JSON value alone: then the whole text can
    be one object, and the file is read whole.)"""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 2:
        return  # one line: a JSON Lines file of one record
    try:
        whole = _json(text)
    except ValueError:
        return  # not one object: the lines are read (and reported) as JSON Lines
    if isinstance(whole, dict):
        keys = ", ".join(list(whole)[:5]) or "no keys"
        raise DataError(
            f"{path}:1: one JSON object over several lines (keys: {keys}); a .json data "
            "file holds a JSON array of records, or one record per line (JSON Lines)"
        )


def _csv_lines(path: Path) -> Iterator[str]:
    """The file's lines as a text file with `newline=""` splits them ("\r", "\n", "\r\n"
    end a line, kept), read one "\n"-ended line at a time."""
    for _, line in _lines(path):
        yield from io.StringIO(line, newline="")


def _csv_records(path: Path) -> Iterator[Raw]:
    csv.field_size_limit(2**31 - 1)  # long texts: the default (128 KiB a cell) is too small
    reader = csv.DictReader(_csv_lines(path))
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from None
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
