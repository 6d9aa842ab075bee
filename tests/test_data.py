"""distft.data: records -> conversations, assistant-only label masking, and collate.
(The sampler is in test_data_sampler.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from distft.assets import SYSTEM_PROMPT, TinyAssets, build_tiny_assets
from distft.data import (
    IGNORE,
    Conversation,
    DataError,
    collate,
    encode,
    read_conversations,
)
from distft.data.formats import ReadReport, Sample
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport

N_TRAIN, N_EVAL = 200, 20
ROLES_TUPLE = "('system', 'user', 'assistant')"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    root = tmp_path_factory.mktemp("data") / "tiny"
    return build_tiny_assets(root, n_train=N_TRAIN, n_eval=N_EVAL)


@pytest.fixture(scope="module")
def tok(assets: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(assets.model_dir)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def line(obj: Any) -> str:
    return json.dumps(obj)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- records


def test_instruction_with_and_without_input(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "i.jsonl",
        [
            line({"instruction": "Add them.", "input": "2 + 3", "output": "5"}),
            line({"instruction": "What is 1 plus 1?", "output": "2"}),
            line({"instruction": "Say hi.", "input": "", "output": "hi"}),
            line({"instruction": "Say yo.", "input": None, "output": "yo"}),
        ],
    )
    convs, report = read_conversations([str(p)], "instruction")
    assert report == ReadReport(records=4, skipped=0)
    assert [c.source for c in convs] == [f"{p}:{i}" for i in range(1, 5)]
    assert [c.messages for c in convs] == [
        [msg("user", "Add them.\n\n2 + 3"), msg("assistant", "5")],
        [msg("user", "What is 1 plus 1?"), msg("assistant", "2")],
        [msg("user", "Say hi."), msg("assistant", "hi")],
        [msg("user", "Say yo."), msg("assistant", "yo")],
    ]


def test_chat_with_system_and_multiple_turns(tmp_path: Path) -> None:
    messages = [
        msg("system", "Be brief."),
        msg("user", "Hi"),
        msg("assistant", "Hello"),
        msg("user", "Again"),
        msg("assistant", "Hello again"),
    ]
    p = write_lines(tmp_path / "c.jsonl", [line({"messages": messages})])
    convs, report = read_conversations([str(p)], "chat")
    assert report == ReadReport(records=1, skipped=0)
    assert convs == [Conversation(f"{p}:1", messages)]


def test_auto_detects_each_record_and_keeps_line_numbers(tmp_path: Path) -> None:
    p = write_lines(
        tmp_path / "mixed.jsonl",
        [
            line({"instruction": "Do it.", "output": "done"}),
            "",  # blank lines are skipped but still counted for line numbers
            line({"messages": [msg("user", "q"), msg("assistant", "a")]}),
        ],
    )
    convs, _ = read_conversations([str(p)])
    assert convs == [
        Conversation(f"{p}:1", [msg("user", "Do it."), msg("assistant", "done")]),
        Conversation(f"{p}:3", [msg("user", "q"), msg("assistant", "a")]),
    ]


def test_explicit_format_mismatch_is_an_error(tmp_path: Path) -> None:
    chat = write_lines(tmp_path / "c.jsonl", [line({"messages": [msg("assistant", "a")]})])
    inst = write_lines(tmp_path / "i.jsonl", [line({"instruction": "x", "output": "y"})])
    with pytest.raises(DataError) as e:
        read_conversations([str(chat)], "instruction")
    assert str(e.value) == f"{chat}:1: missing field 'instruction'"
    with pytest.raises(DataError) as e:
        read_conversations([str(inst)], "chat")
    assert str(e.value) == f"{inst}:1: field 'messages' must be a non-empty list"


def test_json_array_file(tmp_path: Path) -> None:
    items = [
        {"instruction": "A", "output": "a"},
        {"messages": [msg("user", "B"), msg("assistant", "b")]},
    ]
    p = tmp_path / "arr.json"
    p.write_text(json.dumps(items, indent=2), encoding="utf-8")
    convs, report = read_conversations([str(p)])
    assert report == ReadReport(records=2, skipped=0)
    assert convs == [
        Conversation(f"{p}:1", [msg("user", "A"), msg("assistant", "a")]),
        Conversation(f"{p}:2", [msg("user", "B"), msg("assistant", "b")]),
    ]
    # a bad item is named by its 1-based position in the array
    p.write_text(json.dumps([items[0], {"instruction": "C"}]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations([str(p)])
    assert str(e.value) == f"{p}:2: missing field 'output'"
    # a broken JSON document names the line of the syntax error
    p.write_text('[\n  {"instruction": "A", "output": "a"},\n  {oops}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations([str(p)])
    assert str(e.value).startswith(f"{p}:3: invalid JSON (")


def test_a_one_line_json_object_file_is_read_as_jsonl(tmp_path: Path) -> None:
    p = write_lines(tmp_path / "one.json", [line({"instruction": "A", "output": "a"})])
    convs, _ = read_conversations([str(p)])
    assert convs == [Conversation(f"{p}:1", [msg("user", "A"), msg("assistant", "a")])]


BAD_RECORDS = [
    pytest.param('{"instruction": "x", "output": ', "invalid JSON (", id="malformed-json"),
    pytest.param(line({"instruction": "x"}), "missing field 'output'", id="missing-output"),
    pytest.param(line({"output": "y"}), "missing field 'instruction'", id="missing-instruction"),
    pytest.param(
        line({"instruction": "x", "output": 3}),
        "field 'output' must be a string, got int",
        id="output-int",
    ),
    pytest.param(
        line({"instruction": "x", "input": ["a"], "output": "y"}),
        "field 'input' must be a string, got list",
        id="input-list",
    ),
    pytest.param(
        line({"messages": [msg("robot", "beep"), msg("assistant", "a")]}),
        f"messages[0].role: unknown role 'robot'; allowed: {ROLES_TUPLE}",
        id="unknown-role",
    ),
    pytest.param(
        line({"messages": [msg("user", "q"), {"content": "a"}]}),
        f"messages[1].role: unknown role None; allowed: {ROLES_TUPLE}",
        id="missing-role",
    ),
    pytest.param(
        line({"messages": [msg("user", "q"), {"role": "assistant"}]}),
        "missing field 'content'",
        id="missing-content",
    ),
    pytest.param(
        line({"messages": [msg("user", "q"), "a"]}),
        "messages[1] must be an object with 'role' and 'content'",
        id="message-not-object",
    ),
    pytest.param(
        line({"messages": []}), "field 'messages' must be a non-empty list", id="empty-messages"
    ),
    pytest.param(
        line({"messages": "hi"}), "field 'messages' must be a non-empty list", id="messages-str"
    ),
    pytest.param(
        line({"messages": [msg("system", "s"), msg("user", "q")]}),
        "no assistant message: nothing to train on",
        id="no-assistant",
    ),
    pytest.param(line([1, 2]), "expected a JSON object, got list", id="array-line"),
    pytest.param(line("text"), "expected a JSON object, got str", id="string-line"),
    pytest.param(
        line({"question": "x", "answer": "y"}),
        "cannot tell the format: expected 'messages', 'conversations', 'instruction'/'output', "
        "'prompt'/'completion', 'text' or 'input_ids'",
        id="unknown-format",
    ),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path: Path, bad: str, expected: str) -> None:
    good = line({"instruction": "x", "output": "y"})
    p = write_lines(tmp_path / "d.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as e:
        read_conversations([str(p)])
    text = str(e.value)
    assert text.startswith(f"{p}:3: ")
    if expected.endswith("("):
        assert text.startswith(f"{p}:3: {expected}") and text.endswith(")")
    else:
        assert text == f"{p}:3: {expected}"


def test_skip_counts_bad_records_and_keeps_the_good_ones(tmp_path: Path) -> None:
    bad = [b.values[0] for b in BAD_RECORDS]
    lines: list[str] = []
    for i, b in enumerate(bad):
        lines += [line({"instruction": f"q{i}", "output": f"a{i}"}), b]
    p = write_lines(tmp_path / "d.jsonl", lines)
    convs, report = read_conversations([str(p)], on_bad_record="skip")
    assert report == ReadReport(records=len(bad), skipped=len(bad))
    assert [c.source for c in convs] == [f"{p}:{2 * i + 1}" for i in range(len(bad))]
    assert [c.messages[1]["content"] for c in convs] == [f"a{i}" for i in range(len(bad))]
    # the default is to stop at the first bad record
    with pytest.raises(DataError, match=rf"^{p}:2: "):
        read_conversations([str(p)])


def test_multiple_files_in_order(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", [line({"instruction": "A", "output": "a"})])
    b = write_lines(tmp_path / "b.jsonl", [line({"instruction": "B", "output": "b"})])
    convs, report = read_conversations([str(b), str(a)])
    assert [c.source for c in convs] == [f"{b}:1", f"{a}:1"]
    assert report.records == 2


def test_only_bad_records_under_skip_is_an_error(tmp_path: Path) -> None:
    a = write_lines(tmp_path / "a.jsonl", ["{", line({"instruction": "x"})])
    b = write_lines(tmp_path / "b.jsonl", [])
    with pytest.raises(DataError) as e:
        read_conversations([str(a), str(b)], on_bad_record="skip")
    assert str(e.value) == f"{a}, {b}: no usable records"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as e:
            read_conversations([str(missing)], on_bad_record=mode)
        assert str(e.value) == f"{missing}: data file not found"


def test_asset_files_read_as_matching_conversations(assets: TinyAssets) -> None:
    inst, r1 = read_conversations([str(assets.train_file)], "auto")
    chat, r2 = read_conversations([str(assets.chat_train_file)], "auto")
    assert r1 == r2 == ReadReport(records=N_TRAIN, skipped=0)
    records = read_jsonl(assets.train_file)
    for rec, ic, cc in zip(records, inst, chat, strict=True):
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec["input"] else "")
        assert ic.messages == [msg("user", prompt), msg("assistant", rec["output"])]
        turns = [m for m in cc.messages if m["role"] != "system"]
        assert turns[:2] == ic.messages  # the chat file holds the same first exchange
        assert [m for m in cc.messages if m["role"] == "system"] in (
            [],
            [msg("system", SYSTEM_PROMPT)],
        )


# ----------------------------------------------------------------------------- masking


def encode_all(
    tok: Any, samples: list[Sample], max_seq_len: int, on_bad_record: str, **settings: Any
) -> tuple[dict[str, list[list[int]]], TokenizeReport]:
    report = TokenizeReport()
    encoder = Encoder(tok, EncodeSettings(max_seq_len, **settings))
    rows = list(encoder.encode_many(samples, on_bad_record, report))
    columns = {"input_ids": [r[0].tolist() for r in rows], "labels": [r[1].tolist() for r in rows]}
    return columns, report


def labelled_runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of tokens that carry a label."""
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels, strict=True):
        on = lab != IGNORE
        if on:
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = on
    return [tok.decode(r) for r in runs]


