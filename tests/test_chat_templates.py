"""Label masking with real chat templates (tests/fixtures/chat_templates, see sources.md).

The expected training text and trained strings are written here from each template's
format (content + end-of-turn marker, Qwen3's reasoning rules, Mistral's system placement),
located in the text by plain string search, and compared with the labels token by token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distft.data import IGNORE, Conversation, DataError, encode
from distft.data.formats import to_sample
from distft.data.templates import TemplateError
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport
from tests.support import run_cli, tiny_config, write_config
from tests.template_tokenizers import SPECS, build, save

END = {  # the end-of-turn token each template writes after an assistant turn
    "llama-3.1": "<|eot_id|>",
    "qwen2.5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "mistral-v0.3": "</s>",
    "mistral-nemo": "</s>",
    "gemma-2": "<end_of_turn>",
    "phi-3.5": "<|end|>",
}
TRIMS = {"llama-3.1", "mistral-v0.3", "gemma-2"}  # templates that trim the content


def m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = m("system", "You are a terse assistant.")
TURNS = [
    m("user", "What is the capital of France?"),
    m("assistant", "Paris."),
    m("user", "Reverse these words: cat dog bird"),
    m("assistant", "bird dog cat"),
    m("user", "Sort 3 1 2"),
    m("assistant", " 1 2 3\n"),  # whitespace at both ends: trimmed by some templates
]
CASES = {
    "single": TURNS[:2],
    "single_system": [SYSTEM, *TURNS[:2]],
    "multi": TURNS,
    "multi_system": [SYSTEM, *TURNS],
}


def answer(name: str, content: str, last: bool) -> str:
    """The trained text of one assistant turn, from knowledge of the template."""
    if name == "qwen3" and "</think>" in content:
        reasoning, _, rest = content.partition("</think>")
        reasoning = reasoning.split("<think>")[-1].strip("\n")
        rest = rest.lstrip("\n")
        # the last turn keeps its reasoning (after the template's "<think>\n"), earlier
        # turns are rendered without it
        text = f"{reasoning}\n</think>\n\n{rest}" if last else rest
        return text + END[name]
    return (content.strip() if name in TRIMS else content) + END[name]


def expected_text(name: str, tok: Any, messages: list[dict[str, str]]) -> str:
    """The training text: the template's render, except Mistral with a system prompt, whose
    template puts the system prompt into the last user message only (at inference)."""
    if name.startswith("mistral") and messages[0]["role"] == "system":
        prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert messages[0]["content"] in prompt
        space = " " if name == "mistral-v0.3" else ""
        return prompt + space + answer(name, messages[-1]["content"], True)
    return tok.apply_chat_template(messages, tokenize=False)


def expected_spans(name: str, text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """Each assistant turn's trained text, found after the user message before it."""
    spans, pos = [], 0
    last = max(i for i, x in enumerate(messages) if x["role"] == "assistant")
    for i, msg in enumerate(messages):
        if msg["role"] == "user":
            pos = text.index(msg["content"].strip(), pos) + len(msg["content"].strip())
        elif msg["role"] == "assistant":
            want = answer(name, msg["content"], i == last)
            start = text.index(want, pos)
            assert text.count(want, pos) == 1, (want, text[pos:])
            spans.append((start, start + len(want)))
            pos = start + len(want)
    return spans


