"""The benchmark harness (`bench/`): its measurements and data on their own, and the GPU
script run end to end on CPU at a tiny size (`bench/gpu.py --tiny`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import harness as h
from bench.hf_trainer import Collator, pack_rows
from bench.samples import IGNORE, length_stats, sft_samples
from tests.support import REPO


def test_rate_leaves_the_warmup_steps_out() -> None:
    times = [0.0, 10.0, 11.0, 12.0, 13.0]  # step ends: a slow 2nd step, then 1 step/s
    assert h.rate(times, skip=2) == 1.0
    assert h.rate(times, [100, 100, 5, 5, 5], skip=2) == 5.0
    for skip in (0, 4):
        with pytest.raises(h.BenchError, match="need skip >= 1 and more steps"):
            h.rate(times, skip=skip)
    assert h.steps_per_s([0.0, 10.0, 11.0, 12.0, 15.0, 16.0], skip=2) == 1.0  # 1, 3, 1 s
    assert h.spread([3.0, 1.0, 2.0], "{:.1f}") == "2.0 (1.0–3.0)"


def test_sft_samples_are_skewed_like_instruction_data(tiny: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model_dir)
    rows = sft_samples(tok, 600, seed=0)
    st = length_stats(rows)
    assert 80 <= st["median"] <= 125 and st["max"] == 512 and st["mean"] > st["median"]
    for r in rows[:50]:
        assert len(r["input_ids"]) == len(r["labels"]) <= 512
        assert r["labels"][0] == IGNORE and any(x != IGNORE for x in r["labels"])
        trained = [i for i, x in zip(r["input_ids"], r["labels"], strict=True) if x != IGNORE]
        assert tok.decode(trained).count("<|end|>") >= 1  # answers end their turn
    assert sft_samples(tok, 5, seed=0) == rows[:5]  # deterministic in the seed


def test_pack_rows_keeps_every_sample_once_and_isolates_them() -> None:
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 9, 3, 7, 2, 8])]
    packed = pack_rows(rows, capacity=10)
    assert all(len(p["input_ids"]) <= 10 for p in packed)
    assert sorted(x for p in packed for x in p["input_ids"]) == sorted(
        x for r in rows for x in r["input_ids"]
    )
    assert len(packed) == 4  # 9 | 8+2 | 7+3 | 5 (best fit decreasing)
    for p in packed:
        starts = [k for k, pos in enumerate(p["position_ids"]) if pos == 0]
        assert all(p["labels"][k] == IGNORE for k in starts)  # never predicted across samples
    batch = Collator(pad_id=0, strategy="packed")(packed[1:3])
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: SDPA gets packs
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_collator_pads_and_its_batches_count_like_distfts() -> None:
    """The baseline's tokens and attention FLOPs are counted from what its model gets, with
    the same `sequence_lengths` distft uses."""
    from types import SimpleNamespace

    from distft.flops import sequence_lengths

    def lengths(batch: dict) -> list[int]:
        ns = SimpleNamespace(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"),
                             attention_mask=batch.get("attention_mask"))  # fmt: skip
        return sequence_lengths(ns, pad_id=0).tolist()

    padded = Collator(pad_id=0, strategy="group_by_length")(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    )
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"][1].tolist() == [5, IGNORE, IGNORE]
    assert lengths(padded) == [3, 1]
    rows = [{"input_ids": [n] * n, "labels": [n] * n} for n in (3, 2, 6)]
    packed = Collator(pad_id=0, strategy="packed")(pack_rows(rows, 6))  # [6], [3+2 and a pad]
    assert sorted(lengths(packed)) == [2, 3, 6]
    flat = Collator(pad_id=0, strategy="flatten")(rows)
    assert flat["input_ids"].shape == (1, 11) and sorted(lengths(flat)) == [2, 3, 6]


def test_length_grouped_budget_matches_the_baseline_batch() -> None:
    from bench.suites import calibrate_budget
    from distft.data.packing import length_groups

    lengths = np.random.default_rng(0).integers(20, 300, size=800)
    budget = calibrate_budget(lengths, 4.0)
    assert budget >= lengths.max()
    units = len(length_groups(np.sort(lengths), budget)) - 1
    assert units <= 800 / 4 < len(length_groups(np.sort(lengths), budget - 4)) - 1


def test_worker_and_checkpoint_lines_are_parsed(tmp_path: Path) -> None:
    """The line as distft/worker.py writes it (through Ray's log prefix)."""
    worker = (REPO / "distft" / "worker.py").read_text()
    assert 'dist.log(f"ready in {laps[-1][1] - t_start:.1f}s ({split}); ' in worker
    line = (
        "\x1b[36m(RayTrainWorker pid=1)\x1b[0m [distft] ready in 5.8s (dist init 0.21s, "
        "data 3.05s, model 0.27s, deepspeed 1.13s, restore+logger 1.14s); 30 steps"
    )
    m = h._READY.search(line)
    assert m is not None
    assert m.group(1).split(", ")[-1] == "restore+logger 1.14s"
    coordinator = (REPO / "distft" / "checkpoint" / "coordinator.py").read_text()
    assert 'f"checkpoint {tag} committed: {size / 1e6:.1f} MB in {now - t0:.2f}s ({how})"' in (
        coordinator
    )
    log = tmp_path / "run.log"
    saved = "committed: 214.1 MB in 0.79s (write 0.60s, hash+fsync 0.19s, commit 0.00s)"
    log.write_text(line + f"\n[distft] checkpoint step_00000012 {saved}\n")
    run = h.DistftRun(tmp_path, 0.0, 0.0, [], log)
    assert run.checkpoint_saves() == {12: 0.79}


def test_cpu_table_has_one_row_per_measurement() -> None:
    from bench.run import render

    res = {
        "p1": {"distft_sps": [9.8, 10.0], "hand_sps": [10.0, 10.2], "no_ray_sps": [10.1]},
        "p2": {
            "stats": {"samples": 2000, "median": 101, "p90": 226, "max": 512},
            "distft_max_seq_len": 530,
            "distft": {"tok_s": [30e3], "eval_loss": [2.0], "tokens_per_step": [1990]},
            "group_by_length": {"tok_s": [25e3], "eval_loss": [2.1], "tokens_per_step": [1980]},
            "random": {"tok_s": [10e3], "eval_loss": [2.1], "tokens_per_step": [1985]},
        },
        "p3": {"bytes": 200 * 2**20, "save_s": [0.9], "stall_s": [1.0], "dd_s": [0.5],
               "step_s": 0.1, "fresh_first_step_s": 30.0, "resume_first_step_s": 33.0,
               "fresh_restore_s": 1.0, "resume_restore_s": 2.0},
        "p5": {"total_s": [30.0], "cli_s": 3.0, "ray_init_s": 5.0, "ray_train_workers_s": 10.0,
               "phases_s": {"dist init": 0.2, "data": 3.0}, "first_step_s": 0.1},
        "scaling": {"one_sps": [5.0], "two_sps": [9.0], "hand_one_sps": [5.0],
                    "hand_two_sps": [10.0]},
    }  # fmt: skip
    table = render(res)
    assert "| 0.980 | >= 0.97 |" in table  # P1 ratio of medians: 9.9 / 10.1
    assert "no Ray (diagnostic): steps/s | 10.10 | hand-written" in table
    assert "best HF Trainer `group_by_length`" in table and "| 1.20x | >= 1.2x |" in table
    assert "| -0.100 | <= baseline |" in table
    assert "| 1.80x (90% efficiency) | hand-written loop 2.00x (100%) | 0.90 |" in table
    assert "| 5.00 | hand-written DeepSpeed loop 5.00 | 1.000 |" in table
    assert len([ln for ln in table.splitlines() if ln.startswith("| P5 . ")]) == 6
    widths = {ln.count("|") for ln in table.splitlines()}
    assert widths == {6}


def test_bench_rejects_an_unknown_suite() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "p1,p9"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown ['p9']" in proc.stderr


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu_and_prints_its_table(tmp_path: Path) -> None:
    """Both systems through distft's CLI and HF Trainer, on the LoRA configuration (the one
    with most parts: adapters, their FLOP count); `full` and `full_ckpt` differ from it only
    in the sections they set, and ran on the H200 (BENCHMARKS.md)."""
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--out", str(tmp_path), "--peak-tflops", "1",
         "--configs", "lora"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln.split("|")[1:-1] for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert [c.strip() for c in rows[0]] == [
        "config", "system", "tokens/s", "MFU", "peak mem GiB", "s/step", "vs HF",
    ]  # fmt: skip
    body = [[c.strip() for c in r] for r in rows[1:]]
    assert [(r[0], r[1]) for r in body] == [("lora", "distft"), ("lora", "hf")]
    for _, system, tok_s, mfu, mem, step_s, vs in body:
        assert float(tok_s.replace(",", "")) > 100
        assert re.fullmatch(r"\d+\.\d%", mfu) and 0 < float(mfu[:-1]) < 100
        assert 0.05 < float(mem) < 16 and float(step_s) > 0
        assert (vs == "") == (system == "hf") and (system == "hf" or vs.endswith("x"))


def test_loss_memory_runs_tiny_and_both_paths_give_the_same_loss() -> None:
    """`bench/loss_memory.py` at a tiny size on CPU: a table row per token count, and the
    chunked loss equal to the head at once (fp32 sums of 96 terms, reassociated)."""
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "bench.loss_memory", "--vocab", "300", "--hidden", "16",
         "--tokens", "96", "--chunk", "40", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(ln.startswith("| 96 | ") and ln.endswith("x |") for ln in proc.stdout.splitlines())
    rows = {r["method"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert set(rows) == {"unchunked", "chunked"}
    want = rows["unchunked"]["loss"]
    assert abs(rows["chunked"]["loss"] - want) <= 1e-6 * abs(want)
