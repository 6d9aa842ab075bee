"""Record formats beyond instruction/chat, field remapping, chat templates, the masking
choices (`train_on`), EOS, `too_long`, and the bad records of every format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from distft.assets import TinyAssets
from distft.data import (
    IGNORE,
    Completion,
    Conversation,
    DataError,
    Text,
    Tokens,
    encode,
    read_conversations,
)
from distft.data.records import file_records
from distft.data.templates import BUILTIN, TemplateError, chat_template
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport


@pytest.fixture(scope="module")
def tok(tiny: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def trained_text(tok: Any, ids: list[int], labels: list[int]) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


# ----------------------------------------------------------------------------- formats


def test_every_format_is_detected_and_read(tmp_path: Path) -> None:
    p = write(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Say hi.", "system": "Be kind.", "output": "hi"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"system": "S", "conversations": [{"from": "user", "value": "q"},
                                              {"from": "assistant", "value": "a"}]},
            {"prompt": "2+2=", "completion": "4"},
            {"text": "plain text for pre-training"},
            {"input_ids": [5, 6, 7]},
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        ],
    )  # fmt: skip
    samples, report = read_conversations([str(p)])
    assert report.records == 7
    src = [f"{p}:{i}" for i in range(1, 8)]
    assert samples == [
        Conversation(src[0], [msg("system", "Be kind."), msg("user", "Say hi."),
                              msg("assistant", "hi")]),
        Conversation(src[1], [msg("user", "q"), msg("assistant", "a")]),
        Conversation(src[2], [msg("system", "S"), msg("user", "q"), msg("assistant", "a")]),
        Completion(src[3], "2+2=", "4"),
        Text(src[4], "plain text for pre-training"),
        Tokens(src[5], [5, 6, 7]),
        Tokens(src[6], [5, 6, 7], [-100, 6, 7]),
    ]  # fmt: skip


def test_field_names_are_remapped(tmp_path: Path) -> None:
    p = write(
        tmp_path / "r.jsonl",
        [
            {"dialog": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]},
            {"question": "Q?", "answer": "A."},
        ],
    )
    fields = {"messages": "dialog", "role": "speaker", "content": "text",
              "instruction": "question", "output": "answer"}  # fmt: skip
    samples, _ = read_conversations([str(p)], fields=fields)
    assert samples[0].messages == [msg("user", "q"), msg("assistant", "a")]
    assert samples[1].messages == [msg("user", "Q?"), msg("assistant", "A.")]
    with pytest.raises(DataError) as e:
        read_conversations([str(p)], "instruction", fields={"instruction": "question"})
    assert str(e.value) == f"{p}:1: missing field 'question'"


BAD = [
    pytest.param("chat", {"conversations": [{"from": "bot", "value": "x"}]},
                 "conversations[0].from: unknown role 'bot'; allowed: "
                 "('system', 'human', 'gpt', 'user', 'assistant')", id="sharegpt-role"),
    pytest.param("chat", {"conversations": [{"from": "human"}]}, "missing field 'value'",
                 id="sharegpt-no-value"),
    pytest.param("chat", {"conversations": [{"from": "human", "value": "q"}]},
                 "no assistant message: nothing to train on", id="sharegpt-no-gpt"),
    pytest.param("prompt_completion", {"prompt": "x"}, "missing field 'completion'",
                 id="no-completion"),
    pytest.param("prompt_completion", {"prompt": 1, "completion": "y"},
                 "field 'prompt' must be a string, got int", id="prompt-int"),
    pytest.param("text", {"text": ""}, "field 'text' is empty", id="empty-text"),
    pytest.param("text", {"body": "x"}, "missing field 'text'", id="no-text"),
    pytest.param("tokenized", {"labels": [1]}, "missing field 'input_ids'", id="no-ids"),
    pytest.param("tokenized", {"input_ids": []},
                 "field 'input_ids' must be a non-empty list of token ids", id="empty-ids"),
    pytest.param("tokenized", {"input_ids": [1, "2"]}, "input_ids[1] must be an integer, got str",
                 id="str-id"),
    pytest.param("tokenized", {"input_ids": [1, True]}, "input_ids[1] must be an integer, got bool",
                 id="bool-id"),
    pytest.param("tokenized", {"input_ids": [1, 2], "labels": [2]},
                 "field 'labels' has 1 entries but 'input_ids' has 2", id="labels-length"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "record", "expected"), BAD)
def test_bad_records_of_every_format(tmp_path: Path, fmt: str, record: Any, expected: str) -> None:
    good = {
        "chat": {"messages": [msg("user", "q"), msg("assistant", "a")]},
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "text": {"text": "t"},
        "tokenized": {"input_ids": [1, 2]},
    }[fmt]
    p = write(tmp_path / "d.jsonl", [good, record, good])
    detectable = {"conversations", "prompt", "completion", "text", "input_ids"} & set(record)
    for as_fmt in (fmt, "auto") if detectable else (fmt,):
        with pytest.raises(DataError) as e:
            read_conversations([str(p)], as_fmt)
        assert str(e.value) == f"{p}:2: {expected}"
    samples, report = read_conversations([str(p)], fmt, on_bad_record="skip")
    assert (len(samples), report.skipped) == (2, 1)
    assert report.first_skipped == [f"{p}:2: {expected}"]


# Line breaks to str.splitlines(), none of them a JSONL line end. The first three are
# legal raw inside a JSON string (json.dumps(ensure_ascii=False) writes them so); the
# control characters are not (a record holding one raw is one bad record, on its own line).
TEXT_BREAKS = ["\u2028", "\u2029", "\x85"]
CONTROL_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def test_jsonl_splits_on_newline_only(tmp_path: Path) -> None:
    """A JSONL record is one `\\n`-terminated line (a trailing `\\r` is dropped): other
    line-break characters inside it keep it whole, and later line numbers stay right."""
    texts = [f"a{c}b" for c in TEXT_BREAKS]
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    lines += ['{"text": "a' + c + 'b"}' for c in CONTROL_BREAKS]
    lines += [json.dumps({"text": "crlf"}) + "\r", "{not json", json.dumps({"text": "end"})]
    p = tmp_path / "breaks.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    raw = p.read_text(encoding="utf-8")
    assert all(c in raw for c in TEXT_BREAKS + CONTROL_BREAKS)  # written raw, not escaped
    n_text, n_ctl = len(TEXT_BREAKS), len(CONTROL_BREAKS)
    good = [*range(1, n_text + 1), n_text + n_ctl + 1, n_text + n_ctl + 3]
    bad = [*range(n_text + 1, n_text + n_ctl + 1), n_text + n_ctl + 2]
    raws = list(file_records(p))
    assert [where for where, _ in raws] == [f"{p}:{i}" for i in range(1, len(lines) + 1)]
    errors = [str(r) for _, r in raws if isinstance(r, DataError)]
    assert [e.split(": invalid JSON (")[0] for e in errors] == [f"{p}:{i}" for i in bad]
    samples, report = read_conversations([str(p)], "text", on_bad_record="skip")
    assert [s.text for s in samples] == [*texts, "crlf", "end"]
    assert [s.source for s in samples] == [f"{p}:{i}" for i in good]
    assert report.skipped == len(bad)


# ----------------------------------------------------------------------------- masking

MULTI = [
    msg("system", "Be terse."),
    msg("user", "Reverse: cat dog"),
    msg("assistant", "dog cat"),
    msg("user", "Sort 3 1 2"),
    msg("assistant", "1 2 3"),
]


def test_train_on_choices(tok: Any) -> None:
    conv = Conversation("c:1", MULTI)
    ids, labels, _ = encode(tok, conv, 1024)
    assert trained_text(tok, ids, labels) == "dog cat<|end|>1 2 3<|end|>"
    ids, labels, _ = encode(tok, conv, 1024, train_on="last_assistant_turn")
    assert trained_text(tok, ids, labels) == "1 2 3<|end|>"
    ids, labels, _ = encode(tok, conv, 1024, train_on="all")
    assert labels[0] == IGNORE and labels[1:] == ids[1:]  # all but the first token


def test_prompt_completion_and_text_end_with_a_trained_eos(tok: Any) -> None:
    eos = tok.eos_token_id
    ids, labels, _ = encode(tok, Completion("p:1", "What is 2+2? ", "four"), 1024)
    assert ids[-1] == eos and labels[-1] == eos
    assert tok.decode(ids) == "What is 2+2? four<|end|>"
    assert trained_text(tok, ids, labels) == "four<|end|>"
    ids, labels, _ = encode(tok, Completion("p:1", "What is 2+2? ", "four"), 1024, train_on="all")
    assert labels[1:] == ids[1:]
    ids, labels, _ = encode(tok, Text("t:1", "cat dog sun"), 1024)
    assert tok.decode(ids) == "cat dog sun<|end|>" and labels[1:] == ids[1:]
    ids, _, _ = encode(tok, Text("t:1", "cat<|end|>"), 1024)
    assert ids.count(eos) == 1  # an EOS already there is not doubled


def test_pretokenized_labels_and_vocabulary_check(tok: Any) -> None:
    ids, labels, _ = encode(tok, Tokens("k:1", [5, 6, 7]), 1024)
    assert (ids, labels) == ([5, 6, 7], [IGNORE, 6, 7])
    ids, labels, _ = encode(tok, Tokens("k:2", [5, 6, 7, 8], [-100, -100, 7, 8]), 3)
    assert (ids, labels) == ([5, 6, 7], [IGNORE, IGNORE, 7])
    with pytest.raises(DataError) as e:
        encode(tok, Tokens("k:3", [5, len(tok)]), 1024)
    assert (
        str(e.value)
        == f"k:3: input_ids[1]: token id {len(tok)} is outside the vocabulary (size {len(tok)})"
    )
    with pytest.raises(DataError) as e:
        encode(tok, Tokens("k:4", [5, 6], [-100, -3]), 1024)
    assert (
        str(e.value) == f"k:4: labels[1]: token id -3 is outside the vocabulary (size {len(tok)})"
    )
    with pytest.raises(DataError, match="^k:5: no trainable tokens in the trained turns$"):
        encode(tok, Tokens("k:5", [5, 6], [5, -100]), 1024)


def test_too_long_truncate_or_drop(tok: Any) -> None:
    short = Conversation("s:1", [msg("user", "hi"), msg("assistant", "ok")])
    long = Conversation("s:2", [msg("user", "hi"), msg("assistant", "a long answer " * 10)])
    n = len(encode(tok, short, 1024)[0])
    for too_long, lengths, counts in (("truncate", [n, n], (1, 0)), ("drop", [n], (0, 1))):
        report = TokenizeReport()
        encoder = Encoder(tok, EncodeSettings(n, too_long=too_long))
        rows = list(encoder.encode_many([short, long, short], "error", report))
        assert [len(r[0]) for r in rows] == [*lengths, n]
        assert (report.truncated, report.dropped, report.skipped) == (*counts, 0)


# ----------------------------------------------------------------------------- templates


def test_tokenizer_without_a_template(tok: Any) -> None:
    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(TemplateError) as e:
        chat_template(bare, "tokenizer")
    assert "has no chat template; set data.chat_template to one of chatml, llama3" in str(e.value)
    encoder = Encoder(bare, EncodeSettings(64))
    conv = Conversation("c:1", [msg("user", "q"), msg("assistant", "a")])
    with pytest.raises(TemplateError):  # a setup problem: never skipped as a bad record
        list(encoder.encode_many([conv], "skip", TokenizeReport()))
    # plain text needs no template
    rows = list(encoder.encode_many([Text("t:1", "cat dog")], "error", TokenizeReport()))
    assert len(rows) == 1


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates(tok: Any, name: str) -> None:
    with pytest.raises(TemplateError, match=f"'{name}' needs the special tokens"):
        chat_template(tok, name)
    extended = AutoTokenizer.from_pretrained(tok.name_or_path)
    extended.chat_template = None
    extended.add_special_tokens({"additional_special_tokens": list(BUILTIN[name][1])})
    template = chat_template(extended, name)
    ids, labels, _ = encode(extended, Conversation("c:1", MULTI), 1024, template=template)
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[name]  # not the newline after it
    assert trained_text(extended, ids, labels) == f"dog cat{end}1 2 3{end}"
    rendered = extended.decode(ids)
    assert rendered.count("dog cat") == 1 and "Be terse." in rendered