def expected_labels(tok: Any, text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Token ids where the token has a character inside a span; IGNORE elsewhere and at 0."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        hit = any(a < e and s < b for s, e in spans)
        labels.append(tid if hit else IGNORE)
    labels[0] = IGNORE
    return labels


def trained_runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE and not prev:
            runs.append([])
        if lab != IGNORE:
            runs[-1].append(i)
        prev = lab != IGNORE
    return [tok.decode(r) for r in runs]


def check(name: str, messages: list[dict[str, str]], train_on: str = "assistant") -> list[str]:
    tok = build(name)
    ids, labels, truncated = encode(
        tok, Conversation("chat.jsonl:7", messages), 4096, train_on=train_on
    )
    assert not truncated
    text = expected_text(name, tok, messages)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    spans = expected_spans(name, text, messages)
    if train_on == "last_assistant_turn":
        spans = spans[-1:]
    want = expected_labels(tok, text, spans if train_on != "all" else [(0, len(text))])
    assert labels == want, list(zip(tok.convert_ids_to_tokens(ids), labels, want, strict=True))
    return trained_runs(tok, ids, labels)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(set(SPECS) - {"gemma-2"}))
def test_trained_tokens_are_exactly_the_assistant_turns(name: str, case: str) -> None:
    runs = check(name, CASES[case])
    n = sum(x["role"] == "assistant" for x in CASES[case])
    assert len(runs) == n and all(r.rstrip().endswith(END[name]) for r in runs), runs


@pytest.mark.parametrize("case", ["single", "multi"])
def test_gemma2_without_system(case: str) -> None:
    assert check("gemma-2", CASES[case])[0] == "Paris.<end_of_turn>"


def test_readable_runs_llama_and_mistral() -> None:
    assert check("llama-3.1", CASES["multi_system"]) == [
        "Paris.<|eot_id|>",
        "bird dog cat<|eot_id|>",
        "1 2 3<|eot_id|>",
    ]
    # the template's space before the answer merges into the first word's token: trained
    assert check("mistral-v0.3", CASES["single_system"]) == [" Paris.</s>"]
    tok = build("mistral-v0.3")
    ids, _, _ = encode(tok, Conversation("c:1", CASES["single_system"]), 4096)
    assert "[INST] You are a terse assistant.\n\nWhat is" in tok.decode(ids)  # not dropped


@pytest.mark.parametrize("name", sorted(set(SPECS) - {"gemma-2"}))
def test_instruction_records_with_a_system_field(name: str) -> None:
    record = {"instruction": "Reverse these words", "input": "cat dog", "output": "dog cat",
              "system": "You are a terse assistant."}  # fmt: skip
    sample = to_sample(record, "inst.jsonl:3", "instruction", None)
    assert isinstance(sample, Conversation) and sample.messages[0]["role"] == "system"
    assert check(name, sample.messages)[-1].strip().startswith("dog cat")


def test_qwen3_reasoning_multi_turn() -> None:
    messages = [
        SYSTEM,
        m("user", "What is the capital of France?"),
        m("assistant", "<think>\nThe capital of France is Paris.\n</think>\n\nParis."),
        m("user", "And two plus two?"),
        m(
            "assistant",
            "<think>\nLet me think: two plus two is four.\n</think>\n\nThe answer is 4.",
        ),
    ]
    assert check("qwen3", messages) == [
        "Paris.<|im_end|>",  # earlier turns are rendered without their reasoning
        "Let me think: two plus two is four.\n</think>\n\nThe answer is 4.<|im_end|>",
    ]
    # a last turn without reasoning: the template's empty think block is context
    runs = check("qwen3", [*messages[:3], m("user", "Thanks"), m("assistant", "Bye.")])
    assert runs == ["Paris.<|im_end|>", "Bye.<|im_end|>"]


@pytest.mark.parametrize("name", ["qwen3", "phi-3.5", "mistral-v0.3", "llama-3.1"])
def test_train_on_modes(name: str) -> None:
    runs = check(name, CASES["multi_system"], "last_assistant_turn")
    assert len(runs) == 1 and "1 2 3" in runs[0]
    check(name, CASES["multi_system"], "all")


