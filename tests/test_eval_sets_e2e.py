"""Named eval sets end to end: one 2-worker `distft train` (real Ray, DeepSpeed ZeRO-2 on
gloo) with the unnamed eval set and two named ones.

- `eval/same/loss` evaluates the same file as the unnamed set: it must equal `eval/loss`
  exactly at every eval. Both are computed by the same code on the same weights: the same
  cached tokens, the same deterministic per-rank batches (longest first), the same
  summation order and the same all-reduce, so the floats are bit-identical.
- `eval/chat/loss` (the chat-format eval file) after training is checked against an
  independent evaluation of the saved model with plain transformers, one sample at a time.
- Every set is logged to metrics.jsonl and W&B, on the progress line and in the summary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distft.tolerance import Kind, assert_close
from tests.support import read_metrics, run_cli, tiny_config, wandb_history, write_config
from tests.test_train_e2e import plain_eval_loss

pytestmark = pytest.mark.slow


def test_named_eval_sets_end_to_end(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    sets = {"same": {"files": [str(tiny.eval_file)]}, "chat": {"files": [str(tiny.chat_eval_file)]}}
    cfg = tiny_config(tiny, out, data={"eval_sets": sets}, eval={"every_n_steps": 4})
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = read_metrics(out)
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before, every 4 steps (8: the final)
    for r in evals:
        assert r["eval/same/loss"] == r["eval/loss"], r  # identical computation: exact
        assert "eval/chat/loss" in r
    assert evals[-1]["eval/chat/loss"] < evals[0]["eval/chat/loss"]  # it trained

    history = [items for _, items in wandb_history(out) if "eval/chat/loss" in items]
    assert [h["eval/chat/loss"] for h in history] == [r["eval/chat/loss"] for r in evals]

    text = proc.stdout + proc.stderr
    assert re.search(r"step 4/8 .* eval loss [\d.]+ eval same loss [\d.]+ eval chat loss [\d.]+ lr",
                     text)  # fmt: skip
    assert re.search(r"eval loss [\d.]+ -> [\d.]+\neval same loss [\d.]+ -> [\d.]+\n"
                     r"eval chat loss [\d.]+ -> [\d.]+", proc.stdout)  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ours = plain_eval_loss(model, tokenizer, tiny.chat_eval_file, cfg["data"]["max_seq_len"])
    # the engine's batched, padded, 2-rank evaluation vs one sample at a time in fp32:
    # the same terms summed in another order (tolerance: distft/tolerance.py)
    assert_close(ours, evals[-1]["eval/chat/loss"], torch.float32, Kind.REASSOCIATED, "chat")
