"""Preference pairs as data: the three record forms (TRL's), their two tokenized sides
(only the replies trained, one prompt shared), bad pairs by `file:line` through
`distft validate`, drop/truncate keeping pairs whole, and the cache's `pairs` count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from distft.assets import TinyAssets
from distft.config import DataConfig
from distft.data import IGNORE, Completion, Conversation, DataError, Pair, encode
from distft.data.cache import CacheContext, build_entry, source_specs
from distft.data.formats import ReadReport, parse, to_sample
from distft.data.store import TokenArrays
from distft.data.templates import end_of_turn
from distft.data.tokenize import CHUNK, Encoder, EncodeSettings, TokenizeReport
from tests.bad_input import run as cli
from tests.support import run_cli, tiny_config, write_config
from tests.template_tokenizers import build

Q, A_GOOD, A_BAD = "Reverse these words: cat dog bird.", "bird dog cat.", "cat dog bird."


@pytest.fixture(scope="module")
def tok(tiny: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained(tok: Any, ids: list[int], labels: list[int]) -> str:
    """The trained tokens as text; they must be one contiguous run at the end."""
    on = [i for i, lab in enumerate(labels) if lab != IGNORE]
    assert on == list(range(on[0], on[-1] + 1)), "trained tokens are not one run"
    assert all(labels[i] == ids[i] for i in on)
    return str(tok.decode([ids[i] for i in on]))


def prompt_ids(ids: list[int], labels: list[int]) -> list[int]:
    """The untrained tokens before the first trained one: the prompt."""
    return ids[: next(i for i, lab in enumerate(labels) if lab != IGNORE)]


def sides(tok: Any, record: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    pair = to_sample(record, "p.jsonl:1", "auto", None)
    assert isinstance(pair, Pair)
    return encode(tok, pair, 512, **kw)


# ----------------------------------------------------------------------------- forms


def test_strings_are_two_completions_trained_on_the_answer(tok: Any) -> None:
    record = {"prompt": Q, "chosen": A_GOOD, "rejected": A_BAD}
    pair = to_sample(record, "p.jsonl:1", "auto", None)
    assert pair == Pair("p.jsonl:1", Completion("p.jsonl:1", Q, A_GOOD),
                        Completion("p.jsonl:1", Q, A_BAD))  # fmt: skip
    for train_on in ("assistant", "all"):  # `all` would train a prompt: not in a pair
        (c_ids, c_lab, _), (r_ids, r_lab, _) = sides(tok, record, train_on=train_on)
        assert trained(tok, c_ids, c_lab) == A_GOOD + tok.eos_token
        assert trained(tok, r_ids, r_lab) == A_BAD + tok.eos_token
        prompt = tok(Q).input_ids  # tokenized apart, with the special tokens (BOS)
        assert prompt_ids(c_ids, c_lab) == prompt_ids(r_ids, r_lab) == prompt


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant_turn", "all"])
def test_prompt_messages_train_only_the_final_reply(tok: Any, train_on: str) -> None:
    """Form b, with an earlier assistant turn in the prompt (never trained in a pair), a
    string side and a message-list side."""
    prompt = [msg("user", "Say hi."), msg("assistant", "hi"), msg("user", Q)]
    record = {"prompt": prompt, "system": "Be terse.", "chosen": A_GOOD,
              "rejected": [msg("assistant", A_BAD)]}  # fmt: skip
    (c_ids, c_lab, _), (r_ids, r_lab, _) = sides(tok, record, train_on=train_on)
    eot = end_of_turn(tok)
    assert eot == "<|end|>"
    assert trained(tok, c_ids, c_lab) == A_GOOD + eot
    assert trained(tok, r_ids, r_lab) == A_BAD + eot
    head = [msg("system", "Be terse."), *prompt]
    gen = tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(c_ids, c_lab) == prompt_ids(r_ids, r_lab)
    assert tok.decode(prompt_ids(c_ids, c_lab)) == gen


def test_implicit_prompt_is_the_shared_prefix(tok: Any) -> None:
    """Form c gives the same pair, and tokens, as form b."""
    prompt = [msg("system", "Be terse."), msg("user", Q)]
    implicit = {"chosen": [*prompt, msg("assistant", A_GOOD)],
                "rejected": [*prompt, msg("assistant", A_BAD)]}  # fmt: skip
    explicit = {"prompt": prompt, "chosen": A_GOOD, "rejected": A_BAD}
    a, b = (to_sample(r, "p.jsonl:1", "auto", None) for r in (implicit, explicit))
    assert a == b
    assert isinstance(a, Pair) and isinstance(a.chosen, Conversation)
    assert sides(tok, implicit) == sides(tok, explicit)
    # the `system` field heads both conversations
    with_field = {"system": "Be terse.", "chosen": implicit["chosen"][1:],
                  "rejected": implicit["rejected"][1:]}  # fmt: skip
    assert to_sample(with_field, "p.jsonl:1", "auto", None) == a


def test_a_reply_of_several_turns_trains_its_assistant_turns(tok: Any) -> None:
    prompt = [msg("user", "Say hi."), msg("assistant", "hi"), msg("user", Q)]
    chosen = [msg("assistant", "Which words?"), msg("user", "cat dog bird"),
              msg("assistant", A_GOOD)]  # fmt: skip
    record = {"prompt": prompt, "chosen": chosen, "rejected": A_BAD}
    (c_ids, c_lab, _), (r_ids, r_lab, _) = sides(tok, record)
    hidden = [i if lab != IGNORE else tok.pad_token_id for i, lab in zip(c_ids, c_lab, strict=True)]
    runs = tok.decode(hidden)
    pieces = [p for p in runs.split(tok.pad_token) if p]
    assert pieces == ["Which words?<|end|>", A_GOOD + "<|end|>"]
    assert trained(tok, r_ids, r_lab) == A_BAD + "<|end|>"
    assert prompt_ids(c_ids, c_lab) == prompt_ids(r_ids, r_lab)


def test_detection_formats_and_renamed_fields() -> None:
    record = {"question": Q, "good": A_GOOD, "bad": A_BAD}
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pair = to_sample(record, "p:1", "auto", fields)
    assert pair == to_sample(record, "p:1", "preference", fields)
    assert pair == Pair("p:1", Completion("p:1", Q, A_GOOD), Completion("p:1", Q, A_BAD))
    # chosen/rejected win over the other formats' fields
    both = {"prompt": Q, "completion": A_GOOD, "chosen": A_GOOD, "rejected": A_BAD}
    assert isinstance(to_sample(both, "p:1", "auto", None), Pair)
    with pytest.raises(ValueError, match="^missing field 'chosen'"):
        to_sample({"prompt": Q, "completion": "x"}, "p:1", "preference", None)
    cfg = {"train_files": ["x"], "format": "preference", "fields": {"chosen": "good"}}
    assert DataConfig.model_validate(cfg).format == "preference"


# ----------------------------------------------------------------------------- bad pairs

CONV = [msg("user", Q), msg("assistant", A_GOOD)]
BAD_PAIRS = {
    "missing side": ({"prompt": Q, "chosen": A_GOOD},
                     "missing field 'rejected': a preference pair needs both sides"),
    "identical": ({"prompt": Q, "chosen": A_GOOD, "rejected": A_GOOD},
                  "'chosen' and 'rejected' are identical: nothing to prefer"),
    "identical conversations": ({"chosen": CONV, "rejected": CONV},
                                "'chosen' and 'rejected' are identical: nothing to prefer"),
    "empty response": ({"prompt": Q, "chosen": A_GOOD, "rejected": "  "},
                       "field 'rejected': empty response"),
    "empty reply message": ({"prompt": [msg("user", Q)], "chosen": A_GOOD,
                             "rejected": [msg("assistant", "")]}, "'rejected': empty response"),
    "prompt ends with the assistant": (
        {"prompt": CONV, "chosen": A_GOOD, "rejected": A_BAD},
        "field 'prompt': the prompt must end with a user turn"),
    "no shared prefix": (
        {"chosen": CONV, "rejected": [msg("user", "Other?"), msg("assistant", A_BAD)]},
        "'chosen' and 'rejected' differ at message 0 (user), before their final assistant "
        "replies: a pair's sides share their prompt"),
    "a side without a reply": (
        {"chosen": CONV, "rejected": [*CONV, msg("user", "More?"), msg("assistant", A_BAD)]},
        "'chosen' has no reply after the messages it shares with 'rejected'"),
    "roles that do not alternate": (
        {"prompt": [msg("user", Q), msg("user", Q)], "chosen": A_GOOD, "rejected": A_BAD},
        "prompt[1].role: 'user' where the assistant turn belongs; after an optional first "
        "system message, turns alternate user, assistant, ..."),
    "a reply ending with the user": (
        {"prompt": [msg("user", Q)], "chosen": A_GOOD,
         "rejected": [msg("assistant", A_BAD), msg("user", "ok")]},
        "'rejected': the reply must end with an assistant message"),
    "string sides without a prompt": (
        {"chosen": A_GOOD, "rejected": A_BAD},
        "missing field 'prompt': string sides need a prompt (or give 'chosen' and 'rejected' "
        "as two whole conversations)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_bad_pairs_are_refused(case: str) -> None:
    record, message = BAD_PAIRS[case]
    with pytest.raises(ValueError) as e:
        to_sample(record, "p:1", "auto", None)
    assert str(e.value) == message


@pytest.fixture(scope="module")
def validate_config(tiny: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("pairs_validate")

    def config(data: Path, **overrides: Any) -> Path:
        cfg = tiny_config(tiny, root / "out")
        cfg["data"].update(train_files=[str(data)], eval_files=[],
                           cache_dir=str(root / "cache"), **overrides)  # fmt: skip
        return write_config(data.with_suffix(".yaml"), cfg)

    return config


def test_validate_names_each_bad_pair_in_one_line(validate_config: Any, tmp_path: Path) -> None:
    """Every bad-pair case, each behind a good pair: `error: file:2: ...`, exit 2 (the
    CLI in process: a fresh interpreter a case costs ~20 s here; the subprocess path is
    `test_validate_encodes_pairs`)."""
    good = {"prompt": Q, "chosen": A_GOOD, "rejected": A_BAD}
    failures = []
    for i, (record, message) in enumerate(BAD_PAIRS.values()):
        data = write(tmp_path / f"bad{i}.jsonl", [good, record])
        result = cli("validate", str(validate_config(data)))
        lines = [x for x in result.stderr.splitlines() if x.strip()]
        if result.code != 2 or lines != [f"error: {data}:2: {message}"]:
            failures.append((result.code, lines))
    assert failures == []


def test_validate_encodes_pairs(validate_config: Any, tmp_path: Path) -> None:
    """Encoding errors of one side name the pair and the side; a mixed source is refused;
    with `on_bad_record: skip` a bad pair is skipped and validation passes."""
    long_prompt = " ".join(["cat dog bird"] * 200)
    good = {"prompt": Q, "chosen": A_GOOD, "rejected": A_BAD}
    data = write(tmp_path / "enc.jsonl",
                 [good, {"prompt": long_prompt, "chosen": "a", "rejected": "b"}])  # fmt: skip
    proc = run_cli("validate", str(validate_config(data, max_seq_len=64)))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [x for x in proc.stderr.splitlines() if x.strip()] == [
        f"error: {data}:2: chosen: no trainable tokens after truncation to max_seq_len"
    ]
    write(data, [good, good, {"prompt": Q, "completion": A_GOOD}])
    proc = run_cli("validate", str(validate_config(data, max_seq_len=64)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {data}:3: a single sample in a source of preference pairs; a source holds one kind"
    )
    proc = run_cli("validate", str(validate_config(data, max_seq_len=64)),
                   "data.on_bad_record=skip")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- length


def pair_records(n: int, long_every: int = 0, side: str = "rejected") -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        words = " ".join(["cat dog bird"] * (60 if long_every and i % long_every == 1 else 1))
        rec = {"prompt": f"{Q} {i}", "chosen": f"{A_GOOD} {i}", "rejected": f"{A_BAD} {i}"}
        if words != "cat dog bird":
            rec[side] = words
        out.append(
            rec
            if i % 2
            else {
                "prompt": [msg("user", rec["prompt"])],
                "chosen": rec["chosen"],
                "rejected": rec["rejected"],
            }
        )
    return out  # fmt: skip


def encode_file(tok: Any, path: Path, too_long: str, on_bad: str = "error") -> tuple[list, Any]:
    read, report = ReadReport(), TokenizeReport()
    samples = parse([(f"{path}:{i + 1}", r) for i, r in enumerate(json.loads(path.read_text()))],
                    "auto", None, on_bad, read)  # fmt: skip
    encoder = Encoder(tok, EncodeSettings(64, too_long=too_long))
    rows = list(encoder.encode_many(samples, on_bad, report))
    return rows, report


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_drop_and_truncate_keep_pairs_whole(tok: Any, tmp_path: Path, side: str) -> None:
    """More pairs than a chunk, every 7th with one side too long. Drop: both sides go (one
    count); truncate: both stay, each cut on its own. Rows alternate chosen, rejected."""
    n = CHUNK + 40
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pair_records(n, long_every=7, side=side)))
    long = {i for i in range(n) if i % 7 == 1}
    dropped, report = encode_file(tok, path, "drop")
    assert (len(dropped), report.dropped, report.pairs) == (2 * (n - len(long)), len(long),
                                                            n - len(long))  # fmt: skip
    kept = [i for i in range(n) if i not in long]
    for k, i in enumerate(kept):
        (c_ids, c_lab), (r_ids, r_lab) = dropped[2 * k], dropped[2 * k + 1]
        assert trained(tok, list(c_ids), list(c_lab)).startswith(f"{A_GOOD} {i}")
        assert trained(tok, list(r_ids), list(r_lab)).startswith(f"{A_BAD} {i}")
    cut, report = encode_file(tok, path, "truncate")
    assert (len(cut), report.truncated, report.dropped, report.pairs) == (2 * n, len(long), 0, n)
    lengths = np.array([len(ids) for ids, _ in cut]).reshape(n, 2)
    which = ["chosen", "rejected"].index(side)
    assert (lengths[sorted(long), which] == 64).all() and (lengths <= 64).all()
    assert (lengths[sorted(long), 1 - which] < 64).all()  # the other side is not cut
    # the chunked path gives what pairs one at a time give
    one = [row for s in parse([(f"{path}:1", json.loads(path.read_text())[3])], "auto", None,
                              "error", ReadReport())
           for row in encode(tok, s, 64)]  # fmt: skip
    assert [(list(a), list(b)) for a, b in cut[6:8]] == [(ids, lab) for ids, lab, _ in one]


def test_a_bad_side_loses_the_pair_once(tok: Any, tmp_path: Path) -> None:
    records = pair_records(5)
    records[2]["prompt"] = " ".join(["cat dog bird"] * 60)  # no room left for either reply
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    rows, report = encode_file(tok, path, "truncate", on_bad="skip")
    assert (len(rows), report.skipped, report.pairs) == (8, 1, 4)
    assert report.first_skipped == [f"{path}:3: chosen: no trainable tokens after truncation "
                                    "to max_seq_len"]  # fmt: skip
    with pytest.raises(DataError, match=rf"^{path}:3: chosen: no trainable tokens"):
        encode_file(tok, path, "truncate")


# ----------------------------------------------------------------------------- cache


def test_cache_stores_pairs_as_row_pairs(tok: Any, tmp_path: Path) -> None:
    n = 9
    path = write(tmp_path / "pairs.jsonl", pair_records(n))
    data = DataConfig.model_validate({"train_files": [str(path)]})
    ctx = CacheContext.create(tok, EncodeSettings(64), "error", tmp_path / "cache")
    (spec,) = source_specs(data, "train")
    result = build_entry(spec, ctx)
    assert (result.meta["pairs"], result.meta["samples"], result.meta["records"]) == (n, 2 * n, n)
    arrays, meta = TokenArrays.load(result.path)
    assert meta["pairs"] == n and len(arrays) == 2 * n
    samples = list(parse(spec.raws(), "auto", None, "error", ReadReport()))
    for k, pair in enumerate(samples):
        for j, (ids, labels, _) in enumerate(encode(tok, pair, 64)):
            a, b = arrays.offsets[2 * k + j], arrays.offsets[2 * k + j + 1]
            assert arrays.ids[a:b].tolist() == ids and arrays.labels[a:b].tolist() == labels
    # an explicit format is another entry; a source of single samples counts no pairs
    cfg = {"train_files": [str(path)], "format": "preference"}
    (explicit,) = source_specs(DataConfig.model_validate(cfg), "train")
    assert ctx.key(explicit) != ctx.key(spec)
    sft = write(tmp_path / "sft.jsonl", [{"prompt": Q, "completion": A_GOOD}])
    (sft_spec,) = source_specs(DataConfig.model_validate({"train_files": [str(sft)]}), "train")
    assert build_entry(sft_spec, ctx).meta["pairs"] == 0


def test_preprocess_builds_a_preference_source(validate_config: Any, tmp_path: Path) -> None:
    data = write(tmp_path / "pre.jsonl", pair_records(16))  # a global batch: 16 pairs
    dpo = "objective.method=dpo"  # an SFT run refuses a source of pairs (test_preference)
    proc = run_cli("preprocess", str(validate_config(data)), "data.batching=padded", dpo)
    assert proc.returncode == 0, proc.stderr
    assert "32 samples (16 preference pairs)" in proc.stdout + proc.stderr
    write(data, [*pair_records(3), BAD_PAIRS["identical"][0]])
    proc = run_cli("preprocess", str(validate_config(data)), "data.batching=padded", dpo)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {data}:4: 'chosen' and 'rejected' are identical: nothing to prefer"
    )


# ----------------------------------------------------------------------------- a real template


def test_a_pair_with_a_real_chat_template() -> None:
    """Llama-3.1's template: each side's untrained prefix is the prompt's inference render
    (generation prompt included), its trained tokens the reply and `<|eot_id|>`."""
    tok = build("llama-3.1")
    prompt = [msg("system", "You are a terse assistant."), msg("user", "Sort 3 1 2.")]
    record = {"prompt": prompt, "chosen": "1 2 3.", "rejected": "3 1 2."}
    (c_ids, c_lab, _), (r_ids, r_lab, _) = sides(tok, record)
    gen = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    for ids, labels, answer in ((c_ids, c_lab, "1 2 3."), (r_ids, r_lab, "3 1 2.")):
        assert trained(tok, ids, labels) == answer + "<|eot_id|>"
        assert tok.decode(prompt_ids(ids, labels)) == gen
    assert prompt_ids(c_ids, c_lab) == prompt_ids(r_ids, r_lab)
