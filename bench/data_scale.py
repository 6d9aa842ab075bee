"""Data at scale: peak memory of `distft preprocess` against the dataset's size and against
one huge record, and start-up (launch -> first step) with a small and a big dataset.

    .venv/bin/python -m bench.data_scale rss [--sizes-mb 10 200 2000] [--line-mb 50]
    .venv/bin/python -m bench.data_scale startup [--small-mb 10 --big-mb 2000]

`rss`: each size is a JSONL file of long documents (~80 KB each, the `max_seq_len: 128`
case the issue met) with a short record after every ten; a child `distft preprocess` per
file, its peak RSS read from `os.wait4` (that child and nothing else). Then a file of ten
short records and one `--line-mb` line. The table gives each peak against the smallest
file's (a ratio near 1: memory does not follow the file). `--pythonpath` runs another
checkout's code (the old code, for the figures in a comment of tests/test_data_scale.py).

`startup`: per size, `distft preprocess`, then two fresh one-worker runs that stop after
step 1 (the first hashes the data once; the second is the warm start measured) and a
resume of the second to step 2. Launch -> first step of each, and big minus small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.harness import DISTFT, REPO, child_env, run_distft
from distft.assets import build_tiny_assets

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "data"]


def write_dataset(path: Path, size_mb: float, doc_kb: int = 80) -> int:
    """Long documents of ~`doc_kb` KB with a short record after every ten; the bytes."""
    block = " ".join(WORDS[i % len(WORDS)] + str(i % 97) for i in range(doc_kb * 200))
    doc = json.dumps({"text": block[: doc_kb * 1000]}) + "\n"
    short = json.dumps({"text": "say hi, hi there"}) + "\n"
    target, written = int(size_mb * 1e6), 0
    with path.open("w") as f:
        i = 0
        while written < target:
            line = short if i % 11 == 10 else doc
            f.write(line)
            written += len(line)
            i += 1
    return written


def write_huge_line(path: Path, line_mb: float) -> None:
    short = json.dumps({"text": "say hi, hi there"}) + "\n"
    word = "lorem ipsum dolor sit amet "
    text = (word * (int(line_mb * 1e6) // len(word) + 1))[: int(line_mb * 1e6)]
    path.write_text(short * 5 + json.dumps({"text": text}) + "\n" + short * 5)


def config(assets: Any, files: list[Path], cache: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(assets.model_dir)},
        "data": {
            "train_files": [str(f) for f in files],
            "max_seq_len": 128,
            "cache_dir": str(cache),
        },  # fmt: skip
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "batch": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 4},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "cluster": {"num_workers": 1},
        "checkpoint": {"output_dir": str(out), "every_n_steps": 1},
        "logging": {"every_n_steps": 1, "wandb": {"mode": "disabled"}},
    }


def preprocess_peak(cfg: dict[str, Any], work: Path, pythonpath: str) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `distft preprocess` child."""
    path = work / f"cfg-{time.time_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = child_env({"PYTHONPATH": pythonpath})
    t0 = time.perf_counter()
    with (work / f"{path.stem}.log").open("w") as log:
        proc = subprocess.Popen([DISTFT, "preprocess", str(path)], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"preprocess failed: {(work / f'{path.stem}.log').read_text()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def rss(args: argparse.Namespace, work: Path, assets: Any) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    def row(name: str, cfg: dict[str, Any]) -> None:
        peak, wall = preprocess_peak(cfg, work, args.pythonpath)
        ratio = peak / (rows[0]["peak_mib"] if rows else peak)
        rows.append({"file": name, "peak_mib": peak, "ratio": ratio, "wall_s": wall})
        print(f"{name:>18} {peak:>13,.0f} {ratio:>11.2f} {wall:>8.1f}", flush=True)

    print(f"{'dataset':>18} {'peak RSS MiB':>13} {'x smallest':>11} {'wall s':>8}", flush=True)
    for mb in args.sizes_mb:
        f = work / f"data-{mb}mb.jsonl"
        n = write_dataset(f, mb)
        row(f"{n / 1e6:,.0f} MB", config(assets, [f], work / f"c{mb}", work / "o"))
        f.unlink()
    f = work / "huge-line.jsonl"
    write_huge_line(f, args.line_mb)
    row(f"one {args.line_mb:g} MB line", config(assets, [f], work / "ch", work / "o"))
    return {"rss": rows}


def startup(args: argparse.Namespace, work: Path, assets: Any) -> dict[str, Any]:
    res: dict[str, dict[str, float]] = {}
    for name, mb in (("small", args.small_mb), ("big", args.big_mb)):
        f = work / f"{name}.jsonl"
        write_dataset(f, mb)
        cache = work / f"cache-{name}"
        preprocess_peak(config(assets, [f], cache, work / "o"), work, args.pythonpath)
        times = {}
        for run in ("first", "warm"):
            cfg = config(assets, [f], cache, work / f"out-{name}-{run}")
            times[run] = run_distft(cfg, work / f"w-{name}-{run}", ["batch.stop_after_steps=1"])
        resumed = run_distft(cfg, work / f"w-{name}-resume", ["batch.stop_after_steps=2"])
        res[name] = {"first_s": times["first"].first_step_at(1),
                     "warm_s": times["warm"].first_step_at(1),
                     "resume_s": resumed.first_step_at(2)}  # fmt: skip
    print(f"{'launch -> first step, s':>26} {'small':>8} {'big':>8} {'big - small':>12}")
    for k in ("first_s", "warm_s", "resume_s"):
        s, b = res["small"][k], res["big"][k]
        print(f"{k:>26} {s:>8.1f} {b:>8.1f} {b - s:>12.1f}")
    return {"startup": res}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("suite", choices=["rss", "startup"])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 200, 2000])
    p.add_argument("--line-mb", type=float, default=50)
    p.add_argument("--small-mb", type=float, default=10)
    p.add_argument("--big-mb", type=float, default=2000)
    p.add_argument("--pythonpath", default=str(REPO), help="the checkout whose code runs")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distft-data-scale-") as tmp:
        work = Path(tmp)
        assets = build_tiny_assets(work / "tiny", n_train=50, n_eval=10)
        res = rss(args, work, assets) if args.suite == "rss" else startup(args, work, assets)
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
