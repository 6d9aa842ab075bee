"""Sources (JSON/JSONL, Parquet, CSV, folders, hub datasets), mixing weights, val_fraction,
max_samples, the data config keys, the preprocessing cache (reuse, invalidation,
concurrent builders), the driver-side record check, statistics and `distft preprocess`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from distft.assets import TinyAssets
from distft.config import ConfigError, from_dict
from distft.data import DataError, TrainBatches, check_records, describe, prepare
from distft.data.cache import is_checked, source_specs
from distft.data.pipeline import build, cache_context, load
from distft.data.records import load_hub
from distft.dist import DistContext
from tests.support import DISTFT, REPO, tiny_config, write_config

ONE = DistContext(0, 1, 0, torch.device("cpu"))
RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("a", "b", "c", "d")]


@pytest.fixture(scope="module")
def tok(tiny: TinyAssets) -> Any:
    return AutoTokenizer.from_pretrained(tiny.model_dir)


def make_cfg(tmp_path: Path, tiny: TinyAssets, **data: Any) -> Any:
    return from_dict(
        {
            "seed": 3,
            "model": {"name_or_path": str(tiny.model_dir)},
            "data": {"cache_dir": str(tmp_path / "cache"), "max_seq_len": 64, **data},
            "batch": {"micro_batch_size": 2, "grad_accum": 1},
            "checkpoint": {"output_dir": str(tmp_path / "out")},
        }
    )


def jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tokenized(path: Path, tag: int, n: int) -> Path:
    """n pre-tokenized samples [tag, 100 + i, 7]: the source and index readable from ids."""
    return jsonl(path, [{"input_ids": [tag, 100 + i, 7]} for i in range(n)])


def ids_of(split: Any) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in split.sample(k)[0][:2]) for k in range(len(split))]


# ----------------------------------------------------------------------------- config


def test_source_config_rules(tmp_path: Path, tiny: TinyAssets) -> None:
    def problems(**data: Any) -> list[str]:
        with pytest.raises(ConfigError) as e:
            make_cfg(tmp_path, tiny, **data)
        return e.value.problems

    assert problems(sources=[{"path": "a", "hub": "b"}]) == [
        "data.sources.0: give exactly one of 'path' (local) or 'hub' (datasets hub name)"
    ]
    assert problems() == ["data: no training data: set data.train_files or data.sources"]
    bad_field = problems(train_files=["a"], fields={"question": "q"})[0]
    assert bad_field.startswith("data.fields: unknown field 'question'; allowed: instruction,")
    assert problems(train_files=["a"], eval_files=["b"], val_fraction=0.1) == [
        "data: data.val_fraction: set it or eval_files/eval_sources, not both"
    ]
    line = problems(train_files=["a"], batching="sorted")[0]
    assert line.startswith("data.batching: Input should be 'auto', 'packed', 'length_grouped'")
    cfg = make_cfg(tmp_path, tiny, train_files="a.jsonl", sources=[{"hub": "org/name"}])
    assert cfg.data.train_files == ["a.jsonl"] and cfg.data.sources[0].split == "train"


# ----------------------------------------------------------------------------- sources


def test_parquet_csv_json_and_folders(tmp_path: Path, tiny: TinyAssets) -> None:
    root = tmp_path / "data"
    jsonl(root / "b" / "part.jsonl", RECORDS[:1])
    pq.write_table(pa.Table.from_pylist(RECORDS[1:3]), root / "a.parquet")
    csv = root / "c.csv"
    csv.write_text('instruction,input,output\n"Say\nd.",,d\n', encoding="utf-8")
    jsonl(root / ".hidden" / "x.jsonl", [{"broken": True}])
    (root / "notes.txt").write_text("not data")
    cfg = make_cfg(tmp_path, tiny, train_files=[str(root)])
    samples = []
    from distft.data.formats import ReadReport, parse

    spec = source_specs(cfg.data, "train")[0]
    samples = list(parse(spec.raws(), "auto", {}, "error", ReadReport()))
    assert [s.source for s in samples] == [
        f"{root / 'a.parquet'}:1",
        f"{root / 'a.parquet'}:2",
        f"{root / 'b' / 'part.jsonl'}:1",
        f"{csv}:3",  # the CSV record spans lines 2-3
    ]
    assert [s.messages[-1]["content"] for s in samples] == ["b", "c", "a", "d"]
    assert samples[-1].messages[0]["content"] == "Say\nd."

    csv.write_text("instruction,output\nx,y,z\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        check_records(cfg)
    assert str(e.value) == f"{csv}:2: more values than the header has columns"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(DataError) as e:
        check_records(make_cfg(tmp_path, tiny, train_files=[str(empty)]))
    assert str(e.value) == f"{empty}: folder holds no .jsonl/.json/.parquet/.csv files"


def test_hub_datasets(tmp_path: Path, tiny: TinyAssets, tok: Any, monkeypatch: Any) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        load_hub("nobody/no-such-dataset", None, "train", None)
    assert str(e.value).startswith(
        "nobody/no-such-dataset: hub dataset is not in the local cache and could not be "
        "downloaded ("
    )
    # A dataset directory on disk goes through the same `load_dataset` path.
    local = tmp_path / "hubdir"
    local.mkdir()
    pq.write_table(pa.Table.from_pylist(RECORDS), local / "train.parquet")
    cfg = make_cfg(tmp_path, tiny, sources=[{"hub": str(local)}])
    check_records(cfg)  # hub sources are left to the workers
    splits = prepare(cfg, tok, ONE)
    assert len(splits.train) == 4 and splits.metas[0]["source"] == str(local)
    with pytest.raises(DataError, match=r"Unknown split"):
        build(make_cfg(tmp_path, tiny, sources=[{"hub": str(local), "split": "nope"}]), tok)


def test_mixing_weights_val_fraction_and_max_samples(tmp_path: Path, tiny: TinyAssets, tok: Any):
    a, b = tokenized(tmp_path / "a.jsonl", 1, 40), tokenized(tmp_path / "b.jsonl", 2, 20)
    sources = [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2.0}]
    cfg = make_cfg(tmp_path, tiny, sources=sources, val_fraction=0.1)
    splits = prepare(cfg, tok, ONE)
    train, held = ids_of(splits.train), ids_of(splits.eval)
    assert sorted(t for t, _ in held) == [1] * 4 + [2] * 2  # 10% of each source
    assert not set(held) & set(train)
    assert sum(t == 1 for t, _ in train) == 18  # 0.5 x the 36 left
    from_b = [x for x in train if x[0] == 2]
    assert len(from_b) == 36 and all(from_b.count(x) == 2 for x in from_b)  # each twice
    again = prepare(cfg, tok, ONE)
    assert ids_of(again.train) == train and ids_of(again.eval) == held
    other_seed = load(cfg.model_copy(update={"seed": 4}), tok)
    assert ids_of(other_seed.eval) != held

    capped = make_cfg(tmp_path, tiny, train_files=[str(a), str(b)], max_samples=5)
    assert ids_of(load_after_build(capped, tok).train) == [(1, 100 + i) for i in range(5)] + [
        (2, 100 + i) for i in range(5)
    ]
    per_source = make_cfg(tmp_path, tiny, sources=[{"path": str(a), "max_samples": 3}])
    assert len(load_after_build(per_source, tok).train) == 3


def load_after_build(cfg: Any, tok: Any) -> Any:
    build(cfg, tok)
    return load(cfg, tok)


def test_empty_after_filtering_is_an_error(tmp_path: Path, tiny: TinyAssets, tok: Any) -> None:
    bad = jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}, {"output": 1}])
    with pytest.raises(DataError) as e:
        build(make_cfg(tmp_path, tiny, train_files=[str(bad)], on_bad_record="skip"), tok)
    assert str(e.value) == (
        f"{bad}: no usable samples (0 records read, 2 skipped, 0 over max_seq_len dropped)"
    )
    long = jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 80, "output": "x"}])
    with pytest.raises(DataError) as e:
        build(make_cfg(tmp_path, tiny, train_files=[str(long)], too_long="drop"), tok)
    assert str(e.value) == (
        f"{long}: no usable samples (1 records read, 0 skipped, 1 over max_seq_len dropped)"
    )
    # truncation that leaves no trained token: only the tokenizer can tell, and it names it
    with pytest.raises(DataError) as e:
        build(make_cfg(tmp_path, tiny, train_files=[str(long)]), tok)
    assert str(e.value) == f"{long}:1: no trainable tokens after truncation to max_seq_len"


# ----------------------------------------------------------------------------- cache


def test_cache_is_reused_and_keyed_on_what_changes_tokens(
    tmp_path: Path, tiny: TinyAssets, tok: Any
) -> None:
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    cfg = make_cfg(tmp_path, tiny, train_files=[str(data)])
    first = build(cfg, tok)
    assert [r.built for r in first] == [True]
    assert [r.built for r in build(cfg, tok)] == [False]
    # batching and seed do not change the tokens: same entry
    same = cfg.model_copy(update={"seed": 9}, deep=True)
    same.data.batching = "packed"
    assert [r.path for r in build(same, tok)] == [first[0].path]
    changed = []
    for key, value in (("max_seq_len", 32), ("train_on", "all"), ("too_long", "drop")):
        other = cfg.model_copy(deep=True)
        setattr(other.data, key, value)
        changed.append(build(other, tok)[0].path)
    tok2 = AutoTokenizer.from_pretrained(tiny.model_dir)
    tok2.chat_template = tok.chat_template.replace("\n", "\n\n", 1)
    changed.append(build(cfg, tok2)[0].path)
    jsonl(data, RECORDS[:3])  # the file changes
    changed.append(build(cfg, tok)[0].path)
    assert len({first[0].path, *changed}) == 6
    splits = load(cfg, tok)
    assert isinstance(splits.train.parts[0].ids, np.memmap)  # memory-mapped, not copied
    assert len(splits.train) == 3


def test_concurrent_builders_build_once(tmp_path: Path, tiny: TinyAssets) -> None:
    """Two `distft preprocess` at once on a fresh cache: one builds, the other waits on
    the lock and reuses the entry. Then a second run only loads."""
    records = [{"instruction": f"Repeat {i}.", "output": f"{i} " * (i % 30)} for i in range(3000)]
    data = jsonl(tmp_path / "big.jsonl", records)
    cfg = tiny_config(tiny, tmp_path / "out")
    cfg["data"] = {"train_files": [str(data)], "cache_dir": str(tmp_path / "cache")}
    path = write_config(tmp_path / "c.yaml", cfg)
    procs = [
        subprocess.Popen([DISTFT, "preprocess", str(path)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    built = [o for o, _ in outs if "preprocessed " in o]
    assert len(built) == 1 and sum("cached " in o for o, _ in outs) == 1, outs
    assert "3,000 samples" in built[0] and "tokens/s)" in built[0]
    assert "data: batching length_grouped:" in built[0]


def test_check_records_skips_sources_already_parsed(tmp_path: Path, tiny: TinyAssets, tok: Any):
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    cfg = make_cfg(tmp_path, tiny, train_files=[str(data)])
    spec = source_specs(cfg.data, "train")[0]
    assert not is_checked(Path(cfg.data.cache_dir), spec, "error")
    check_records(cfg)
    build(cfg, tok)
    assert is_checked(Path(cfg.data.cache_dir), spec, "error")
    jsonl(data, [*RECORDS, {"instruction": 3, "output": "x"}])  # changed: parsed again
    with pytest.raises(DataError, match=rf"^{data}:5: field 'instruction' must be a string"):
        check_records(cfg)


# ----------------------------------------------------------------------------- stats


def test_statistics(tmp_path: Path, tiny: TinyAssets, tok: Any) -> None:
    cfg = make_cfg(
        tmp_path,
        tiny,
        train_files=[str(tiny.train_file), str(tiny.chat_train_file)],
        eval_files=[str(tiny.eval_file)],
        batching="packed",
    )
    splits = prepare(cfg, tok, DistContext(0, 2, 0, torch.device("cpu")))
    batches = TrainBatches(splits.train, cfg, ONE, tok.pad_token_id)
    metrics, lines = describe(splits, batches)
    lengths = splits.train.lengths
    assert metrics["data/train_samples"] == len(splits.train) == 4000
    assert metrics["data/eval_samples"] == 200
    assert metrics["data/train_tokens"] == lengths.sum()
    assert 0 < metrics["data/train_target_tokens"] < metrics["data/train_tokens"]
    assert (metrics["data/len_min"], metrics["data/len_max"]) == (lengths.min(), lengths.max())
    assert metrics["data/len_median"] == np.median(lengths)
    assert 0.9 < metrics["data/non_pad_fraction"] <= 1 and 0.9 < metrics["data/pack_fill"] <= 1
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert lines[0].startswith("data: train 4,000 samples, ")
    assert lines[2].startswith("data: batching packed: ")
    padded = cfg.model_copy(deep=True)
    padded.data.batching = "padded"
    pad_metrics, _ = describe(splits, TrainBatches(splits.train, padded, ONE, tok.pad_token_id))
    assert pad_metrics["data/non_pad_fraction"] < metrics["data/non_pad_fraction"]
    assert cache_context(cfg, tok).settings.max_seq_len == 64
