"""Reward models through `distft train` (real Ray, real DeepSpeed, CPU ranks) on the tiny
preference pairs (`distft.assets.preference_pairs`: chosen answers the task, rejected does
not), from the random-init tiny Llama:

- full fine-tune, ZeRO-3, 2 workers: held-out accuracy rises clearly; the exported model
  loads in plain transformers (`AutoModelForSequenceClassification`) and scores the
  held-out pairs as the run's own evaluation did; `distft export` of the checkpoint
  verifies;
- LoRA, ZeRO-2, 1 worker: peft trains the `score` head whole; the adapter loads with
  `AutoPeftModelForSequenceClassification` and ranks the held-out pairs as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support import (
    read_metrics,
    run_cli,
    run_cli_concurrently,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.slow

STEPS = 40
ZERO3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def reward_config(tiny: Any, out: Path, **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "data": {
            "train_files": [str(tiny.pref_train_file)],
            "eval_files": [],
            "eval_sets": {"pref": {"files": [str(tiny.pref_eval_file)]}},
            "format": "preference",
            "max_samples": 512,
        },
        "objective": {"method": "reward"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "batch": {"micro_batch_size": 8, "grad_accum": 1, "max_steps": STEPS},
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "ds_config": ZERO3},
        "eval": {"every_n_steps": STEPS, "micro_batch_size": 16},
        "logging": {"every_n_steps": 1, "wandb": {"mode": "disabled"}},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_config(out.parent / f"{out.name}.yaml", tiny_config(tiny, out, **base))


@pytest.fixture(scope="module")
def runs(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward")
    configs = {
        "full": reward_config(tiny, root / "full"),
        "lora": reward_config(
            tiny,
            root / "lora",
            lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0},
            optim={"lr": 1e-2, "warmup_steps": 2},
            batch={"micro_batch_size": 8, "grad_accum": 2, "max_steps": STEPS},
            deepspeed={"zero_stage": 2, "precision": "fp32"},
            cluster={"num_workers": 1},
        ),
    }
    procs = run_cli_concurrently(*[("train", str(c)) for c in configs.values()])
    for name, proc in zip(configs, procs, strict=True):
        assert proc.returncode == 0, name + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "data: train 512 pairs" in proc.stdout, proc.stdout[-2000:]
    return {name: root / name for name in configs}


def learned(out: Path) -> float:
    """The run's held-out rewards/accuracy after training, which must have risen clearly
    from before (step 0); measured 0.51 -> 0.735 (full) and 0.51 -> 0.725 (LoRA)."""
    evals = [r for r in read_metrics(out) if "eval/pref/rewards/accuracy" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    before, after = (r["eval/pref/rewards/accuracy"] for r in evals)
    assert after >= 0.65 and after - before >= 0.15, (before, after)
    return float(after)


@torch.no_grad()
def plain_accuracy(model: Any, tokenizer: Any, pairs_file: Path) -> float:
    """Held-out pairs scored as a user scores them: each conversation rendered with the
    saved tokenizer's chat template, one sequence at a time, `logits[0, 0]` the reward."""
    model.eval()

    def reward(prompt: list[dict[str, str]], reply: str) -> float:
        messages = [*prompt, {"role": "assistant", "content": reply}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return float(model(torch.tensor([ids])).logits[0, 0])

    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    wins = [reward(p["prompt"], p["chosen"]) > reward(p["prompt"], p["rejected"]) for p in pairs]
    return sum(wins) / len(pairs)


def assert_ranks_as_the_run(model: Any, tokenizer: Any, pairs_file: Path, after: float) -> None:
    """The same 200 pairs the run evaluated, tokenized by the chat template instead of by
    distft and scored one by one instead of in packed batches: the same ranking, up to a
    pair whose two rewards are within rounding of each other."""
    plain = plain_accuracy(model, tokenizer, pairs_file)
    assert abs(plain - after) <= 0.01, (plain, after)


def test_a_reward_model_learns_and_loads_in_plain_transformers(
    runs: dict[str, Path], tiny: Any
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = runs["full"]
    after = learned(out)
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("train/rewards/margins" in r for r in rows)

    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert config["pad_token_id"] == tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert_ranks_as_the_run(model, tokenizer, tiny.pref_eval_file, after)
    refused = run_cli("chat", str(out), "--prompt", "hi")  # scores text, does not generate
    assert refused.returncode == 2 and "a reward model" in refused.stderr, refused.stderr


def test_a_reward_checkpoint_exports_and_verifies(runs: dict[str, Path], tmp_path: Path) -> None:
    from distft.export import export_checkpoint

    result = export_checkpoint(runs["full"], tmp_path / "export")
    assert result.kind == "full model" and result.verdict.startswith("verified"), result
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]


def test_a_lora_reward_model_trains_its_head_and_loads_with_peft(
    runs: dict[str, Path], tiny: Any
) -> None:
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = runs["lora"]
    after = learned(out)
    final = out / "final"
    saved = load_file(final / "adapter_model.safetensors")
    heads = [k for k in saved if ".score." in k]
    assert heads and any("lora_B" in k for k in saved), sorted(saved)[:8]
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        final, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    assert_ranks_as_the_run(model, tokenizer, tiny.pref_eval_file, after)
