"""build_ds_config (pure), lr_lambda, and one real single-process DeepSpeed engine on CPU."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from distft.config import Config, OptimConfig, from_dict
from distft.engine import build_ds_config, lr_lambda, param_groups

REPO = Path(__file__).resolve().parents[1]


def make_cfg(**sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "model": {"name_or_path": "tiny"},
        "data": {"train_files": ["train.jsonl"]},
        "checkpoint": {"output_dir": "out"},
    }
    raw.update(sections)
    return from_dict(raw)


# ----------------------------------------------------------------------------- ZeRO stages


def test_stage0_has_no_zero_tuning_and_no_optimizer() -> None:
    ds, overridden = build_ds_config(make_cfg(deepspeed={"zero_stage": 0}), 1)
    assert ds["zero_optimization"] == {"stage": 0}
    assert "optimizer" not in ds
    assert "scheduler" not in ds
    assert overridden == []


@pytest.mark.parametrize("stage", [1, 2])
def test_stage1_and_2_tuning(stage: int) -> None:
    ds, _ = build_ds_config(make_cfg(deepspeed={"zero_stage": stage}), 1)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is True
    assert zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] > 0 and zero["allgather_bucket_size"] > 0
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert not any(k.startswith("stage3_") for k in zero)
    assert "optimizer" not in ds and "scheduler" not in ds


def test_stage3_defaults() -> None:
    ds, _ = build_ds_config(make_cfg(deepspeed={"zero_stage": 3}), 2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert zero["stage3_prefetch_bucket_size"] > 0
    assert zero["stage3_param_persistence_threshold"] > 0
    assert zero["stage3_max_live_parameters"] > 0
    assert "offload_param" not in zero and "offload_optimizer" not in zero
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "optimizer" not in ds


def test_offload_optimizer_cpu_puts_optimizer_in_config() -> None:
    cfg = make_cfg(
        deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"},
        optim={"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1},
    )
    ds, _ = build_ds_config(cfg, 1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1},
    }
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in ds["zero_optimization"]
    assert "scheduler" not in ds


def test_offload_param_cpu_with_stage3() -> None:
    cfg = make_cfg(deepspeed={"zero_stage": 3, "offload_param": "cpu", "offload_optimizer": "cpu"})
    zero = build_ds_config(cfg, 4)[0]["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def test_offload_param_alone_keeps_torch_optimizer() -> None:
    ds, _ = build_ds_config(make_cfg(deepspeed={"zero_stage": 3, "offload_param": "cpu"}), 1)
    assert "offload_param" in ds["zero_optimization"]
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "optimizer" not in ds


# ----------------------------------------------------------------------------- precision


def test_bf16() -> None:
    ds, _ = build_ds_config(make_cfg(deepspeed={"precision": "bf16"}), 1)
    assert ds["bf16"] == {"enabled": True}
    assert "fp16" not in ds


def test_fp16_dynamic_loss_scale() -> None:
    cfg = make_cfg(deepspeed={"precision": "fp16"}, cluster={"gpus_per_worker": 1})
    ds, _ = build_ds_config(cfg, 1)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert "bf16" not in ds


def test_fp32_has_neither() -> None:
    ds, _ = build_ds_config(make_cfg(deepspeed={"precision": "fp32"}), 1)
    assert "bf16" not in ds and "fp16" not in ds


# ----------------------------------------------------------------------------- batch, clip


@pytest.mark.parametrize(("world", "expected"), [(1, 12), (2, 24), (8, 96)])
def test_train_batch_size(world: int, expected: int) -> None:
    cfg = make_cfg(batch={"micro_batch_size": 3, "grad_accum": 4})
    ds, _ = build_ds_config(cfg, world)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == expected


def test_bad_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        build_ds_config(make_cfg(), 0)


def test_clipping() -> None:
    assert build_ds_config(make_cfg(optim={"max_grad_norm": 0.5}), 1)[0]["gradient_clipping"] == 0.5
    ds, _ = build_ds_config(make_cfg(optim={"max_grad_norm": None}), 1)
    assert ds["gradient_clipping"] == 0.0


def test_we_do_the_logging() -> None:
    ds, _ = build_ds_config(make_cfg(), 1)
    assert ds["wall_clock_breakdown"] is False
    assert ds["steps_per_print"] >= 1_000_000


# ----------------------------------------------------------------------------- raw override


def test_raw_ds_config_deep_merges_and_reports_winners() -> None:
    raw = {
        "zero_optimization": {
            "stage3_param_persistence_threshold": 0,  # replaced
            "overlap_comm": True,  # same as ours: not reported
            "sub_group_size": 1000,  # added
        },
        "gradient_clipping": 2.0,  # replaced
        "bf16": {"enabled": False},  # replaced inside a section
        "activation_checkpointing": {"partition_activations": True},  # added section
        "comms_logger": {},  # added, empty
    }
    cfg = make_cfg(deepspeed={"zero_stage": 3, "ds_config": raw})
    ds, overridden = build_ds_config(cfg, 1)
    zero = ds["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["sub_group_size"] == 1000
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is False
    assert ds["gradient_clipping"] == 2.0
    assert ds["bf16"] == {"enabled": False}
    assert ds["activation_checkpointing"] == {"partition_activations": True}
    assert ds["comms_logger"] == {}
    assert overridden == [
        "activation_checkpointing.partition_activations",
        "bf16.enabled",
        "comms_logger",
        "gradient_clipping",
        "zero_optimization.stage3_param_persistence_threshold",
        "zero_optimization.sub_group_size",
    ]


def test_raw_non_dict_replaces_section() -> None:
    cfg = make_cfg(deepspeed={"ds_config": {"bf16": None}})
    ds, overridden = build_ds_config(cfg, 1)
    assert ds["bf16"] is None
    assert overridden == ["bf16"]


def test_raw_empty_dict_merges_as_no_op() -> None:
    cfg = make_cfg(deepspeed={"zero_stage": 2, "ds_config": {"zero_optimization": {}}})
    ds, overridden = build_ds_config(cfg, 1)
    assert ds["zero_optimization"]["stage"] == 2
    assert overridden == []


# ----------------------------------------------------------------------------- purity


def test_pure_and_not_aliased() -> None:
    cfg = make_cfg(
        deepspeed={
            "zero_stage": 3,
            "offload_optimizer": "cpu",
            "ds_config": {"zero_optimization": {"offload_param": {"device": "cpu"}}},
        },
        optim={"betas": [0.9, 0.95]},
    )
    before = cfg.model_dump()
    first = build_ds_config(cfg, 2)
    second = build_ds_config(cfg, 2)
    assert first == second
    assert cfg.model_dump() == before

    ds, _ = first
    ds["zero_optimization"]["offload_param"]["device"] = "nvme"
    ds["optimizer"]["params"]["betas"][0] = 0.0
    ds["zero_optimization"]["stage"] = 0
    assert cfg.deepspeed.ds_config == {"zero_optimization": {"offload_param": {"device": "cpu"}}}
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model_dump() == before
    assert build_ds_config(cfg, 2) == second


def test_output_is_json_serialisable() -> None:
    cfg = make_cfg(deepspeed={"zero_stage": 3, "offload_optimizer": "cpu"})
    ds, _ = build_ds_config(cfg, 2)
    assert json.loads(json.dumps(ds)) == ds


# ----------------------------------------------------------------------------- lr_lambda


def _optim(**kw: Any) -> OptimConfig:
    return OptimConfig(**kw)


def test_warmup_ramp() -> None:
    o = _optim(warmup_steps=4, schedule="cosine")
    assert [lr_lambda(s, o, 100) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_cosine_endpoint_is_min_lr_ratio() -> None:
    o = _optim(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(10, o, 110) == pytest.approx(1.0)
    assert lr_lambda(60, o, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, o, 110) == pytest.approx(0.1)
    assert lr_lambda(500, o, 110) == pytest.approx(0.1)  # held after the end
    values = [lr_lambda(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_linear_midpoint_and_end() -> None:
    o = _optim(warmup_steps=0, schedule="linear", min_lr_ratio=0.2)
    assert lr_lambda(0, o, 100) == pytest.approx(1.0)
    assert lr_lambda(50, o, 100) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_lambda(100, o, 100) == pytest.approx(0.2)
    plain = _optim(warmup_steps=0, schedule="linear")
    assert lr_lambda(25, plain, 100) == pytest.approx(0.75)


def test_constant_after_warmup() -> None:
    o = _optim(warmup_steps=2, schedule="constant", min_lr_ratio=0.5)
    assert [lr_lambda(s, o, 10) for s in (0, 1, 2, 5, 10, 50)] == [0.0, 0.5, 1, 1, 1, 1]


def test_warmup_longer_than_run() -> None:
    o = _optim(warmup_steps=10, schedule="cosine", min_lr_ratio=0.0)
    assert lr_lambda(5, o, 5) == pytest.approx(0.5)
    assert math.isfinite(lr_lambda(10, o, 5))


# ----------------------------------------------------------------------------- real engine

_ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    from distft.config import from_dict
    from distft.engine import build_ds_config, create_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = from_dict(json.loads(sys.argv[1]))
    ds_config, _ = build_ds_config(cfg, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    )
    model[1].weight.requires_grad_(False)  # frozen params must stay out of the optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = create_engine(model, cfg, ds_config, total_steps=5)
    lrs = [engine.get_lr()[0]]
    for _ in range(3):
        x = torch.randn(2, 4)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        lrs.append(engine.get_lr()[0])
    changed = {
        n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()
    }
    groups = [
        {"weight_decay": g["weight_decay"], "lr": g["lr"]}
        for g in engine.basic_optimizer.param_groups
    ]
    print("RESULT " + json.dumps({
        "lrs": lrs,
        "changed": changed,
        "groups": groups,
        "optimizer": type(engine.basic_optimizer).__name__,
        "scheduler": type(engine.lr_scheduler).__name__,
        "global_steps": engine.global_steps,
        "zero_stage": engine.zero_optimization_stage(),
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_child(script: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Run `script` as rank 0 of a 1-process gloo group; its `RESULT {json}` line."""
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(raw)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def test_create_engine_zero2_fp32_single_process() -> None:
    """Real DeepSpeed in a child process (it owns the process group and global state)."""
    raw = {
        "model": {"name_or_path": "tiny"},
        "data": {"train_files": ["train.jsonl"]},
        "checkpoint": {"output_dir": "out"},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "optim": {
            "lr": 0.1,
            "weight_decay": 0.01,
            "warmup_steps": 2,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
        },
    }
    out = _run_child(_ENGINE_SCRIPT, raw)

    assert out["zero_stage"] == 2
    assert out["optimizer"] == "AdamW"
    assert out["scheduler"] == "LambdaLR"
    assert out["global_steps"] == 3
    optim = from_dict(raw).optim
    expected = [0.1 * lr_lambda(step, optim, 5) for step in range(4)]
    assert out["lrs"] == pytest.approx(expected)
    assert expected[1:] == pytest.approx([0.05, 0.1, 0.1 * (0.1 + 0.9 * 0.75)])  # ramp, peak, decay
    # decay only on the >=2-D weights; the frozen LayerNorm weight is in neither group
    assert sorted(g["weight_decay"] for g in out["groups"]) == [0.0, 0.01]
    changed = out["changed"]
    assert changed["1.weight"] == 0.0
    for name in ("0.weight", "0.bias", "1.bias", "3.weight", "3.bias"):
        assert changed[name] > 0.0, name


