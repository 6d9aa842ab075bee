"""One real 2-worker LoRA run with everything this layer adds: a special token added to the
tokenizer and used in the data (input and target), the output head trained whole
(`lora.modules_to_save`) and NEFTune noise. The adapter and tokenizer it exports must
load with the documented plain transformers/peft lines and compute the engine's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support import read_metrics, run_cli, tiny_config, write_config
from tests.test_export import within_reported_bound

TOOL = "<|tool|>"
MULTIPLE = 8

# The loading lines of the README (Export: added tokens), in a process without distft.
PLAIN_LOAD = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, base_dir, multiple = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(adapter)
base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
base.resize_token_embeddings(len(tok), pad_to_multiple_of=multiple)
model = PeftModel.from_pretrained(base, adapter).eval()
ids = tok("<|user|>\nWrite the word in uppercase.\n\nkovi<|end|>\n<|assistant|>\n<|tool|>",
          add_special_tokens=False)["input_ids"]
with torch.no_grad():
    adapted = model(input_ids=torch.tensor([ids])).logits[0]
    with model.disable_adapter():
        plain = model(input_ids=torch.tensor([ids])).logits[0]
assert not any(m == "distft" or m.startswith("distft.") for m in sys.modules)
json.dump({"ids": ids, "tool": tok.convert_tokens_to_ids("<|tool|>"),
           "adapted": adapted.tolist(), "base": plain.tolist()}, sys.stdout)
"""


def _tool_data(src: Path, dest: Path) -> Path:
    """The tiny instruction data with every answer starting with the added token."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dest.write_text(
        "".join(json.dumps({**r, "output": f"{TOOL} {r['output']}"}) + "\n" for r in rows)
    )
    return dest


@pytest.mark.slow
def test_lora_with_added_token_modules_to_save_and_neftune(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny,
        out,
        model={
            "name_or_path": str(tiny.model_dir),
            "add_special_tokens": [TOOL],
            "pad_vocab_to_multiple_of": MULTIPLE,
            "neftune_alpha": 5.0,
        },
        data={
            "train_files": [str(_tool_data(tiny.train_file, tmp_path / "train.jsonl"))],
            "eval_files": [str(_tool_data(tiny.eval_file, tmp_path / "eval.jsonl"))],
            "max_seq_len": 128,
        },
        lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        optim={"lr": 2e-2, "warmup_steps": 0},
        batch={"micro_batch_size": 4, "grad_accum": 2, "max_steps": 6},
    )
    proc = run_cli("train", str(write_config(tmp_path / "config.yaml", cfg)), timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # rank 0 reloaded final/ with plain peft (base resized) and matched the engine's logits,
    # probing the added token too (distft.export.verify.probe_inputs)
    final_line = [line for line in log.splitlines() if "final model written" in line]
    assert final_line and within_reported_bound(final_line[0]), final_line
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]

    final = out / "final"
    saved = load_file(final / "adapter_model.safetensors")
    head = [k for k in saved if "lm_head" in k]
    rows = [k for k in saved if "trainable_tokens" in k]
    assert len(head) == 1 and saved[head[0]].shape[0] % MULTIPLE == 0, sorted(saved)
    assert len(rows) == 1 and saved[rows[0]].shape == (1, 64), sorted(saved)  # embed row only
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]

    # `distft export` rebuilds the adapter from the checkpoint's shards and verifies it
    dest = tmp_path / "adapter"
    exported = run_cli("export", str(out), "--out", str(dest))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert within_reported_bound(exported.stdout)
    assert load_file(dest / "adapter_model.safetensors").keys() == saved.keys()

    res, res_final = _plain_load(dest, tiny.model_dir), _plain_load(final, tiny.model_dir)
    assert res["ids"][-1] == res["tool"] == 512  # one token, after the base's 512
    adapted, base = torch.tensor(res["adapted"]), torch.tensor(res["base"])
    # final/ matched the engine (its log line); the export holds the same tensors
    assert torch.equal(adapted, torch.tensor(res_final["adapted"]))  # exact: one process each
    assert adapted.shape[-1] == 520  # 513 tokens, rows padded to a multiple of 8
    # training moved the added token's embedding and the head's logit for it
    assert (adapted - base).abs().max() > 1e-2
    assert (adapted[:, res["tool"]] - base[:, res["tool"]]).abs().max() > 1e-2


def _plain_load(adapter: Path, base: Path) -> dict[str, Any]:
    got = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(adapter), str(base), str(MULTIPLE)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=adapter.parent,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    result: dict[str, Any] = json.loads(got.stdout)
    return result
