"""Data at scale: a start that reads no data (cached content hashes), records read line by
line, the store written as samples arrive, a huge record that stays small in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from transformers import AutoTokenizer

from distft.assets import TinyAssets, build_tiny_assets
from distft.checkpoint import MANIFEST, STATE, TrainState
from distft.checkpoint.fingerprint import fingerprint, fingerprint_changes, hash_files
from distft.config import load, resolve_paths
from distft.data import Completion, Conversation, Text
from distft.data import tokenize as tokenize_mod
from distft.data.records import file_records
from distft.data.store import TokenArrays, TokenWriter
from distft.data.tokenize import Encoder, EncodeSettings, TokenizeReport
from tests.support import DISTFT, REPO, run_cli, write_config

MB = 1_000_000


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    return build_tiny_assets(tmp_path_factory.mktemp("scale") / "tiny", n_train=40, n_eval=10)


def _read_bytes() -> int:
    """Bytes this process has read through read(2) and friends, page cache included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _aged(path: Path, seconds: float = 60.0) -> None:
    """Move the file's mtime into the past: a hash is not kept for a file modified within
    fingerprint.RACY_SECONDS (its mtime could not show a change made in the same tick)."""
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def _records(n_bytes: int, text: str = "hello") -> str:
    line = json.dumps({"instruction": "say it", "output": text}) + "\n"
    return line * (n_bytes // len(line))


def _run_config(assets: TinyAssets, tmp_path: Path, data: Path) -> Path:
    cfg = {  # attention given: the CLI makes `auto` concrete, which the fingerprint sees
        "model": {"name_or_path": str(assets.model_dir), "attn_implementation": "sdpa"},
        "data": {
            "train_files": [str(data)],
            "max_seq_len": 128,
            "cache_dir": str(tmp_path / "cache"),
        },  # fmt: skip
        "batch": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 4},
        "cluster": {"num_workers": 1},
        "checkpoint": {"output_dir": str(tmp_path / "run")},
    }
    return write_config(tmp_path / "cfg.yaml", cfg)


def test_a_start_with_unchanged_data_reads_none_of_it_and_a_change_is_refused(
    assets: TinyAssets, tmp_path: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_records(8 * MB))
    _aged(data)
    path = _run_config(assets, tmp_path, data)
    cfg = resolve_paths(load(path))
    before = _read_bytes()
    first = fingerprint(cfg)  # hashes the file once, keeps the hash
    assert _read_bytes() - before >= 8 * MB * 0.99
    # the same value as hashing every byte (checkpoints saved before the cache resume)
    assert first["data_files"] == hash_files([data])
    before = _read_bytes()
    assert fingerprint(cfg) == first
    read = _read_bytes() - before
    assert read < 256 * 1024, f"{read:,} bytes read with unchanged data (8 MB file)"

    # a checkpoint saved with `first`; the same contents under a new mtime resume (hashed
    # once more), changed contents of the same size are refused with the one-line error
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text("{}")
    (ckpt / STATE).write_text(json.dumps(TrainState(world_size=1, fingerprint=first).__dict__))
    data.touch()
    _aged(data, 30.0)
    before = _read_bytes()
    assert fingerprint(cfg) == first
    assert _read_bytes() - before >= 8 * MB * 0.99
    ok = run_cli("validate", str(path))
    assert ok.returncode == 0, ok.stderr[-2000:]

    data.write_text(_records(8 * MB, "hullo"))  # same size, other bytes
    _aged(data, 20.0)
    assert fingerprint_changes(first, fingerprint(cfg)) == ["data_files"]
    refused = run_cli("validate", str(path))
    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "saved with a different data_files;" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr


def test_records_are_read_line_by_line(tmp_path: Path) -> None:
    """Reading a 20 MB JSONL file holds about one line at a time (whole-file reading held
    the bytes, the text and the list of lines: over 60 MB)."""
    data = tmp_path / "big.jsonl"
    data.write_text(_records(20 * MB))
    tracemalloc.start()
    try:
        n = sum(1 for _ in file_records(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n > 100_000
    assert peak < 2 * MB, f"peak {peak:,} bytes traced while reading a 20 MB file"


def test_the_store_writer_writes_what_np_save_writes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 500, n), rng.integers(-100, 500, n)) for n in (5, 1, 0, 300, 7)]
    for k in (0, len(rows)):
        writer = TokenWriter(tmp_path / f"w{k}")
        for ids, labels in rows[:k]:
            writer.add(ids, labels)
        writer.close()
        writer.finish({"n": k})
        TokenArrays.from_rows(rows[:k]).save(tmp_path / f"s{k}", {"n": k})
        for name in ("ids", "labels", "offsets", "targets", "meta"):
            suffix = ".json" if name == "meta" else ".npy"
            a, b = (tmp_path / f"{d}{k}" / f"{name}{suffix}" for d in ("w", "s"))
            assert a.read_bytes() == b.read_bytes(), (k, name)


