"""Record formats -> samples. Every format becomes one of five sample kinds:

- `Conversation` (messages with roles): `instruction` (alpaca: `instruction`, optional
  `input` and `system`, `output`) and `chat` (`messages` of `role`/`content`, or the
  sharegpt spelling `conversations` of `from`/`value` with roles human/gpt/system);
- `Completion`: `prompt_completion` (`prompt`, `completion`; trained on the completion);
- `Text`: `text` (continued pre-training: every token is trained);
- `Tokens`: `tokenized` (`input_ids`, optional `labels`);
- `Pair`: `preference` (`chosen` and `rejected`, TRL's forms; see `distft.data.preference`):
  two sides, each a `Completion` or a `Conversation`, sharing one prompt.

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


@dataclass(frozen=True)
class Pair:
    """A preference pair: two answers to one prompt. Both sides are the same kind; a
    conversation side is the shared prompt messages followed by its reply."""

    source: str
    chosen: Conversation | Completion
    rejected: Conversation | Completion


Sample = Conversation | Completion | Text | Tokens | Pair


@dataclass
class ReadReport:
    records: int = 0
    skipped: int = 0
    pairs: int = 0  # records that are preference pairs (a source is all pairs or none)
    first_skipped: list[str] = field(default_factory=list, compare=False)


class Fields:
    def __init__(self, fields: dict[str, str] | None):
        self._map = fields or {}

    def __call__(self, canonical: str) -> str:
        return self._map.get(canonical, canonical)


def field_text(record: dict[str, Any], key: str, required: bool = True) -> str:
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


def _detect(record: dict[str, Any], f: Fields) -> str:
    if f("chosen") in record or f("rejected") in record:  # a missing side: a bad pair
        return "preference"
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


def _instruction(record: dict[str, Any], f: Fields) -> list[dict[str, str]]:
    prompt = field_text(record, f("instruction"))
    extra = field_text(record, f("input"), required=False)
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    system = field_text(record, f("system"), required=False)
    head = [{"role": "system", "content": system}] if system else []
    return [
        *head,
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": field_text(record, f("output"))},
    ]


def _chat(record: dict[str, Any], f: Fields) -> list[dict[str, str]]:
    key, role_key, content_key = f("messages"), f("role"), f("content")
    mapping = {r: r for r in ROLES}
    if key not in record and "conversations" in record:  # sharegpt spelling
        key, role_key, content_key = "conversations", "from", "value"
        mapping = SHAREGPT_ROLES
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"field '{key}' must be a non-empty list")
    out = []
    system = field_text(record, f("system"), required=False) if key == "conversations" else ""
    if system:
        out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        out.append(message(m, f"{key}[{i}]", role_key, content_key, mapping))
        check_turn(out, f"{key}[{i}].{role_key}", m[role_key])
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message: nothing to train on")
    return out


def message(
    m: Any, where: str, role_key: str, content_key: str, mapping: dict[str, str]
) -> dict[str, str]:
    """One message of a list (`where`: its place, `key[i]`) as {role, content}."""
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with '{role_key}' and '{content_key}'")
    role = m.get(role_key)
    if role not in mapping:
        raise ValueError(f"{where}.{role_key}: unknown role {role!r}; allowed: {tuple(mapping)}")
    return {"role": mapping[role], "content": field_text(m, content_key)}


ALTERNATION = "after an optional first system message, turns alternate user, assistant, ..."


def check_turn(out: list[dict[str, str]], where: str, spelled: str) -> None:
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


def _tokens(record: dict[str, Any], f: Fields, source: str) -> Tokens:
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
    f = Fields(fields)
    if fmt == "auto":
        fmt = _detect(record, f)
    if fmt == "instruction":
        return Conversation(source, _instruction(record, f))
    if fmt == "chat":
        return Conversation(source, _chat(record, f))
    if fmt == "prompt_completion":
        return Completion(
            source, field_text(record, f("prompt")), field_text(record, f("completion"))
        )
    if fmt == "text":
        text = field_text(record, f("text"))
        if not text:
            raise ValueError(f"field '{f('text')}' is empty")
        return Text(source, text)
    if fmt == "preference":
        from distft.data.preference import to_pair  # it builds on this module's parts

        return to_pair(record, source, f)
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
        if report.records and isinstance(sample, Pair) != (report.pairs > 0):
            _mixed(sample, where, on_bad_record, report)
            continue
        report.records += 1
        report.pairs += isinstance(sample, Pair)
        yield sample


def _mixed(sample: Sample, where: str, on_bad_record: str, report: ReadReport) -> None:
    """A pair in a source of single samples, or the reverse: the cache stores a source's
    rows as pairs (2k, 2k+1) or as single samples, so one kind per source."""
    kinds = ("a preference pair", "single samples") if isinstance(sample, Pair) else (
        "a single sample", "preference pairs")  # fmt: skip
    msg = f"{where}: {kinds[0]} in a source of {kinds[1]}; a source holds one kind"
    if on_bad_record != "skip":
        raise DataError(msg)
    report.skipped += 1
    if len(report.first_skipped) < 3:
        report.first_skipped.append(msg)