def test_gemma2_system_prompt_is_a_bad_record() -> None:
    tok = build("gemma-2")
    bad = Conversation("chat.jsonl:4", CASES["single_system"])
    good = Conversation("chat.jsonl:5", CASES["single"])
    message = "chat.jsonl:4: the chat template refuses this conversation: System role not supported"
    with pytest.raises(DataError) as e:
        encode(tok, bad, 4096)
    assert str(e.value) == message and not isinstance(e.value, TemplateError)
    encoder = Encoder(tok, EncodeSettings(4096))
    with pytest.raises(DataError, match=f"^{message}$"):
        list(encoder.encode_many([good, bad], "error", TokenizeReport()))
    report = TokenizeReport()
    rows = list(encoder.encode_many([good, bad, good], "skip", report))
    assert len(rows) == 2 and report.skipped == 1 and report.first_skipped == [message]


def test_a_template_that_does_not_parse_is_a_setup_error() -> None:
    tok = build("qwen2.5")
    encoder = Encoder(tok, EncodeSettings(4096, template="{% for m in messages %}"))
    with pytest.raises(TemplateError, match="does not parse"):  # never skipped
        list(encoder.encode_many([Conversation("c:1", TURNS[:2])], "skip", TokenizeReport()))


def test_slow_tokenizer_is_refused_in_one_line() -> None:
    from transformers import PreTrainedTokenizer

    class CharTokenizer(PreTrainedTokenizer):  # a slow (Python) tokenizer: no offsets
        def __init__(self, **kwargs: Any) -> None:
            self.vocab = {chr(i): i for i in range(256)}
            super().__init__(**kwargs)

        def get_vocab(self) -> dict[str, int]:
            return dict(self.vocab)

        @property
        def vocab_size(self) -> int:
            return 256

        def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
            return list(text)

        def _convert_token_to_id(self, token: str) -> int:
            return self.vocab.get(token, 0)

        def _convert_id_to_token(self, index: int) -> str:
            return chr(index)

    tok = CharTokenizer(eos_token="\x01", name_or_path="char-tok")
    tok.chat_template = build("qwen2.5").chat_template
    with pytest.raises(TemplateError) as e:
        encode(tok, Conversation("c:1", TURNS[:2]), 4096)
    assert "\n" not in str(e.value) and "'char-tok'" in str(e.value)
    assert "slow (Python) tokenizer" in str(e.value)


def test_validate_renders_the_real_template(tiny: Any, tmp_path: Path) -> None:
    model = save("gemma-2", tmp_path / "gemma-tok")
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": CASES["single"]}, {"messages": CASES["single"]},
            {"messages": CASES["single_system"]}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["model"]["tokenizer"] = str(model)
    cfg["data"].update(train_files=[str(data)], eval_files=[], cache_dir=str(tmp_path / "cache"))
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert lines == [
        f"error: {data}:3: the chat template refuses this conversation: System role not supported"
    ]
    proc = run_cli("validate", str(path), "data.on_bad_record=skip")
    assert proc.returncode == 0, proc.stderr


def test_labels_are_ids_or_ignore() -> None:  # a sanity check on the comparison itself
    tok = build("qwen2.5")
    ids, labels, _ = encode(tok, Conversation("c:1", CASES["multi"]), 4096)
    arr_ids, arr_labels = np.array(ids), np.array(labels)
    on = arr_labels != IGNORE
    assert (arr_labels[on] == arr_ids[on]).all() and 0 < on.sum() < len(ids)


def test_content_that_looks_like_the_sentinel() -> None:
    for content in ("\ue000 starts like the sentinel", "ends like it \ue002", "\ue000\ue001\ue002"):
        assert check("qwen2.5", [TURNS[0], m("assistant", content)]) == [content + "<|im_end|>"]


def test_content_rendered_twice_is_refused() -> None:
    tok = build("qwen2.5")
    twice = "{% for x in messages %}<|im_start|>{{ x.content }}|{{ x.content }}{% endfor %}"
    with pytest.raises(DataError, match="^c:9: the chat template does not render message 1"):
        encode(tok, Conversation("c:9", TURNS[:2]), 4096, template=twice)
