"""DoRA, rsLoRA and QLoRA trained through the real CLI (Ray + DeepSpeed ZeRO-3, one CPU
worker each: ZeRO-3's partitioning is what these adapters must survive; a second worker
would add only the collectives the LoRA tests already cover). Each run's rank 0 reloads
`final/` with plain peft and matches the engine's logits; `distft export` rebuilds the
adapter from the ZeRO shards, reloads it with plain peft and matches the checkpoint; the
merged export matches base + adapter.

- DoRA (fp32) with ZeRO-3 partitioning every weight (persistence threshold 0: DoRA reads
  the base weight outside the base layer's forward, the case ZeRO-3 must gather).
- QLoRA nf4 + rsLoRA (bf16): the 4-bit base stored in bf16 (`bnb_4bit_quant_storage`),
  partitioned by ZeRO-3; needs bitsandbytes (>= 0.47: its CPU backend).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from tests.support import read_metrics, run_cli, run_cli_concurrently, tiny_config, write_config

pytestmark = pytest.mark.slow

VERIFIED = re.compile(r"verified: logits max \|Δ\| ([0-9.e+-]+) \(bound ([0-9.e+-]+)\)")


def within_bound(text: str) -> float:
    """The max |Δ| of a `verified:` line, checked against the bound it states (the bound
    comes from `distft.tolerance`, scaled to the dtype and the logits' magnitude)."""
    m = VERIFIED.search(text)
    assert m, text[-3000:]
    delta, bound = float(m.group(1)), float(m.group(2))
    assert delta <= bound, text[-3000:]
    return delta


def _config(tiny: Any, out: Path, lora: dict[str, Any], **sections: Any) -> Path:
    cfg = tiny_config(
        tiny,
        out,
        lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, **lora},
        optim={"lr": 1e-2, "warmup_steps": 0},
        batch={"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4},
        cluster={"num_workers": 1},
        **sections,
    )
    cfg["logging"]["wandb"]["mode"] = "disabled"
    return write_config(out.parent / "config.yaml", cfg)


@pytest.fixture(scope="module")
def runs(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Both runs, launched side by side (independent; compared by results only)."""
    dora = tmp_path_factory.mktemp("dora") / "run"
    zero3 = {
        "zero_stage": 3,
        "precision": "fp32",
        "ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    }
    configs = {"dora": _config(tiny, dora, {"use_dora": True}, deepspeed=zero3)}
    if importlib.util.find_spec("bitsandbytes") is not None:
        qlora = tmp_path_factory.mktemp("qlora") / "run"
        lora = {"quantize_base": "nf4", "use_rslora": True}
        bf16 = {"zero_stage": 3, "precision": "bf16"}
        configs["qlora"] = _config(tiny, qlora, lora, deepspeed=bf16)
    procs = run_cli_concurrently(*(("train", str(c)) for c in configs.values()))
    out: dict[str, tuple[Path, str]] = {}
    for (name, config), proc in zip(configs.items(), procs, strict=True):
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name}: {log[-4000:]}"
        out[name] = (config.parent / "run", log)
    return out


def _export(run: Path, dest: Path, *flags: str) -> str:
    proc = run_cli("export", str(run), "--out", str(dest), *flags)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def _final_line(log: str) -> str:
    lines = [line for line in log.splitlines() if "final model written" in line]
    assert lines, log[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def dora_run(runs: dict[str, tuple[Path, str]]) -> tuple[Path, str]:
    return runs["dora"]


def test_dora_trains_under_zero3_and_exports(dora_run: tuple[Path, str], tmp_path: Path) -> None:
    out, log = dora_run
    within_bound(_final_line(log))  # plain peft on final/ == the engine
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is False
    saved = load_file(out / "final" / "adapter_model.safetensors")
    mags = [k for k in saved if "lora_magnitude_vector" in k]
    assert len(mags) == 14, sorted(saved)  # 2 layers x 7 linear layers
    adapter = _export(out, tmp_path / "adapter")
    assert within_bound(adapter) <= 1e-4  # fp32 adapter vs fp32 checkpoint
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert exported.keys() == saved.keys()
    # peft folds DoRA into the weights: m · (W + s·B·A) / ||W + s·B·A||, then fp32 logits
    merged = _export(out, tmp_path / "merged", "--merge-lora", "--dtype", "fp32")
    within_bound(merged)
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def qlora_run(runs: dict[str, tuple[Path, str]]) -> tuple[Path, str]:
    if "qlora" not in runs:
        pytest.skip("bitsandbytes is not installed (pip install 'distft[qlora]')")
    return runs["qlora"]


def test_qlora_rslora_trains_under_zero3_on_cpu(
    qlora_run: tuple[Path, str], tmp_path: Path
) -> None:
    out, log = qlora_run
    within_bound(_final_line(log))  # plain peft on a 4-bit base == the engine
    assert "params: 16,384 trainable of 155,968" in log  # base counted unpacked
    rows = [m for m in read_metrics(out) if "eval/loss" in m or "train/loss" in m]
    evals = [m["eval/loss"] for m in rows if "eval/loss" in m]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.05, evals
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["use_dora"] is False
    # the adapter rebuilt from ZeRO-3 shards, on the base quantised as the workers did
    adapter = _export(out, tmp_path / "adapter")
    assert within_bound(adapter) == 0.0  # same bf16 adapter, same 4-bit base, same kernels
    # merged into the full-precision base (the 4-bit base is not a weight file to ship)
    merged = _export(out, tmp_path / "merged", "--merge-lora")
    within_bound(merged)
    assert "vs base + the checkpoint's adapter" in merged
