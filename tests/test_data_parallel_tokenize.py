"""Tokenizing a source on several processes (`data.num_proc`): the cache entry is the
serial build's, byte for byte (rows, order, counts, the first skipped records), the first
bad record is the serial one, and the pool leaves no process or temporary directory."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from distft.assets import TinyAssets
from distft.config import ConfigError, DataConfig, from_dict
from distft.data import cache, parallel
from distft.data.cache import CacheContext, SourceSpec, build_entry, source_specs
from distft.data.records import DataError
from distft.data.tokenize import CHUNK, EncodeSettings

MAX_SEQ_LEN = 96


@pytest.fixture(scope="module")
def tok(tiny: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


@pytest.fixture(autouse=True)
def pool_after_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test files are small: start the pool after the first chunk of samples."""
    monkeypatch.setattr(parallel, "POOL_AFTER_SECONDS", 0.0)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def chat_records(tiny: TinyAssets, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` chat records from the tiny assets', every 50th far over MAX_SEQ_LEN."""
    base, rng = _lines(tiny.chat_train_file), random.Random(seed)
    out = []
    for i in range(n):
        rec = json.loads(json.dumps(base[i % len(base)]))
        if i % 50 == 7:
            rec["messages"][-1]["content"] = " ".join(["many words here"] * rng.randint(40, 90))
        out.append(rec)
    return out


def write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def context(
    tok: Any, path: Path, root: Path, num_proc: int, **data: Any
) -> tuple[CacheContext, SourceSpec]:
    cfg = DataConfig.model_validate({"train_files": [str(path)], **data})
    settings = EncodeSettings(MAX_SEQ_LEN, cfg.train_on, cfg.too_long)
    (spec,) = source_specs(cfg, "train")
    return CacheContext.create(tok, settings, cfg.on_bad_record, root, num_proc), spec


def build(
    tok: Any, path: Path, root: Path, num_proc: int, pooled: bool = True, **data: Any
) -> tuple[Path, dict]:
    """A new cache entry of `path` built on `num_proc` processes (`pooled`: the source is
    long enough for a pool to start); the progress lines (one a sample here) name them."""
    ctx, spec = context(tok, path, root, num_proc, **data)
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache, "PROGRESS_SECONDS", -1.0)
        result = build_entry(spec, ctx, lines.append)
    assert result.built and lines
    shown = f"{num_proc} processes" if num_proc > 1 and pooled else "1 process"
    assert lines[-1].endswith(f"s, {shown})"), lines[-1]
    return result.path, result.meta


def assert_same_builds(tok: Any, path: Path, tmp_path: Path, **data: Any) -> dict:
    """Serial and 2-process builds of `path`: identical files (meta: but build_seconds)."""
    one, meta = build(tok, path, tmp_path / "serial", 1, **data)
    two, meta2 = build(tok, path, tmp_path / "pool", 2, **data)
    assert one.name == two.name  # the key: num_proc is not part of it
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert "ids.npy" in files and "meta.json" in files
    for name in files:
        if name != "meta.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    meta.pop("build_seconds"), meta2.pop("build_seconds")
    assert meta == meta2
    return meta


def test_a_pool_build_is_the_serial_build(tok: Any, tiny: TinyAssets, tmp_path: Path) -> None:
    path = write(tmp_path / "chat.jsonl", chat_records(tiny, 3000))
    meta = assert_same_builds(tok, path, tmp_path)
    assert (meta["samples"], meta["skipped"]) == (3000, 0) and meta["truncated"] >= 60
    dropped = assert_same_builds(tok, path, tmp_path / "drop", too_long="drop")
    assert dropped["dropped"] == meta["truncated"] == 3000 - dropped["samples"]
    short = write(tmp_path / "short.jsonl", chat_records(tiny, CHUNK))  # done: no pool started
    assert build(tok, short, tmp_path / "short", 2, pooled=False)[1]["samples"] == CHUNK


def test_a_pool_build_of_preference_pairs(tok: Any, tiny: TinyAssets, tmp_path: Path) -> None:
    pairs = _lines(tiny.pref_train_file)
    records = [pairs[i % len(pairs)] for i in range(3 * CHUNK + 17)]
    for i in range(5, len(records), 40):  # a chosen too long to keep: the pair is dropped
        records[i] = {**records[i], "chosen": " ".join(["long reply"] * 80)}
    path = write(tmp_path / "pairs.jsonl", records)
    meta = assert_same_builds(tok, path, tmp_path, format="preference", too_long="drop")
    assert meta["dropped"] == len(range(5, len(records), 40))
    assert meta["samples"] == 2 * meta["pairs"] == 2 * (len(records) - meta["dropped"])


def test_a_pool_process_that_dies_leaves_the_serial_build(
    tok: Any, tiny: TinyAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "chat.jsonl", chat_records(tiny, 3000))
    serial, _ = build(tok, path, tmp_path / "serial", 1)
    ctx, spec = context(tok, path, tmp_path / "pool", 2)
    killed: list[str] = []

    def kill_one(line: str) -> None:  # a progress line a sample
        if line.endswith("2 processes)") and not killed:
            victim = _children()[0]
            victim.kill()
            victim.join()
            killed.append(line)

    monkeypatch.setattr(cache, "PROGRESS_SECONDS", -1.0)
    with pytest.warns(UserWarning, match=r"^tokenizing processes failed \(.*\); going on in"):
        result = build_entry(spec, ctx, kill_one)
    assert killed and _children() == []
    for name in ("ids.npy", "labels.npy", "offsets.npy", "targets.npy"):
        assert (serial / name).read_bytes() == (result.path / name).read_bytes(), name


def _with_bad(records: list[Any], at: dict[int, Any]) -> list[Any]:
    out = list(records)
    for i, bad in at.items():
        out[i] = bad
    return out


NO_TRAINED = {  # read fine; no trainable token once truncated: found by a pool process
    "messages": [
        {"role": "user", "content": "a long question " * 100},
        {"role": "assistant", "content": "ok"},
    ]
}
NOT_JSON = '{"messages": ['  # parsing fails in the parent


def test_skipped_records_are_the_serial_ones(tok: Any, tiny: TinyAssets, tmp_path: Path) -> None:
    bad = {40: NO_TRAINED, 700: NOT_JSON, 1300: NO_TRAINED, 1301: NO_TRAINED, 2999: NOT_JSON}
    path = write(tmp_path / "chat.jsonl", _with_bad(chat_records(tiny, 3000), bad))
    meta = assert_same_builds(tok, path, tmp_path, on_bad_record="skip")
    assert meta["skipped"] == len(bad)
    # the reader's first (here the two unparsable lines), then the tokenizer's
    assert [s.split(": ")[0] for s in meta["first_skipped"]] == [
        f"{path}:{n}" for n in (701, 3000, 41)
    ]


def _children() -> list[Any]:
    return multiprocessing.active_children()


@pytest.mark.parametrize(
    "bad",
    [
        {2500: NO_TRAINED, 2900: NO_TRAINED},  # the first found by a pool process
        {2500: NO_TRAINED, 2520: NOT_JSON},  # by the pool, before the parent reads a bad line
        {2300: NOT_JSON, 2520: NO_TRAINED},  # by the parent, before the pool meets one
    ],
    ids=["pool", "pool-then-parse", "parse-then-pool"],
)
def test_the_first_bad_record_is_the_serial_error(
    tok: Any, tiny: TinyAssets, tmp_path: Path, bad: dict[int, Any]
) -> None:
    path = write(tmp_path / "chat.jsonl", _with_bad(chat_records(tiny, 3000), bad))
    line = min(bad) + 1
    errors = []
    for num_proc in (1, 2):
        root = tmp_path / f"cache{num_proc}"
        with pytest.raises(DataError) as info:
            build(tok, path, root, num_proc)
        errors.append(str(info.value))
        assert info.value.__cause__ is None  # not the pool process's traceback
        assert [p.name for p in root.iterdir() if p.suffix != ".lock"] == []  # no temp dir
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"{path}:{line}: ") and "\n" not in errors[0]
    assert _children() == []


def _config(num_proc: Any) -> dict[str, Any]:
    return {"model": {"name_or_path": "m"}, "checkpoint": {"output_dir": "out"},
            "data": {"train_files": ["x.jsonl"], "num_proc": num_proc}}  # fmt: skip


def test_num_proc_is_checked() -> None:
    assert from_dict(_config(3)).data.num_proc == 3
    assert from_dict(_config("auto")).data.num_proc == "auto"
    for bad in (0, -2, "all", 1.5, True):
        with pytest.raises(ConfigError) as info:
            from_dict(_config(bad))
        assert info.value.problems == [
            f"data.num_proc: must be an int >= 1 or 'auto' (got {bad!r})"
        ]
    assert DataConfig.model_validate({"train_files": ["x"]}).num_proc == "auto"
    assert parallel.resolve_num_proc("auto") == parallel.usable_cores() >= 1


def test_num_proc_is_in_no_fingerprint(tmp_path: Path) -> None:
    """A resume on another number of processes (or another node's cores) is the same run."""
    from distft.checkpoint.fingerprint import fingerprint

    data = write(tmp_path / "d.jsonl", [{"text": "hi there"}])
    prints = []
    for num_proc in (1, 4, "auto"):
        cfg = _config(num_proc)
        cfg["data"].update(train_files=[str(data)], cache_dir=str(tmp_path / "cache"))
        prints.append(fingerprint(from_dict(cfg)))
    assert prints[0] == prints[1] == prints[2]
