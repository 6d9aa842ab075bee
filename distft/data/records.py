"""Read JSON/JSONL record files and normalise every record to a chat conversation.

Formats: instruction (`instruction`, optional `input`, `output`) and chat (`messages`: a
list of `{role, content}`). A bad record raises `DataError("file:line: what is wrong")`,
or is skipped and counted with `on_bad_record="skip"`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distft.errors import UserError

ROLES = ("system", "user", "assistant")
Format = Literal["auto", "instruction", "chat"]


class DataError(UserError):
    """Unusable input data; the message names `file:line`."""


@dataclass(frozen=True)
class Conversation:
    source: str  # "file:line", for error messages
    messages: list[dict[str, str]]


@dataclass
class ReadReport:
    records: int = 0
    skipped: int = 0


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for JSONL, or for each item of a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield i + 1, item  # position in the array; no line info for a JSON document
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")


def _detect(record: dict[str, Any]) -> Format:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    raise ValueError("cannot tell the format: expected 'messages' or 'instruction'/'output'")


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _to_messages(record: Any, fmt: Format) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = _detect(record)
    if fmt == "instruction":
        prompt = _text(record, "instruction")
        extra = _text(record, "input", required=False)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        return [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record, "output")},
        ]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r}; allowed: {ROLES}")
        out.append({"role": role, "content": _text(m, "content")})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to train on")
    return out


def read_conversations(
    files: list[str], fmt: Format = "auto", on_bad_record: str = "error"
) -> tuple[list[Conversation], ReadReport]:
    """All records of `files`, in order, as conversations."""
    report = ReadReport()
    out: list[Conversation] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        for lineno, raw in _iter_raw(path):
            source = f"{path}:{lineno}"
            try:
                if isinstance(raw, DataError):
                    raise raw
                out.append(Conversation(source, _to_messages(raw, fmt)))
                report.records += 1
            except (ValueError, DataError) as e:
                if on_bad_record != "skip":
                    msg = str(e) if isinstance(e, DataError) else f"{source}: {e}"
                    raise DataError(msg) from None
                report.skipped += 1
    if not out:
        raise DataError(f"{', '.join(files)}: no usable records")
    return out, report
