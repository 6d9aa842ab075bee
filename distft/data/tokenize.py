"""Samples -> token ids + labels (IGNORE = -100 where there is no loss).

Conversations are rendered with the chat template; `templates.conversation_spans` gives the
training text and the character spans of the trained assistant turns (each turn's content
and its end-of-turn token; see that module for the rules). The text is tokenized once, as at
inference (BPE merges unchanged), and a token is trained when any of its characters lies in
a trained span (so a token that merges a template space with the first word is trained).
Character offsets need a fast (Rust) tokenizer; a slow one is refused. `train_on` picks the
spans: every assistant turn, the last one only, or everything. Plain text is tokenized with
the tokenizer's special tokens (BOS) and trained entirely. A prompt is tokenized with the
special tokens and its completion apart, as at inference (no token straddles the boundary);
the completion is trained. Both end with EOS, which is trained. Pre-tokenized samples keep
their labels (default: all tokens). Position 0 never has a label: no token predicts it, and
in a packed sequence it must not be predicted from the previous sample.

A text far longer than `max_seq_len` tokens can need (`LONG_TEXT_TOKENS` characters a
token) is not tokenized whole (a 50 MB record would make tens of millions of tokens and
their offsets, many gigabytes, to keep 128): two prefixes of it are, one twice the other,
and when their first `max_seq_len + 1` tokens (and offsets) agree, those are its tokens
(the cut changed nothing before it); otherwise longer prefixes, up to the whole text.
Truncation and `too_long: drop` then see the same tokens as before.

A preference `Pair` gives two rows, chosen then rejected, each encoded as above except that
only its reply is trained whatever `train_on` says (a completion side: the completion and
EOS; a conversation side: the assistant turns after the prompt the sides share, each with
its end-of-turn token). A pair is kept or lost whole: if either side is bad the pair is one
bad record, and if either is too long with `too_long: drop` both are dropped (counted once);
`truncate` cuts each side on its own (a pair counted once).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, overload

import numpy as np

from distft.data import templates
from distft.data.formats import Completion, Conversation, Pair, Sample, Text, Tokens
from distft.data.preference import reply_turns
from distft.data.records import DataError
from distft.data.templates import TemplateError, chat_template

IGNORE = -100
Row = tuple[np.ndarray, np.ndarray]  # (ids, labels) of one sample
Single = Conversation | Completion | Text | Tokens  # a sample that is one row
CHUNK = 256  # samples per tokenizer call (the fast tokenizer batches in Rust)
LONG_TEXT_TOKENS = 64  # characters a token: a text longer than this x max_seq_len is cut


@dataclass(frozen=True)
class EncodeSettings:
    max_seq_len: int
    train_on: str = "assistant"  # assistant | last_assistant_turn | all
    too_long: str = "truncate"  # truncate | drop
    template: str | None = None  # Jinja chat template; None: the tokenizer's


@dataclass
class TokenizeReport:
    truncated: int = 0  # samples (pairs) cut to max_seq_len
    dropped: int = 0  # samples (pairs) over max_seq_len left out
    skipped: int = 0
    pairs: int = 0  # pairs encoded (two rows each)
    first_skipped: list[str] = field(default_factory=list, compare=False)

    def add(self, later: TokenizeReport) -> None:
        """Count in `later`, the report of the samples after this one's."""
        self.truncated += later.truncated
        self.dropped += later.dropped
        self.skipped += later.skipped
        self.pairs += later.pairs
        self.first_skipped += later.first_skipped[: max(0, 3 - len(self.first_skipped))]