MULTI_TURN = [
    msg("system", "You are terse."),
    msg("user", "Reverse: cat dog"),
    msg("assistant", "dog cat"),
    msg("user", "Now sort 3 1 2"),
    msg("assistant", "1 2 3"),
    msg("user", "Thanks"),
    msg("assistant", "You are welcome."),
]


def test_only_assistant_turns_and_their_end_token_are_trained(tok: Any) -> None:
    conv = Conversation("chat.jsonl:7", MULTI_TURN)
    ids, labels, truncated = encode(tok, conv, max_seq_len=1024)
    assert not truncated
    text = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tok.decode(ids) == text  # one tokenization of the whole rendered string
    # each turn's content and its end-of-turn token "<|end|>"; the template's "\n" after
    # it is not generated by the model, so it is not trained
    assert labelled_runs(tok, ids, labels) == [
        "dog cat<|end|>",
        "1 2 3<|end|>",
        "You are welcome.<|end|>",
    ]
    masked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    assert masked == (
        "<|bos|><|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nReverse: cat dog<|end|>\n<|assistant|>\n\n"
        "<|user|>\nNow sort 3 1 2<|end|>\n<|assistant|>\n\n"
        "<|user|>\nThanks<|end|>\n<|assistant|>\n\n"
    )
    for i, lab in zip(ids, labels, strict=True):
        assert lab in (IGNORE, i)
    header_ids = set(tok.convert_tokens_to_ids(["<|bos|>", "<|system|>", "<|user|>"]))
    header_ids.add(tok.convert_tokens_to_ids("<|assistant|>"))
    assert all(lab == IGNORE for i, lab in zip(ids, labels, strict=True) if i in header_ids)
    end = tok.convert_tokens_to_ids("<|end|>")
    trained_ends = [lab for i, lab in zip(ids, labels, strict=True) if i == end and lab != IGNORE]
    assert len(trained_ends) == 3  # the assistant's three, not the system's or users'


