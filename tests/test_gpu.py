"""GPU checks (marker `gpu`; skipped without CUDA, see conftest.py): the real CLI on one GPU
(nccl, bf16), an fp16 run that stops, resumes and exports, ZeRO-3 weight decay on CUDA,
packed == unpacked with SDPA and flash-attention-2, and a bf16 export's logits.

Run them on a GPU machine with `pytest -m gpu tests/test_gpu.py` (W&B is disabled: the GPU
machine of this project has no W&B). Tolerances come from `distft.tolerance`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from distft.tolerance import Kind, assert_close
from tests.support import read_metrics, run_cli, tiny_config, write_config

pytestmark = pytest.mark.gpu

EVAL = re.compile(r"eval loss ([0-9.]+) -> ([0-9.]+)")
VERIFIED = re.compile(r"verified: logits max \|Δ\| ([0-9.e+-]+) \(bound ([0-9.e+-]+)\)")


def gpu_config(tiny: Any, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = tiny_config(
        tiny,
        out,
        deepspeed={"zero_stage": 2, "precision": "bf16"},
        cluster={"num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 2},
        batch={"micro_batch_size": 4, "grad_accum": 2, "max_steps": 12},
    )
    cfg["logging"]["wandb"]["mode"] = "disabled"
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def train(cfg: dict[str, Any], path: Path, *overrides: str) -> Any:
    proc = run_cli("train", str(write_config(path, cfg)), *overrides)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.fixture(scope="module")
def bf16_run(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("gpu_bf16") / "run"
    cfg = gpu_config(tiny, out)
    return out, train(cfg, out.parent / "c.yaml")


def test_one_gpu_run_through_the_cli(bf16_run: tuple[Path, Any]) -> None:
    out, proc = bf16_run
    m = EVAL.search(proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(2)) < float(m.group(1)) - 0.3  # full fine-tune moves fast
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(r["train/peak_mem_gib"] > 0 for r in rows)  # GPU: max allocated
    assert all("train/mfu" in r for r in rows)  # bf16 on a known GPU: a peak is known
    assert (out / "final" / "model.safetensors").is_file()
    assert "not verified on GPU workers" in proc.stdout + proc.stderr


def test_bf16_export_logits(bf16_run: tuple[Path, Any], tmp_path: Path) -> None:
    out, _ = bf16_run
    dest = tmp_path / "hf"
    proc = run_cli("export", str(out), "--out", str(dest), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = VERIFIED.search(proc.stdout)
    assert m and float(m.group(1)) <= float(m.group(2)), proc.stdout[-2000:]
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16).cuda().eval()
    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.bfloat16)
    final = final.cuda().eval()
    ids = torch.arange(3, 67, device="cuda")[None]
    with torch.no_grad():
        got, want = model(input_ids=ids).logits.float(), final(input_ids=ids).logits.float()
    # final/ holds the engine's bf16 weights, the export the fp32 masters rounded to bf16:
    # the same bf16 values, computed by the same kernels
    assert_close(got, want, torch.bfloat16, Kind.RECOMPUTED, "export vs final")


def test_fp16_run_resumes_and_exports(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = gpu_config(tiny, out, deepspeed={"zero_stage": 2, "precision": "fp16"})
    first = train(cfg, tmp_path / "c.yaml", "batch.stop_after_steps=5")
    assert not (out / "final").exists(), first.stdout[-2000:]
    resumed = train(cfg, tmp_path / "c.yaml")
    assert "at step 5" in resumed.stdout + resumed.stderr
    steps = [r["step"] for r in read_metrics(out) if "train/loss" in r]
    assert steps == list(range(1, 13))
    dest = tmp_path / "hf"
    proc = run_cli("export", str(out), "--out", str(dest))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert VERIFIED.search(proc.stdout), proc.stdout[-2000:]


def test_zero3_weight_decay_on_cuda(tiny: Any) -> None:
    """Under zero.Init on CUDA every parameter is a 1-D partition: the decay groups must
    still be those of the unpartitioned model."""
    import deepspeed
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from distft.engine import param_groups

    plain = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.bfloat16)
    want = [len(g["params"]) for g in param_groups(plain, 0.1)]
    if not tdist.is_initialized():
        tdist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": 3}}  # fmt: skip
    keep = HfDeepSpeedConfig(ds)  # noqa: F841  (transformers holds a weak reference)
    with deepspeed.zero.Init(config_dict_or_path=ds):
        sharded = AutoModelForCausalLM.from_pretrained(tiny.model_dir, dtype=torch.bfloat16)
    assert all(p.ndim == 1 for p in sharded.parameters())  # really partitioned
    groups = param_groups(sharded, 0.1)
    assert [len(g["params"]) for g in groups] == want
    assert groups[0]["weight_decay"] == 0.1 and want[0] > 0


def _gpu_step(model: Any, micro: list[Any]) -> tuple[float, torch.Tensor]:
    """The loop's objective for one optimizer step on CUDA: (1/T) * summed token NLLs."""
    from distft.objectives import nll_sum

    model.zero_grad(set_to_none=True)
    total = sum(b.n_targets for b in micro)
    loss = 0.0
    for b in micro:
        s = nll_sum(model, b.to(torch.device("cuda")))
        (s.float() / total).backward()
        loss += s.item() / total
    return loss, torch.cat([p.grad.float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_equals_unpacked_on_gpu(attn: str, tmp_path: Path) -> None:
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    import numpy as np
    import transformers as hf

    from distft.data import Split, TrainBatches, collate_rows
    from distft.dist import DistContext
    from tests.test_sliding_window import FAMILIES, make_cfg, saved_config

    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 96, size=n).tolist() for n in rng.integers(5, 61, size=24).tolist()]
    split = Split.from_lists(ids, [[-100] * (len(t) // 3) + t[len(t) // 3 :] for t in ids])
    for family in ("llama", "mistral"):  # a 4-D mask; transformers' windowed masks
        cfg = make_cfg(saved_config(family, tmp_path), attn)
        batches = TrainBatches(split, cfg, DistContext(0, 1, 0, torch.device("cuda")), 0)
        rows = [row for rows in batches.indices_for_step(0) for row in rows]
        assert any(len(row) > 1 for row in rows)
        singles = [collate_rows([[split.sample(int(i))]], 0, attn) for row in rows for i in row]
        torch.manual_seed(0)
        model = hf.AutoModelForCausalLM.from_config(
            FAMILIES[family](), attn_implementation=attn, dtype=torch.bfloat16
        )
        model = model.cuda().train()
        loss, grads = _gpu_step(model, batches.for_step(0))
        ref_loss, ref_grads = _gpu_step(model, singles)
        # bf16 kernels on other shapes (packed rows vs single samples): reassociated bf16
        assert_close(loss, ref_loss, torch.bfloat16, Kind.REASSOCIATED, f"{family} loss")
        scale = float(ref_grads.abs().max())
        assert_close(grads, ref_grads, torch.bfloat16, Kind.REASSOCIATED, family, scale)
