"""Named eval sets (`data.eval_sets`): config, overlap checks, the data pipeline (cache,
order, metric keys), the fingerprint, the report and the end-of-run summary. Single
process; the 2-worker run is tests/test_eval_sets_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from distft.assets import TinyAssets
from distft.checkpoint.fingerprint import fingerprint
from distft.config import ConfigError, from_dict, resolve_paths
from distft.data import prepare
from distft.data.pipeline import load
from distft.dist import DistContext

ONE = DistContext(0, 1, 0, torch.device("cpu"))


def config(tmp_path: Path, model: str = "m", **data: Any) -> Any:
    return from_dict(
        {
            "seed": 3,
            "model": {"name_or_path": model},
            "data": {"cache_dir": str(tmp_path / "cache"), "max_seq_len": 64, **data},
            "checkpoint": {"output_dir": str(tmp_path / "out")},
        }
    )


def problems(tmp_path: Path, **data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, **data)
    return info.value.problems


def tokenized(path: Path, tag: int, n: int) -> Path:
    """n pre-tokenized samples [tag, 100 + i, 7]: the set and index readable from ids."""
    path.write_text("".join(json.dumps({"input_ids": [tag, 100 + i, 7]}) + "\n" for i in range(n)))
    return path


def ids_of(split: Any) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in split.sample(k)[0][:2]) for k in range(len(split))]


def test_eval_sets_config_shape_and_one_line_errors(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        train_files="t.jsonl",
        eval_sets={"task": {"files": "a.jsonl"}, "general": {"sources": [{"hub": "org/x"}]}},
    )
    assert list(cfg.data.eval_sets) == ["task", "general"]  # config order is kept
    assert cfg.data.eval_sets["task"].files == ["a.jsonl"]  # a single string is a list
    assert [k for k, *_ in cfg.data.eval_set_keys()] == ["eval/task/loss", "eval/general/loss"]
    both = config(tmp_path, train_files="t", eval_files="e", eval_sets={"x": {"files": ["f"]}})
    assert [k for k, *_ in both.data.eval_set_keys()] == ["eval/loss", "eval/x/loss"]

    assert problems(tmp_path, train_files="t", eval_sets={"task": {}}) == [
        "data.eval_sets.task: an eval set needs 'files' or 'sources'"
    ]
    assert problems(tmp_path, train_files="t", eval_sets={"a/b": {"files": ["f"]}}) == [
        "data.eval_sets: eval set name 'a/b': use letters, digits, '_', '.', '-'"
    ]
    [line] = problems(tmp_path, train_files="t", eval_sets={"x": {"file": ["f"]}})
    assert line.startswith("data.eval_sets.x.file: unknown key")
    [line] = problems(tmp_path, train_files="t", eval_sets={"x": {"sources": [{"path": 1}]}})
    assert line.startswith("data.eval_sets.x.sources.0.path: ")


def test_overlap_and_missing_files_are_checked_for_every_set(tmp_path: Path) -> None:
    train = tokenized(tmp_path / "train.jsonl", 1, 4)
    held = tokenized(tmp_path / "held.jsonl", 2, 4)
    sets = {
        "ok": {"files": [str(held)]},
        "leak": {"files": [str(train)]},
        "inside": {"sources": [{"path": str(tmp_path)}]},  # a folder holding train.jsonl
        "hub": {"sources": [{"hub": "org/d", "split": "train"}]},
        "gone": {"files": [str(tmp_path / "missing.jsonl")]},
    }
    cfg = config(tmp_path, train_files=[str(train)], sources=[{"hub": "org/d"}], eval_sets=sets)
    with pytest.raises(ConfigError) as info:
        resolve_paths(cfg)
    lines = info.value.problems
    assert [line.split(":")[0] for line in lines] == [
        "data.eval_sets.gone.files",
        "data.eval_sets.leak.files",
        "data.eval_sets.inside.sources.0.path",
        "data.eval_sets.hub.sources.0.hub",
    ], lines
    assert "file not found" in lines[0] and all("also training data" in x for x in lines[1:])
    assert "data.eval_sets.ok" not in "\n".join(lines)


def test_pipeline_keeps_each_set_apart_in_a_fixed_order(tmp_path: Path, tiny: TinyAssets) -> None:
    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    train = tokenized(tmp_path / "train.jsonl", 1, 10)
    a, b, c = (tokenized(tmp_path / f"{n}.jsonl", tag, n_) for n, tag, n_ in
               (("a", 2, 3), ("b", 3, 5), ("c", 4, 2)))  # fmt: skip
    cfg = config(
        tmp_path,
        str(tiny.model_dir),
        train_files=[str(train)],
        val_fraction=0.2,
        eval_sets={"second": {"files": [str(b)]}, "first": {"files": [str(c), str(a)]}},
    )
    splits = prepare(cfg, tok, ONE)  # builds every set's cache entry, then loads
    sets = splits.eval_sets()
    # the unnamed set (here val_fraction's) first: the one keep_best ranks by
    assert list(sets) == ["eval/loss", "eval/second/loss", "eval/first/loss"]
    assert sorted(t for t, _ in ids_of(sets["eval/loss"])) == [1, 1]
    assert ids_of(sets["eval/second/loss"]) == [(3, 100 + i) for i in range(5)]
    # a set's sources concatenated in config order
    assert ids_of(sets["eval/first/loss"]) == [(4, 100), (4, 101), (2, 100), (2, 101), (2, 102)]
    assert [m["source"] for m in splits.metas][-3:] == [str(b), str(c), str(a)]
    again = load(cfg, tok)  # from the cache: the same sets, the same order
    assert {k: ids_of(s) for k, s in again.eval_sets().items()} == {
        k: ids_of(s) for k, s in sets.items()
    }

    from distft.data import TrainBatches, describe

    stats, lines = describe(splits, TrainBatches(splits.train, cfg, ONE, tok.pad_token_id))
    assert stats["data/eval_samples"] == 2 + 5 + 5
    assert stats["data/eval/second/samples"] == 5 and stats["data/eval/first/samples"] == 5
    assert lines[0].endswith("eval 12 samples, second 5, first 5")


def test_fingerprint_covers_named_eval_files(tmp_path: Path) -> None:
    train = tokenized(tmp_path / "train.jsonl", 1, 4)
    held = tokenized(tmp_path / "held.jsonl", 2, 4)
    cfg = config(tmp_path, train_files=[str(train)], eval_sets={"x": {"files": [str(held)]}})
    before = fingerprint(cfg)
    tokenized(held, 2, 5)
    assert fingerprint(cfg)["data_files"] != before["data_files"]


ROWS = [
    {"step": 0, "time": 0.0, "eval/task/loss": 5.0, "eval/general/loss": 1.5},
    {"step": 1, "time": 1.0, "train/loss": 4.0, "train/lr": 1e-3},
    {"step": 2, "time": 2.0, "train/loss": 3.0, "eval/task/loss": 2.0, "eval/general/loss": 2.5},
]


def test_report_plots_and_summarises_every_set(tmp_path: Path) -> None:
    from distft.report import write_report
    from distft.report_plots import PLOTS, eval_series, metrics_of

    assert eval_series(ROWS) == [
        ("eval/task/loss", "eval task"),
        ("eval/general/loss", "eval general"),
    ]
    rows = [{"step": 0, "eval/x/loss": 1.0, "eval/loss": 2.0}]
    assert [k for k, _ in eval_series(rows)] == ["eval/loss", "eval/x/loss"]  # unnamed first
    assert [k for k, _ in metrics_of(PLOTS[0], ROWS)] == [
        "train/loss",
        "eval/task/loss",
        "eval/general/loss",
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    page = write_report(run).read_text()
    assert "eval task loss (first → last)</th><td>5.0000 → 2.0000" in page
    assert "eval general loss (first → last)</th><td>1.5000 → 2.5000" in page
