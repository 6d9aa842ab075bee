"""QLoRA on one GPU (marker `gpu`; skipped without CUDA, see conftest.py): the real CLI,
bf16, a 4-bit nf4 base under ZeRO-2 (DoRA on top: peft's DoRA takes a 4-bit base on GPU,
not on CPU workers) and under ZeRO-3 (the packed weights stored in bf16,
`bnb_4bit_quant_storage`, partitioned by DeepSpeed), each exported as an adapter that
`distft export` reloads with plain peft on the base quantised the same way.

Needs bitsandbytes with CUDA kernels (the `qlora` extra: bitsandbytes 0.50.2, the
manylinux x86_64 wheel carries CUDA 11.8-13.2 and CPU builds). Run on a GPU machine with
`pytest -m gpu tests/test_gpu_qlora.py` (W&B is disabled).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.support import read_metrics, run_cli
from tests.test_gpu import EVAL, gpu_config, train

pytestmark = pytest.mark.gpu

VERIFIED = re.compile(r"verified: logits max \|Δ\| ([0-9.e+-]+) \(bound ([0-9.e+-]+)\)")


@pytest.mark.parametrize(
    "stage,extra",
    [(2, {"use_dora": True}), (3, {"use_rslora": True})],
    ids=["zero2-dora", "zero3-rslora"],
)
def test_qlora_on_one_gpu(tiny: Any, tmp_path: Path, stage: int, extra: dict[str, Any]) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0, "quantize_base": "nf4"}
    cfg = gpu_config(
        tiny,
        out,
        lora={**lora, **extra},
        deepspeed={"zero_stage": stage, "precision": "bf16"},
        optim={"lr": 1e-2, "warmup_steps": 0},
    )
    proc = train(cfg, tmp_path / "c.yaml")
    m = EVAL.search(proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(2)) < float(m.group(1)) - 0.05  # the adapters learn on a 4-bit base
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(rows) == 12 and all(math.isfinite(r["train/loss"]) for r in rows)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["use_dora"] is bool(extra.get("use_dora"))
    assert config["use_rslora"] is bool(extra.get("use_rslora"))
    dest = tmp_path / "adapter"
    exported = run_cli("export", str(out), "--out", str(dest))
    assert exported.returncode == 0, exported.stderr[-3000:]
    v = VERIFIED.search(exported.stdout)
    assert v and float(v.group(1)) <= float(v.group(2)), exported.stdout[-2000:]
    assert (dest / "adapter_model.safetensors").is_file()
