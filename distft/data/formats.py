"""Record formats -> samples. Every format becomes one of four sample kinds:

- `Conversation` (messages with roles): `instruction` (alpaca: `instruction`, optional
  `input` and `system`, `output`) and `chat` (`messages` of `role`/`content`, or the
  sharegpt spelling `conversations` of `from`/`value` with roles human/gpt/system);
- `Completion`: `prompt_completion` (`prompt`, `completion`; trained on the completion);
- `Text`: `text` (continued pre-training: every token is trained);
- `Tokens`: `tokenized` (`input_ids`, optional `labels`).

A conversation has an optional first system message, then user and assistant turns in
turn, starting with the user's (as the chat templates that check it require).

Field names can be remapped (`fields: {canonical: name in the records}`). A bad record
raises `ValueError` with what is wrong; the reader adds `file:line`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from distft.data.records import DataError, Raw

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
SHAREGPT_ROLES.update({"user": "user", "assistant": "assistant"})


@dataclass(frozen=True)
class Conversation:
    source: str  # "file:line", for error messages
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    source: str
    prompt: str
    completion: str


@dataclass(frozen=True)
class Text:
    source: str
    text: str


@dataclass(frozen=True)
class Tokens:
    source: str
    input_ids: list[int]
    labels: list[int] | None = None


Sample = Conversation | Completion | Text | Tokens


@dataclass
class ReadReport:
    records: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list, compare=False)


class _Fields:
    def __init__(self, fields: dict[str, str] | None):
        self._map = fields or {}

    def __call__(self, canonical: str) -> str:
        return self._map.get(canonical, canonical)


def _text(record: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise ValueError(f"missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    try:  # JSON can spell lone surrogates (\ud800), which no tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"field '{key}': character {e.start} is a lone surrogate "
            f"({value[e.start]!r}), not Unicode text"
        ) from None
    return value


def _detect(record: dict[str, Any], f: _Fields) -> str:
    if f("input_ids") in record:
        return "tokenized"
    if f("messages") in record or "conversations" in record:
        return "chat"
    if f("instruction") in record or f("output") in record:
        return "instruction"
    if f("prompt") in record or f("completion") in record:
        return "prompt_completion"
    if f("text") in record:
        return "text"
    raise ValueError(
        f"cannot tell the format: expected '{f('messages')}', 'conversations', "
        f"'{f('instruction')}'/'{f('output')}', '{f('prompt')}'/'{f('completion')}', "
        f"'{f('text')}' or '{f('input_ids')}'"
    )


def _instruction(record: dict[str, Any], f: _Fields) -> list[dict[str, str]]:
    prompt = _text(record, f("instruction"))
    extra = _text(record, f("input"), required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    system = _text(record, f("system"), required=False)
    head = [{"role": "system", "content": system}] if system else []
    return [
        *head,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _text(record, f("output"))},
    ]


def _chat(record: dict[str, Any], f: _Fields) -> list[dict[str, str]]:
    key, role_key, content_key = f("messages"), f("role"), f("content")
    roles: tuple[str, ...] = ROLES
    mapping = {r: r for r in ROLES}
    if key not in record and "conversations" in record:  # sharegpt spelling
        key, role_key, content_key = "conversations", "from", "value"
        roles, mapping = tuple(SHAREGPT_ROLES), SHAREGPT_ROLES
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{key}' must be a non-empty list")
    out = []
    system = _text(record, f("system"), required=False) if key == "conversations" else ""
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{key}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = m.get(role_key)
        if role not in mapping:
            raise ValueError(f"{key}[{i}].{role_key}: unknown role {role!r}; allowed: {roles}")
        out.append({"role": mapping[role], "content": _text(m, content_key)})
        _check_turn(out, f"{key}[{i}].{role_key}", role)
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to train on")
    return out


ALTERNATION = "after an optional first system message, turns alternate user, assistant, ..."


def _check_turn(out: list[dict[str, str]], where: str, spelled: str) -> None:
    """The last message of `out` in its place: a system message first only, then user and
    assistant turns in turn (what chat templates that check, Mistral's and Gemma's, allow;
    a conversation that breaks it renders differently, or not at all, across templates)."""
    role, i = out[-1]["role"], len(out) - 1
    if role == "system":
        if i > 0:
            raise ValueError(f"{where}: a system message after the first message; {ALTERNATION}")
        return
    turn = i - (out[0]["role"] == "system")
    expected = ("user", "assistant")[turn % 2]
    if role != expected:
        got = repr(spelled) + (f" ({role})" if spelled != role else "")
        raise ValueError(f"{where}: {got} where the {expected} turn belongs; {ALTERNATION}")


def _int_list(record: dict[str, Any], key: str) -> list[int]:
    value = record[key]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{key}' must be a non-empty list of token ids")
    for i, x in enumerate(value):
        if not isinstance(x, int) or isinstance(x, bool):
            raise ValueError(f"{key}[{i}] must be an integer, got {type(x).__name__}")
        if not -(2**31) <= x < 2**31:  # token ids and labels are stored as int32
            raise ValueError(f"{key}[{i}]: {x} is not a token id (out of the int32 range)")
    return value


def _tokens(record: dict[str, Any], f: _Fields, source: str) -> Tokens:
    ids = _int_list(record, f("input_ids"))
    if record.get(f("labels")) is None:
        return Tokens(source, ids)
    labels = _int_list(record, f("labels"))
    if len(labels) != len(ids):
        raise ValueError(
            f"field '{f('labels')}' has {len(labels)} entries but '{f('input_ids')}' has {len(ids)}"
        )
    return Tokens(source, ids, labels)


def to_sample(record: Any, source: str, fmt: str, fields: dict[str, str] | None) -> Sample:
    """One record as a sample; raises ValueError (without the source) if it is bad."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    f = _Fields(fields)
    if fmt == "auto":
        fmt = _detect(record, f)
    if fmt == "instruction":
        return Conversation(source, _instruction(record, f))
    if fmt == "chat":
        return Conversation(source, _chat(record, f))
    if fmt == "prompt_completion":
        return Completion(source, _text(record, f("prompt")), _text(record, f("completion")))
    if fmt == "text":
        text = _text(record, f("text"))
        if not text:
            raise ValueError(f"field '{f('text')}' is empty")
        return Text(source, text)
    if fmt == "tokenized":
        if f("input_ids") not in record:
            raise ValueError(f"missing field '{f('input_ids')}'")
        return _tokens(record, f, source)
    raise ValueError(f"unknown format {fmt!r}")


def parse(
    raws: Iterable[Raw],
    fmt: str,
    fields: dict[str, str] | None,
    on_bad_record: str,
    report: ReadReport,
    max_samples: int | None = None,
) -> Iterator[Sample]:
    """Samples of `raws` in order; bad records raise `DataError("where: what")` or, with
    on_bad_record='skip', are counted in `report`. Stops after `max_samples` samples."""
    for where, raw in raws:
        if max_samples is not None and report.records >= max_samples:
            return
        try:
            if isinstance(raw, DataError):
                raise raw
            sample = to_sample(raw, where, fmt, fields)
        except (ValueError, DataError) as e:
            msg = str(e) if isinstance(e, DataError) else f"{where}: {e}"
            if on_bad_record != "skip":
                raise DataError(msg) from None
            report.skipped += 1
            if len(report.first_skipped) < 3:
                report.first_skipped.append(msg)
            continue
        report.records += 1
        yield sample