def test_masking_on_every_asset_record(tok: Any, assets: TinyAssets) -> None:
    for path in (assets.train_file, assets.chat_train_file):
        convs, _ = read_conversations([str(path)])
        columns, report = encode_all(tok, convs, max_seq_len=1024, on_bad_record="error")
        assert (report.truncated, report.skipped) == (0, 0)
        assert len(columns["input_ids"]) == N_TRAIN
        multi = 0
        for conv, ids, labels in zip(convs, columns["input_ids"], columns["labels"], strict=True):
            answers = [m["content"] + "<|end|>" for m in conv.messages if m["role"] == "assistant"]
            multi += len(answers) > 1
            assert labelled_runs(tok, ids, labels) == answers, conv.source
        if path == assets.chat_train_file:
            assert multi > 0  # multi-turn conversations were exercised


def test_truncation_keeps_max_seq_len_tokens(tok: Any) -> None:
    conv = Conversation("t.jsonl:1", MULTI_TURN)
    full_ids, full_labels, _ = encode(tok, conv, max_seq_len=1024)
    n = len(full_ids) - 5
    ids, labels, truncated = encode(tok, conv, max_seq_len=n)
    assert truncated
    assert len(ids) == len(labels) == n
    assert (ids, labels) == (full_ids[:n], full_labels[:n])
    # exactly the length is not truncated
    ids, _, truncated = encode(tok, conv, max_seq_len=len(full_ids))
    assert not truncated and ids == full_ids


