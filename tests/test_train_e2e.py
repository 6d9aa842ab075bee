"""`distft train` end to end: real Ray (embedded), 2 DeepSpeed ranks on gloo, real peft.

Each run fine-tunes the tiny Llama for a few steps, then the test reloads what the run
saved with plain transformers/peft and checks it computes the engine's eval loss.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from distft.data import encode, read_conversations
from distft.tolerance import Kind, assert_close
from tests.reference_runs import RUNS, TrainedRun
from tests.support import read_metrics, run_cli, tiny_config, wandb_history, write_config

pytestmark = pytest.mark.slow


def plain_eval_loss(model: Any, tokenizer: Any, eval_file: Path, max_seq_len: int) -> float:
    """Token-weighted eval NLL with a plain HF forward, one sample at a time (no padding)."""
    convs, _ = read_conversations([str(eval_file)])
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in convs:
            ids, labels, _ = encode(tokenizer, conv, max_seq_len)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


@pytest.fixture(params=sorted(RUNS))
def run(request: pytest.FixtureRequest, trained: dict[str, TrainedRun]):
    r = trained[request.param]
    return r.name, r.cfg, r.out, r.proc


def test_run_trains_and_reports_eval_loss(run) -> None:
    name, cfg, out, proc = run
    m = re.search(r"eval loss ([\d.]+) -> ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    before, after = float(m.group(1)), float(m.group(2))
    # LoRA on a random-init base moves slowly in 8 steps; full fine-tuning moves fast.
    assert after < before - (0.1 if cfg.get("lora", {}).get("enabled") else 0.3), (before, after)
    rows = read_metrics(out)
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, cfg["batch"]["max_steps"] + 1))
    assert all(
        math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0
        for r in rows
        if "train/loss" in r
    )
    assert rows[-1]["eval/loss"] == pytest.approx(after, abs=5e-5)  # printed with 4 decimals
    saved = (out / "config.yaml").read_text()
    assert "zero_stage" in saved


def test_saved_model_reloads_with_plain_hf_and_matches_engine(run, tiny: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, cfg, out, _ = run
    final = out / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    if cfg.get("lora", {}).get("enabled"):
        from peft import PeftModel

        adapter = load_file(final / "adapter_model.safetensors")
        assert adapter and all(t.numel() > 0 for t in adapter.values())  # not ZeRO-3 `[0]`s
        assert any("lora_B" in k and t.abs().sum() > 0 for k, t in adapter.items())
        base = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        weights = load_file(final / "model.safetensors")
        assert all(t.numel() > 0 for t in weights.values())
    model.eval()
    engine_loss = read_metrics(out)[-1]["eval/loss"]
    ours = plain_eval_loss(model, tokenizer, tiny.eval_file, cfg["data"]["max_seq_len"])
    # the engine's batched, padded evaluation vs one sample at a time: reassociated sums
    assert_close(ours, engine_loss, torch.float32, Kind.REASSOCIATED, "eval loss")


def test_zero3_really_shards(run) -> None:
    name, cfg, out, _ = run
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    optim = sorted(ckpt.glob("*optim_states.pt"))
    assert len(optim) == 2  # one optimizer-state shard per rank (ZeRO >= 1)
    sizes = [p.stat().st_size for p in optim]
    assert abs(sizes[0] - sizes[1]) < 0.05 * sizes[0]
    if cfg["deepspeed"]["zero_stage"] != 3 or cfg.get("lora", {}).get("enabled"):
        return
    # ZeRO-3: no rank holds the module's weights; each holds half of fp32 Adam state.
    model_bytes = (out / "final" / "model.safetensors").stat().st_size
    module_states = sorted(ckpt.glob("zero_pp_rank_*_model_states.pt"))
    assert len(module_states) == 2
    assert all(p.stat().st_size < 0.1 * model_bytes for p in module_states)
    full_adam = 3 * model_bytes  # fp32 master + exp_avg + exp_avg_sq
    assert all(0.4 * full_adam < s < 0.6 * full_adam for s in sizes), (sizes, full_adam)


def test_wandb_offline_records_hold_the_logged_losses(run) -> None:
    _, _, out, _ = run
    history = wandb_history(out)
    logged = {step: row["train/loss"] for step, row in history if "train/loss" in row}
    expected = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    assert logged and logged.keys() == expected.keys()
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-12)
    assert any("eval/loss" in row for _, row in history)


def test_data_error_in_the_first_records_is_found_before_ray(tiny: Any, tmp_path: Path) -> None:
    """Every sample loses its assistant turn to truncation: `train` encodes the first
    records with the real tokenizer before any worker starts (one line, exit 2)."""
    out = tmp_path / "run"
    cfg = tiny_config(tiny, out, data={"max_seq_len": 12, "eval_files": []})
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert re.match(r"error: .*train\.jsonl:1: no trainable tokens after truncation", errors[0])
    assert not (out / "launches.jsonl").exists()  # no worker group was started


def test_worker_side_data_error_is_one_line_exit_2(tiny: Any, tmp_path: Path) -> None:
    """A bad record past the ones the driver encodes (the first 2,000 and every 100th
    after them, `distft.data.pipeline.VALIDATE_FIRST`) is found in the workers. Bad input
    is not a crash: with restarts allowed, it still ends the run at the first attempt."""
    from distft.data.pipeline import VALIDATE_EVERY, VALIDATE_FIRST

    lines = tiny.train_file.read_text().splitlines()[:VALIDATE_FIRST]
    lines += tiny.eval_file.read_text().splitlines()[: VALIDATE_EVERY - 1]
    bad_at = VALIDATE_FIRST + VALIDATE_EVERY // 2  # a 0-based index the driver skips
    # an instruction longer than max_seq_len: truncation leaves no answer token
    lines[bad_at] = json.dumps({"instruction": "cat dog " * 200, "output": "sun"})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    cfg = tiny_config(tiny, out, data={"train_files": [str(data)], "eval_files": []})
    cfg["cluster"]["max_failures"] = 3
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "restarting the workers" not in proc.stderr
    starts = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert [s["restart"] for s in starts] == [0], starts
    line = bad_at + 1
    assert re.match(
        rf"error: .*train\.jsonl:{line}: no trainable tokens after truncation", errors[0]
    )
