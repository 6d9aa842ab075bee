"""Tokenizing one source on several processes (`data.num_proc`), with the serial output.

The parent reads the records (`formats.parse`, streaming) and cuts the samples into the
chunks the serial path encodes (`tokenize.chunked`: the same tokenizer calls); a pool of
processes encodes them, each with an `Encoder` built once from the pickled tokenizer, and
the rows are yielded in chunk order, so the caller writes the serial build's bytes. At most
IN_FLIGHT chunks a process (and IN_FLIGHT_BYTES of them pickled) are out at a time: memory
holds a few chunks, never the file. Each chunk's `TokenizeReport` is added in order
(`first_skipped` as serially), and the first chunk in order that fails raises its error:
the earliest bad record in file order, as the serial path reports it. A bad record the
parent meets while reading is raised once the chunks before it are in (one of them may
hold an earlier bad record). If a pool process dies, the parent encodes the chunks not
yet written and the rest itself, with a warning: the same output, later.

The pool starts its processes with "spawn": a fresh interpreter that inherits nothing from
a parent that may be a Ray worker with threads (a fork copies their held locks). A process
imports distft (torch included, through `distft.data`) and unpickles the tokenizer: about
2 s and 2 CPU-seconds a process on a busy 2-core machine ("forkserver" starts no faster).
So the parent encodes the chunks of the first POOL_AFTER_SECONDS itself, and starts a pool
only for a source that is not done by then: one the pool can save more on than it costs
(see BENCHMARKS.md, "Tokenizing on the node's cores").
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import warnings
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain
from typing import Any

from distft.data.formats import Sample
from distft.data.records import DataError
from distft.data.tokenize import Encoder, EncodeSettings, Row, TokenizeReport, chunked

POOL_AFTER_SECONDS = 5.0  # of encoding in the parent before a pool starts (see above)
IN_FLIGHT = 3  # chunks submitted per process ahead of the one being written
IN_FLIGHT_BYTES = 32 << 20  # and their pickled bytes per process (long documents)
START_METHOD = "spawn"  # never "fork" (see above)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a job scheduler sets it)."""
    return len(os.sched_getaffinity(0))


def resolve_num_proc(value: int | str) -> int:
    """`data.num_proc` as a number: "auto" is the usable cores."""
    return usable_cores() if value == "auto" else int(value)


_encoder: Encoder | None = None  # a pool process's own


def _start(tokenizer: bytes, settings: EncodeSettings) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a process: no oversubscription
    global _encoder
    _encoder = Encoder(pickle.loads(tokenizer), settings)


def _encode(chunk: bytes, on_bad_record: str) -> tuple[list[Row], TokenizeReport]:
    """The rows and report of a pickled chunk of samples."""
    assert _encoder is not None, "a pool process without its encoder"
    report = TokenizeReport()
    return list(_encoder.encode_chunk(pickle.loads(chunk), on_bad_record, report)), report


def _items(chunks: Iterator[list[Sample]]) -> Iterator[list[Sample] | DataError]:
    """The chunks, then the DataError that reading raised (as an item), if one did."""
    try:
        yield from chunks
    except DataError as e:
        yield e


class ChunkEncoder:
    """A source's samples -> rows, in order: the chunks of the first POOL_AFTER_SECONDS in
    this process, the rest (if any) on a pool of `num_proc` processes (`num_proc` > 1)."""

    def __init__(self, tokenizer: Any, settings: EncodeSettings, on_bad: str, num_proc: int):
        self.tok, self.settings, self.on_bad = tokenizer, settings, on_bad
        self.num_proc = num_proc
        self.processes = 1  # the processes tokenizing now (num_proc once the pool started)

    def rows(self, samples: Iterable[Sample], report: TokenizeReport) -> Generator[Row]:
        encoder = Encoder(self.tok, self.settings)
        if self.num_proc <= 1:
            yield from encoder.encode_many(samples, self.on_bad, report)
            return
        items, t0 = _items(chunked(samples)), time.perf_counter()
        for item in items:
            if isinstance(item, DataError):
                raise item
            yield from encoder.encode_chunk(item, self.on_bad, report)
            if time.perf_counter() - t0 > POOL_AFTER_SECONDS:
                break
        rest = next(items, None)
        if rest is not None:
            yield from self._pooled(chain([rest], items), report)

    def _pooled(
        self, items: Iterator[list[Sample] | DataError], report: TokenizeReport
    ) -> Generator[Row]:
        pending: deque[tuple[Future[Encoded], bytes]] = deque()  # (its rows, the chunk)
        unsent: bytes | None = None
        failed: DataError | None = None
        n = self.num_proc
        pool = ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context(START_METHOD),
            initializer=_start,
            initargs=(pickle.dumps(self.tok), self.settings),
        )
        self.processes = n
        try:
            try:
                for item in items:
                    if isinstance(item, DataError):
                        failed = item
                        break
                    unsent = pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
                    pending.append((pool.submit(_encode, unsent, self.on_bad), unsent))
                    unsent = None
                    while len(pending) > IN_FLIGHT * n or _held(pending) > IN_FLIGHT_BYTES * n:
                        yield from _done(pending, report)
                while pending:
                    yield from _done(pending, report)
            except BrokenProcessPool as e:  # a process died: killed (memory?), or a script
                # without a `__main__` guard started a pool in it; the builder goes on alone
                msg = f"tokenizing processes failed ({e}); going on in one process"
                warnings.warn(msg, stacklevel=2)
                self.processes = 1
                encoder = Encoder(self.tok, self.settings)
                left = [chunk for _, chunk in pending] + ([unsent] if unsent else [])
                for chunk in left:
                    yield from encoder.encode_chunk(pickle.loads(chunk), self.on_bad, report)
                for item in items if failed is None else []:
                    if isinstance(item, DataError):
                        failed = item
                        break
                    yield from encoder.encode_chunk(item, self.on_bad, report)
        finally:  # an error, or the caller stopped: drop what has not started, then wait
            pool.shutdown(wait=True, cancel_futures=True)
        if failed is not None:
            raise failed


Encoded = tuple[list[Row], TokenizeReport]


def _held(pending: deque[tuple[Future[Encoded], bytes]]) -> int:
    return sum(len(chunk) for _, chunk in pending)


def _done(pending: deque[tuple[Future[Encoded], bytes]], report: TokenizeReport) -> list[Row]:
    """The first pending chunk's rows, once it is done (it stays pending if the pool broke)."""
    try:
        rows, chunk_report = pending[0][0].result()
    except DataError as e:
        raise e from None  # one line: not the pool process's traceback
    pending.popleft()
    report.add(chunk_report)
    return rows