def test_assistant_cut_entirely_by_truncation(tok: Any) -> None:
    conv = Conversation(
        "long.jsonl:12", [msg("user", "word " * 40), msg("assistant", "short answer")]
    )
    ids, labels, _ = encode(tok, conv, max_seq_len=1024)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    with pytest.raises(DataError) as e:
        encode(tok, conv, max_seq_len=first)
    assert str(e.value) == "long.jsonl:12: no trainable tokens after truncation to max_seq_len"
    # one more token keeps exactly one target
    ids1, labels1, truncated = encode(tok, conv, max_seq_len=first + 1)
    assert truncated and sum(lab != IGNORE for lab in labels1) == 1
    assert labels1[first] == ids[first]

    good = Conversation("long.jsonl:13", [msg("user", "hi"), msg("assistant", "ok")])
    columns, report = encode_all(tok, [conv, good], max_seq_len=first, on_bad_record="skip")
    assert (report.skipped, report.truncated) == (1, 0)
    assert columns["input_ids"] == [encode(tok, good, first)[0]]
    with pytest.raises(DataError, match=r"^long\.jsonl:12: no trainable tokens"):
        encode_all(tok, [conv, good], max_seq_len=first, on_bad_record="error")
    columns, report = encode_all(tok, [conv], max_seq_len=first, on_bad_record="skip")
    assert columns["input_ids"] == [] and report.skipped == 1


def test_encode_all_counts_truncated(tok: Any) -> None:
    short = Conversation("s:1", [msg("user", "hi"), msg("assistant", "ok")])
    long = Conversation("s:2", [msg("user", "hi"), msg("assistant", "a long answer " * 10)])
    n = len(encode(tok, short, 1024)[0])
    columns, report = encode_all(tok, [short, long], max_seq_len=n, on_bad_record="error")
    assert (report.truncated, report.skipped) == (1, 0)
    assert [len(x) for x in columns["input_ids"]] == [n, n]


# ----------------------------------------------------------------------------- collate


def test_collate_right_pads_without_a_mask(tok: Any) -> None:
    pad = tok.pad_token_id
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, 10, 11, IGNORE]},
    ]
    b = collate(rows, pad)
    assert b.input_ids.tolist() == [[5, 6, 7, pad, pad], [8, 9, 10, 11, 12]]
    assert b.labels.tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 10, 11, IGNORE]]
    # right padding needs no mask (causal attention never looks right): fast SDPA path
    assert b.attention_mask is None and b.position_ids is None
    assert b.input_ids.dtype == b.labels.dtype == torch.long
    assert b.n_targets == 4
    assert b.n_tokens == 8


def test_collate_equal_lengths_has_no_mask() -> None:
    rows = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3]},  # a label at position 0 is no target
        {"input_ids": [4, 5, 6], "labels": [IGNORE, IGNORE, 6]},
    ]
    b = collate(rows, pad_id=0)
    assert b.attention_mask is None
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert b.n_targets == 3
    assert b.n_tokens == 6
    moved = b.to(torch.device("cpu"))
    assert moved.attention_mask is None and torch.equal(moved.labels, b.labels)