def conversation_spans(
    tokenizer: Any, conv: Conversation, train_on: str = "assistant", template: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the [start, end) character spans that are trained."""
    return templates.conversation_spans(tokenizer, conv.messages, conv.source, train_on, template)


def _labels(ids: np.ndarray, offsets: Any, spans: list[tuple[int, int]]) -> np.ndarray:
    """`ids` where the token has a character in a span (spans sorted, disjoint), else IGNORE."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = off[:, 0], off[:, 1]
    span_start = np.array([a for a, _ in spans], dtype=np.int64)
    span_end = np.array([b for _, b in spans], dtype=np.int64)
    k = np.searchsorted(span_end, start, side="right")  # first span ending after the start
    inside = (k < len(spans)) & (end > start)
    inside[inside] &= span_start[k[inside]] < end[inside]
    return np.where(inside, ids, IGNORE).astype(np.int32)


def check_fast(tokenizer: Any) -> None:
    """Label masking of conversations needs character offsets: fast tokenizers only."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"tokenizer {tokenizer.name_or_path!r} ({type(tokenizer).__name__}) is a slow "
            "(Python) tokenizer without character offsets, which label masking of "
            "conversations needs; use one with a tokenizer.json (a fast tokenizer)"
        )


class Encoder:
    """Encodes samples in chunks; truncates or drops over-long ones and counts them."""

    def __init__(self, tokenizer: Any, settings: EncodeSettings):
        self.tok, self.s = tokenizer, settings
        self.eos = tokenizer.eos_token_id
        self.vocab = len(tokenizer)

    def _finish(
        self, source: str, ids: np.ndarray, labels: np.ndarray, report: TokenizeReport
    ) -> Row | None:
        labels[:1] = IGNORE
        truncated = len(ids) > self.s.max_seq_len
        if truncated and self.s.too_long == "drop":
            report.dropped += 1
            return None
        ids, labels = ids[: self.s.max_seq_len], labels[: self.s.max_seq_len]
        if not (labels != IGNORE).any():
            why = "after truncation to max_seq_len" if truncated else "in the trained turns"
            raise DataError(f"{source}: no trainable tokens {why}")
        report.truncated += truncated
        return ids, labels

    def _tokens(self, t: Tokens) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(t.input_ids, dtype=np.int64)
        labels = ids if t.labels is None else np.asarray(t.labels, dtype=np.int64)
        bad_ids = np.flatnonzero((ids < 0) | (ids >= self.vocab))
        bad_labels = np.flatnonzero(((labels < 0) & (labels != IGNORE)) | (labels >= self.vocab))
        for name, arr, bad in (("input_ids", ids, bad_ids), ("labels", labels, bad_labels)):
            if len(bad):
                raise DataError(
                    f"{t.source}: {name}[{bad[0]}]: token id {arr[bad[0]]} is outside the "
                    f"vocabulary (size {self.vocab})"
                )
        return ids.astype(np.int32), labels.astype(np.int32)

    def _tokenize(self, texts: list[str], special: bool, offsets: bool = False) -> Any:
        """`input_ids` (and `offset_mapping`) of each text; a very long text's first
        `max_seq_len + 1` tokens only (see the module's docstring)."""
        need = self.s.max_seq_len + 1
        long = {i for i, t in enumerate(texts) if len(t) > max(LONG_TEXT_TOKENS * need, 1 << 16)}
        if not long:
            return self._call(texts, special, offsets)
        keys = ["input_ids", "offset_mapping"] if offsets else ["input_ids"]
        rest = [t for i, t in enumerate(texts) if i not in long]
        enc = self._call(rest, special, offsets) if rest else {k: [] for k in keys}
        short = {k: iter(enc[k]) for k in keys}
        out: dict[str, list] = {k: [] for k in keys}
        for i, text in enumerate(texts):
            head = self._head(text, special, offsets) if i in long else None
            for k in keys:
                out[k].append(next(short[k]) if head is None else head[k])
        return out

    def _head(self, text: str, special: bool, offsets: bool) -> dict[str, list]:
        """The first `max_seq_len + 1` tokens of a long text, from prefixes of it."""
        need = self.s.max_seq_len + 1
        cut = 16 * need
        while 2 * cut < len(text):
            a, b = (self._call([text[:n]], special, offsets) for n in (cut, 2 * cut))
            keys = ["input_ids", "offset_mapping"] if offsets else ["input_ids"]
            heads = [{k: list(x[k][0][:need]) for k in keys} for x in (a, b)]
            if len(a["input_ids"][0]) > need + 8 and heads[0] == heads[1]:
                return heads[0]  # room for a special token the tokenizer appends
            cut *= 4
        enc = self._call([text], special, offsets)
        return {k: enc[k][0] for k in enc if k in ("input_ids", "offset_mapping")}

    def _call(self, texts: list[str], special: bool, offsets: bool) -> Any:
        return self.tok(
            texts,
            add_special_tokens=special,
            return_offsets_mapping=offsets,
            verbose=False,  # no 'longer than model_max_length' warning: we truncate
        )

    def _with_eos(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.eos is None or (len(ids) and ids[-1] == self.eos):
            return ids, labels
        eos = np.array([self.eos], dtype=np.int32)
        return np.concatenate([ids, eos]), np.concatenate([labels, eos])

    def _chunk(self, chunk: list[Sample]) -> list[list[Row]]:
        """Encoded (ids, labels) rows of each sample, in order (a pair's: chosen, then
        rejected); DataError if one is bad."""
        rows = self._rows([side for sample in chunk for side in _sides(sample)])
        out, at = [], 0
        for sample in chunk:
            width = 2 if isinstance(sample, Pair) else 1
            out.append(rows[at : at + width])
            at += width
        return out

    def _rows(self, chunk: list[tuple[Single, int | None]]) -> list[Row]:
        """Encoded (ids, labels) of each (sample, reply turns), in order. `reply` is None
        for a sample of its own (`train_on` applies), else the sample is a pair's side:
        its prompt is not trained, and of a conversation only the last `reply` turns."""
        out: list[Row | None] = [None] * len(chunk)
        chats: list[tuple[int, str, list[tuple[int, int]]]] = []
        texts: list[tuple[int, str]] = []
        completions: list[tuple[int, Completion, bool]] = []
        for i, (sample, reply) in enumerate(chunk):
            if isinstance(sample, Tokens):
                out[i] = self._tokens(sample)
            elif isinstance(sample, Conversation):
                if self.s.template is None:
                    chat_template(self.tok, "tokenizer")  # TemplateError: the tokenizer has none
                chats.append((i, *self._spans(sample, reply)))
            elif isinstance(sample, Completion):
                completions.append((i, sample, reply is not None or self.s.train_on != "all"))
            else:
                texts.append((i, sample.text))
        as_array = partial(np.asarray, dtype=np.int32)
        if chats:
            check_fast(self.tok)
            enc = self._tokenize([t for _, t, _ in chats], special=False, offsets=True)
            for (i, _, spans), ids, offsets in zip(
                chats, enc["input_ids"], enc["offset_mapping"], strict=True
            ):
                out[i] = (as_array(ids), _labels(as_array(ids), offsets, spans))
        if texts:
            enc = self._tokenize([t for _, t in texts], special=True)
            for (i, _), ids in zip(texts, enc["input_ids"], strict=True):
                out[i] = self._with_eos(as_array(ids), as_array(ids))
        if completions:  # tokenized apart, as at inference: no token straddles the boundary
            prompts = self._tokenize([c.prompt for _, c, _ in completions], special=True)
            answers = self._tokenize([c.completion for _, c, _ in completions], special=False)
            for (i, _, hide), p, a in zip(
                completions, prompts["input_ids"], answers["input_ids"], strict=True
            ):
                ids = as_array(p + a)
                hidden = len(p) if hide else 0
                labels = np.concatenate([np.full(hidden, IGNORE, np.int32), ids[hidden:]])
                out[i] = self._with_eos(ids, labels)
        return [x for x in out if x is not None]

    def _spans(self, conv: Conversation, reply: int | None) -> tuple[str, list[tuple[int, int]]]:
        """The training text and trained spans: `train_on`'s, or the last `reply` turns."""
        if reply is None:
            return conversation_spans(self.tok, conv, self.s.train_on, self.s.template)
        train_on = "last_assistant_turn" if reply == 1 else "assistant"
        text, spans = conversation_spans(self.tok, conv, train_on, self.s.template)
        return text, spans[-reply:]

    def encode_many(
        self, samples: Iterable[Sample], on_bad_record: str, report: TokenizeReport
    ) -> Generator[Row]:
        """(ids, labels) int32 arrays for each usable sample, in order (two for a pair)."""
        for chunk in chunked(samples):
            yield from self.encode_chunk(chunk, on_bad_record, report)

    def encode_chunk(
        self, chunk: list[Sample], on_bad_record: str, report: TokenizeReport
    ) -> Iterator[Row]:
        """The rows of `chunk` (one tokenizer call when all are good), in order."""
        try:
            encoded = list(zip(chunk, self._chunk(chunk), strict=True))
        except TemplateError:
            raise
        except DataError:  # find the bad one(s): one sample at a time
            encoded = []
            for sample in chunk:
                try:
                    encoded += [(sample, self._chunk([sample])[0])]
                except DataError as e:
                    self._bad(e, on_bad_record, report)
        for sample, rows in encoded:
            try:
                yield from self._finish_sample(sample, rows, report)
            except DataError as e:
                self._bad(e, on_bad_record, report)

    def _finish_sample(self, sample: Sample, rows: list[Row], report: TokenizeReport) -> list[Row]:
        """A sample's finished rows; a pair's both or neither (and counted once)."""
        local = TokenizeReport()
        done = [
            self._finish(where, *row, local)
            for where, row in zip(_row_sources(sample), rows, strict=True)
        ]
        report.truncated += local.truncated > 0
        if local.dropped:
            report.dropped += 1
            return []
        report.pairs += isinstance(sample, Pair)
        return [row for row in done if row is not None]

    @staticmethod
    def _bad(e: DataError, on_bad_record: str, report: TokenizeReport) -> None:
        if on_bad_record != "skip":
            raise e
        report.skipped += 1
        if len(report.first_skipped) < 3:
            report.first_skipped.append(str(e))


def chunked(samples: Iterable[Sample], size: int = CHUNK) -> Iterator[list[Sample]]:
    """`samples` in lists of `size`. A DataError that `samples` raises (a bad record while
    reading) comes after the chunk read before it, so a bad sample earlier in the file is
    the one reported: the earliest bad record in file order, however it is bad."""
    chunk: list[Sample] = []
    try:
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except DataError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


def _sides(sample: Sample) -> list[tuple[Single, int | None]]:
    """What `Encoder._rows` encodes for a sample: itself, or a pair's two sides."""
    if not isinstance(sample, Pair):
        return [(sample, None)]
    if isinstance(sample.chosen, Conversation):
        chosen, rejected = reply_turns(sample)
        return [(sample.chosen, chosen), (sample.rejected, rejected)]
    return [(sample.chosen, 0), (sample.rejected, 0)]


def _row_sources(sample: Sample) -> list[str]:
    """How errors name each row of a sample: `file:line`, or `file:line: chosen` ..."""
    if isinstance(sample, Pair):
        return [f"{sample.source}: chosen", f"{sample.source}: rejected"]
    return [sample.source]


Encoded = tuple[list[int], list[int], bool]


@overload
def encode(
    tokenizer: Any,
    sample: Pair,
    max_seq_len: int,
    *,
    train_on: str = ...,
    template: str | None = ...,
) -> tuple[Encoded, Encoded]: ...


@overload
def encode(
    tokenizer: Any,
    sample: Single,
    max_seq_len: int,
    *,
    train_on: str = ...,
    template: str | None = ...,
) -> Encoded: ...


def encode(
    tokenizer: Any,
    sample: Sample,
    max_seq_len: int,
    *,
    train_on: str = "assistant",
    template: str | None = None,
) -> Encoded | tuple[Encoded, Encoded]:
    """(input_ids, labels, truncated) of one sample; of a pair, those of (chosen, rejected).
    Raises DataError if nothing is left to train on. (Training goes through
    `Encoder.encode_many`: the same code, in chunks.)"""
    enc = Encoder(tokenizer, EncodeSettings(max_seq_len, train_on, "truncate", template))
    out = []
    for where, (ids, labels) in zip(_row_sources(sample), enc._chunk([sample])[0], strict=True):
        report = TokenizeReport()
        done = enc._finish(where, ids, labels, report)
        assert done is not None  # too_long="truncate" never drops
        out.append((done[0].tolist(), done[1].tolist(), bool(report.truncated)))
    return (out[0], out[1]) if isinstance(sample, Pair) else out[0]