def test_param_groups_split_by_dim() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = param_groups(model, 0.1)
    decay = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay == {id(model[0].weight)}
    assert no_decay == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    only_bias = copy.deepcopy(model)
    for p in only_bias.parameters():
        p.requires_grad_(p.ndim == 1)
    assert [g["weight_decay"] for g in param_groups(only_bias, 0.1)] == [0.0]


def test_param_groups_need_trainable_params() -> None:
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


_ZERO3_GROUPS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import deepspeed, torch
    from distft.config import from_dict
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from distft.engine import build_ds_config, create_engine, param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    raw = json.loads(sys.argv[1])
    out = {}
    for stage in (2, 3):
        raw["deepspeed"]["zero_stage"] = stage
        cfg = from_dict(raw)
        ds_config, _ = build_ds_config(cfg, world_size=1)
        # As distft.model loads it: under ZeRO-3, zero.Init partitions every weight.
        hf_ds = HfDeepSpeedConfig(ds_config) if stage == 3 else None
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
        del hf_ds
        names = {id(p): n for n, p in model.named_parameters()}
        groups = param_groups(model, cfg.optim.weight_decay)
        out[stage] = {
            "groups": {
                str(g["weight_decay"]): sorted(names[id(p)] for p in g["params"])
                for g in groups
            },
            "ndims": sorted({p.ndim for p in model.parameters()}),
        }
        if stage == 3:
            engine = create_engine(model, cfg, ds_config, total_steps=2)
            out["engine_decays"] = sorted(
                g["weight_decay"] for g in engine.optimizer.optimizer.param_groups
            )
    print("RESULT " + json.dumps(out))
    """
)


def test_zero3_partitioned_weights_still_get_weight_decay(tiny: Any) -> None:
    """Under zero.Init every parameter is a 1-D partition; the decay groups must follow the
    full shapes, the same as ZeRO-2's (real DeepSpeed, tiny Llama, one gloo rank)."""
    raw = {
        "model": {"name_or_path": str(tiny.model_dir)},
        "data": {"train_files": ["train.jsonl"]},
        "checkpoint": {"output_dir": "out"},
        "deepspeed": {"precision": "fp32"},
        "optim": {"weight_decay": 0.01},
    }
    out = _run_child(_ZERO3_GROUPS_SCRIPT, raw)
    zero2, zero3 = out["2"], out["3"]
    assert zero3["ndims"] == [1]  # the test is real: partitions, no 2-D tensor left
    assert 2 in zero2["ndims"]
    decay = zero2["groups"]["0.01"]
    assert len(decay) == 16 and all(n.endswith(".weight") for n in decay)
    assert not any("norm" in n for n in decay)
    assert zero3["groups"] == zero2["groups"]
    assert out["engine_decays"] == [0.0, 0.01]