def test_a_long_text_is_tokenized_from_prefixes_with_the_tokens_of_the_whole(
    assets: TinyAssets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts far over max_seq_len give the ids and labels that tokenizing them whole gave,
    with truncation and dropping counted alike (the whole: the cut set out of reach)."""
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    words = ["the", "quick", "brown", "fox", "jumps", "dog,", "é", "日本", "😀", "1234", ""]
    long = " ".join(words[(i * 7) % len(words)] for i in range(40_000))  # ~170K characters
    samples: list[Any] = [
        Text(source="a:1", text=long),
        Completion(source="a:2", prompt="Say it:", completion=long),
        Conversation(
            source="a:3",
            messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": long}],
        ),  # fmt: skip
        Text(source="a:4", text="short"),
    ]

    def encoded(too_long: str) -> tuple[list[Any], TokenizeReport]:
        report = TokenizeReport()
        enc = Encoder(tok, EncodeSettings(128, too_long=too_long))
        return [
            (i.tolist(), lab.tolist()) for i, lab in enc.encode_many(samples, "error", report)
        ], report

    cut = {t: encoded(t) for t in ("truncate", "drop")}
    monkeypatch.setattr(tokenize_mod, "LONG_TEXT_TOKENS", 10**9)
    whole = {t: encoded(t) for t in ("truncate", "drop")}
    assert cut == whole
    assert whole["truncate"][1].truncated == 3 and whole["drop"][1].dropped == 3


# Peak RSS of `distft preprocess` (max_seq_len 128) on ten short records and one long
# line, measured with bench/data_scale.py on the 2-core dev machine: before (whole-file
# reading, whole-text tokenization) a 5 MB line took 1,358 MiB (538 MiB for a 2 MB file of
# ordinary records: +164 MiB a MB of line, so ~8.7 GB for 50 MB; the issue saw 15 GB);
# now a 50 MB line takes 621 MiB (477 MiB for the 2 MB file).
HUGE_LINE_BOUND_MIB = 1200


def test_preprocess_of_one_50mb_line_stays_within_a_bound(
    assets: TinyAssets, tmp_path: Path
) -> None:
    data = tmp_path / "huge.jsonl"
    short = json.dumps({"text": "say hi"}) + "\n"
    word = "lorem ipsum dolor sit amet "
    text = (word * (50 * MB // len(word) + 1))[: 50 * MB]
    data.write_text(short * 5 + json.dumps({"text": text}) + "\n" + short * 5)
    del text
    path = _run_config(assets, tmp_path, data)
    # Measured from a small wrapper process: Linux counts the RSS a child had when it was
    # forked (a copy of its parent, here a pytest process that ran other tests) in its
    # ru_maxrss, even after exec.
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], "
        "stdout=sys.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, DISTFT, "preprocess", str(path)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.split()[-1]) / 1024
    assert peak_mib < HUGE_LINE_BOUND_MIB, f"peak RSS {peak_mib:,.0f} MiB"
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if (p / "meta.json").is_file()]
    meta = yaml.safe_load((entry / "meta.json").read_text())
    assert (meta["samples"], meta["truncated"]) == (11, 1)


def test_building_shows_progress_in_the_console_form(
    assets: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from distft.data import cache
    from distft.data.pipeline import build

    data = tmp_path / "train.jsonl"
    data.write_text(_records(20_000))
    cfg = resolve_paths(load(_run_config(assets, tmp_path, data)))
    monkeypatch.setattr(cache, "PROGRESS_SECONDS", 0.0)  # a line per sample
    lines: list[str] = []
    build(cfg, AutoTokenizer.from_pretrained(assets.model_dir), lines.append)
    progress = [ln for ln in lines if "so far" in ln]
    assert len(progress) > 10 and "preprocessed" in lines[-1] and "so far" not in lines[-1]
    # the console's pattern for these lines (tests/test_console.py)
    pattern = re.compile(r"(preprocessed|cached) \S+: [\d,]+ samples, [\d,]+ tokens.*")
    assert all(pattern.fullmatch(ln) for ln in progress), progress[:2]
