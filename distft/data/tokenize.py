"""Conversation -> token ids + labels, with loss only on assistant turns.

The conversation is rendered once with the tokenizer's chat template. Each assistant turn
is the character span between the render of the turns before it (with the generation
prompt) and the render including it, so the turn's end-of-turn token is trained too.
Tokens whose character offsets fall inside an assistant span get labels; all others get
IGNORE (-100). Tokenizing the whole string once keeps BPE merges identical to inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distft.data.records import Conversation, DataError

IGNORE = -100


@dataclass
class TokenizeReport:
    truncated: int = 0
    skipped: int = 0


def _render(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_spans(tokenizer: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans of assistant turns."""
    text = _render(tokenizer, conv.messages, gen_prompt=False)
    spans = []
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, conv.messages[:i], gen_prompt=True)
        upto = _render(tokenizer, conv.messages[: i + 1], gen_prompt=False)
        if not (text.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{conv.source}: the chat template is not prefix-consistent, so assistant "
                "turns cannot be located for label masking"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode(
    tokenizer: Any, conv: Conversation, max_seq_len: int
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated). Raises DataError if nothing is left to train on."""
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e > s and any(a <= s and e <= b for a, b in spans):
            labels[t] = ids[t]
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(x == IGNORE for x in labels[1:]):
        why = "after truncation to max_seq_len" if truncated else "in the assistant turns"
        raise DataError(f"{conv.source}: no trainable tokens {why}")
    return ids, labels, truncated


def encode_all(
    tokenizer: Any, convs: list[Conversation], max_seq_len: int, on_bad_record: str
) -> tuple[dict[str, list[list[int]]], TokenizeReport]:
    report = TokenizeReport()
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for conv in convs:
        try:
            ids, labels, truncated = encode(tokenizer, conv, max_seq_len)
        except DataError:
            if on_bad_record != "skip":
                raise
            report.skipped += 1
            continue
        report.truncated += truncated
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
    if not columns["input_ids"]:
        raise DataError("no usable samples after tokenization")
    return columns, report
