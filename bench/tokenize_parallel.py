"""Building a cache entry serially and on `data.num_proc` processes (issue 12, point 2).

    .venv/bin/python -m bench.tokenize_parallel [--mb 50] [--procs 2] [--repeats 1]

A chat JSONL of about `--mb` MB is generated (the tiny assets' conversations, each made
longer with a few extra turns; max_seq_len 1024, so little is cut), then one source is
built into a fresh cache directory serially (`num_proc: 1`) and on `--procs` processes,
taking turns `--repeats` times; best of each. The table gives records/s and the speed-up
(serial time / pool time), and the run checks that both entries are byte-identical. The
builder's own share (reading and parsing the records: part of what a pool cannot spread)
and a pool's start-up (imports, tokenizer unpickled: time to the first chunk back) with
the "spawn" and "forkserver" start methods, twice each (the second pool of a process),
are measured apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from distft.assets import build_tiny_assets
from distft.config import DataConfig
from distft.data import parallel
from distft.data.cache import CacheContext, build_entry, source_specs
from distft.data.formats import ReadReport, parse
from distft.data.tokenize import EncodeSettings, TokenizeReport, chunked

MAX_SEQ_LEN = 1024


def write_chat(path: Path, base: Path, mb: float) -> int:
    """Conversations of `base`, three of them joined into one record, to ~`mb` MB."""
    convs = [json.loads(line)["messages"] for line in base.read_text().splitlines()]
    target, written, n, i = int(mb * 1e6), 0, 0, 0
    with path.open("w") as f:
        while written < target:
            msgs = [
                m for k in range(3) for m in convs[(i + k) % len(convs)] if m["role"] != "system"
            ]
            line = json.dumps({"messages": msgs}) + "\n"
            f.write(line)
            written, n, i = written + len(line), n + 1, i + 7
    return n


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def build(tok: Any, data: Path, root: Path, num_proc: int) -> tuple[float, Path, dict]:
    """Wall seconds of one build; its meta gets the CPU seconds of this process (the
    builder) and of its pool processes."""
    cfg = DataConfig.model_validate({"train_files": [str(data)]})
    ctx = CacheContext.create(tok, EncodeSettings(MAX_SEQ_LEN), "error", root, num_proc)
    (spec,) = source_specs(cfg, "train")
    cpu = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    result = build_entry(spec, ctx)
    took = time.perf_counter() - t0
    meta = {**result.meta, "cpu_builder": _cpu(resource.RUSAGE_SELF) - cpu[0],
            "cpu_pool": _cpu(resource.RUSAGE_CHILDREN) - cpu[1]}  # fmt: skip
    return took, result.path, meta


def same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "meta.json")
    blobs = all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    meta = [json.loads((d / "meta.json").read_text()) for d in (a, b)]
    return blobs and all(m.pop("build_seconds") >= 0 for m in meta) and meta[0] == meta[1]


def startup(tok: Any, data: Path, procs: int, method: str) -> float:
    """Seconds from a pool's creation to its first chunk back (a fresh pool)."""
    samples = parse(_raws(data), "auto", {}, "error", ReadReport())
    first = next(chunked(samples))
    enc = parallel.ChunkEncoder(tok, EncodeSettings(MAX_SEQ_LEN), "error", procs)
    parallel.START_METHOD, default = method, parallel.START_METHOD
    t0 = time.perf_counter()
    rows = enc._pooled(iter([first]), TokenizeReport())
    next(rows)
    took = time.perf_counter() - t0
    rows.close()
    parallel.START_METHOD = default
    return took


def parent_share(data: Path) -> float:
    """Seconds the builder spends reading and parsing the records (no tokenizing)."""
    t0 = time.perf_counter()
    for _ in parse(_raws(data), "auto", {}, "error", ReadReport()):
        pass
    return time.perf_counter() - t0


def _raws(data: Path) -> Any:
    from distft.data.records import file_records

    return file_records(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=50)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="distft-tok-") as tmp:
        work = Path(tmp)
        assets = build_tiny_assets(work / "tiny", n_train=400, n_eval=10)
        tok = AutoTokenizer.from_pretrained(assets.model_dir)
        data = work / "chat.jsonl"
        n = write_chat(data, assets.chat_train_file, args.mb)
        size = data.stat().st_size / 1e6
        print(f"{size:.1f} MB, {n:,} chat records, max_seq_len {MAX_SEQ_LEN}", flush=True)
        best: dict[int, float] = {}
        paths: dict[int, Path] = {}
        for r in range(args.repeats):
            for procs in (1, args.procs):
                took, path, meta = build(tok, data, work / f"cache-{procs}-{r}", procs)
                best[procs] = min(best.get(procs, took), took)
                paths[procs] = path
                print(f"  num_proc {procs}: {took:.1f}s ({meta['tokens']:,} tokens); CPU s: "
                      f"builder {meta['cpu_builder']:.1f}, pool {meta['cpu_pool']:.1f}",
                      flush=True)  # fmt: skip
        identical = same(paths[1], paths[args.procs])
        parse_s = parent_share(data)
        starts = {m: [startup(tok, data, args.procs, m) for _ in range(2)]
                  for m in ("spawn", "forkserver")}  # fmt: skip
    serial, pooled = best[1], best[args.procs]
    print("\n| num_proc | build s | records/s | speed-up |\n|---|---|---|---|")
    print(f"| 1 | {serial:.1f} | {n / serial:,.0f} | 1.00 |")
    print(f"| {args.procs} | {pooled:.1f} | {n / pooled:,.0f} | {serial / pooled:.2f} |")
    print(f"\nbyte-identical: {identical}; reading + parsing alone: {parse_s:.1f}s "
          f"({parse_s / serial:.0%} of the serial build)")  # fmt: skip
    for m, (first, second) in starts.items():
        print(f"pool start-up ({m}, first chunk back): {first:.1f}s, again {second:.1f}s")


if __name__ == "__main__":
    main()
