"""The architecture matrix: for each family of `distft.archs` (a tiny random-init model
from transformers' own config class, with the tiny tokenizer), through the real CLI:

  full   full fine-tune, ZeRO-2, default model settings (`attn_implementation: auto`)
  lora   LoRA `all-linear` (MoE: the routed experts too), ZeRO-3, every parameter sharded;
         gradient checkpointing on for the families in GC_FAMILIES

1 worker, 2 steps, fp32. Each run's rank 0 reloads its `final/` with plain transformers /
peft and compares the logits with the engine's (the run's "final model written" line).
Then the checkpoint is exported (the full run) and exported with `--merge-lora` (the LoRA
run) by `distft export`'s own function, which verifies the export against DeepSpeed's
`zero_to_fp32` reading; a fresh interpreter without distft loads the exports and their
logits must equal those of `final/` (full) or of base + `final/` adapter (merged).

Each family's runs are made once and shared by its assertions. Its two `distft train`
(mostly Ray and DeepSpeed start-up, a chain of single processes) run at the same time,
each with its own embedded Ray, so that a 2-core machine uses both cores. The checks
below the matrix (driver-side, meta models only) take seconds and are not `slow`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from distft.archs import FAMILIES, build_family, family_config
from distft.config import Config, from_dict
from distft.errors import UserError
from distft.export import export_checkpoint
from distft.model import check_model
from distft.tolerance import Kind, assert_close
from tests.support import read_metrics, run_cli, run_cli_concurrently, tiny_config, write_config
from tests.test_export import plain_logits

STEPS = 2
GC_FAMILIES = {"llama", "gemma2", "phi3", "mixtral"}  # gradient checkpointing in the LoRA run
MOE = {"mixtral", "qwen2_moe"}
DELTA = re.compile(r"max \|Δ\| ([0-9.e+-]+) \(bound ([0-9.e+-]+)\)")
ZERO3_SHARD_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
RUNS: dict[str, dict[str, Any]] = {
    "full": {"deepspeed": {"zero_stage": 2, "precision": "fp32"}},
    "lora": {
        "deepspeed": {"zero_stage": 3, "precision": "fp32", "ds_config": ZERO3_SHARD_ALL},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 2e-2, "warmup_steps": 0},
    },
}


@dataclass
class FamilyRuns:
    model_dir: Path
    out: dict[str, Path] = field(default_factory=dict)  # run name -> output_dir
    log: dict[str, str] = field(default_factory=dict)  # run name -> CLI stdout + stderr
    rc: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _delta(line: str) -> float:
    """The verified max |Δ|, checked against the bound the line states (distft.tolerance),
    which must be a rounding-sized one for these fp32 runs."""
    m = DELTA.search(line)
    assert m, line
    delta, bound = float(m.group(1)), float(m.group(2))
    assert delta <= bound <= 1e-3, line
    return delta


def _train(family: str, model_dir: Path, tiny: Any, root: Path, runs: FamilyRuns) -> None:
    commands = []
    for name, sections in RUNS.items():
        out = root / name / "run"
        cfg = tiny_config(tiny, out, **sections)
        cfg["model"] = {  # defaults otherwise: attn_implementation auto
            "name_or_path": str(model_dir),
            "gradient_checkpointing": name == "lora" and family in GC_FAMILIES,
        }
        cfg["data"].update(eval_files=[], max_samples=64)
        cfg["batch"] = {"micro_batch_size": 4, "grad_accum": 1, "max_steps": STEPS}
        cfg["cluster"] = {"num_workers": 1}
        cfg["logging"]["wandb"]["mode"] = "disabled"  # W&B is tested elsewhere: save its start
        runs.out[name] = out
        commands.append(("train", str(write_config(out.parent / "config.yaml", cfg))))
    t0 = time.perf_counter()
    procs = run_cli_concurrently(*commands)
    for name, proc in zip(RUNS, procs, strict=True):
        runs.seconds[name] = time.perf_counter() - t0  # both at once: not a benchmark
        runs.rc[name], runs.log[name] = proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def family_runs(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """family -> its FamilyRuns, trained on first use and shared by its tests."""
    cache: dict[str, FamilyRuns] = {}

    def get(family: str) -> FamilyRuns:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            runs = FamilyRuns(build_family(family, tiny.model_dir, root / "model"))
            _train(family, runs.model_dir, tiny, root, runs)
            cache[family] = runs
        return cache[family]

    return get


def _check_run(runs: FamilyRuns, name: str) -> float:
    """The run succeeded, logged every step with a finite loss, and its final/ reloads
    with the engine's logits. Returns that max |Δ|."""
    log = runs.log[name]
    assert runs.rc[name] == 0, f"{name}:\n{log[-4000:]}"
    steps = [r for r in read_metrics(runs.out[name]) if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), steps
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in steps)
    final = [line for line in log.splitlines() if "final model written" in line]
    assert final, log[-4000:]
    return _delta(final[0])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_zero2_trains_exports_and_reloads(
    family: str, family_runs: Any, tmp_path: Path
) -> None:
    runs = family_runs(family)
    resolved = (runs.out["full"] / "config.yaml").read_text()
    attn = re.search(r"attn_implementation: (\w+)", resolved)
    assert attn and attn.group(1) == ("eager" if family == "gemma2" else "sdpa"), resolved
    final_delta = _check_run(runs, "full")

    dest = tmp_path / "hf"
    result = export_checkpoint(runs.out["full"], dest)
    _delta(result.verdict)
    ours, final, base = plain_logits(dest, runs.out["full"] / "final", runs.model_dir)
    assert torch.equal(ours, final)  # exact: the same fp32 tensors, one process, same kernels
    assert (final - base).abs().max() > 1e-4  # the two steps changed the weights
    _row(family, "full ZeRO-2", runs.seconds["full"], final_delta, result)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_zero3_all_linear_trains_merges_and_reloads(
    family: str, family_runs: Any, tmp_path: Path
) -> None:
    runs = family_runs(family)
    final_delta = _check_run(runs, "lora")
    log = runs.log["lora"]
    with safe_open(runs.out["lora"] / "final" / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
    if family in MOE:  # all-linear adapts the routed experts' fused weights
        assert "fused weights: experts.down_proj, experts.gate_up_proj" in log, log[-3000:]
        assert any(".experts." in n and "lora_A" in n for n in names), names
    assert "LoRA adapts: " in log

    dest = tmp_path / "merged"
    result = export_checkpoint(runs.out["lora"], dest, merge_lora=True)
    _delta(result.verdict)
    merged, adapted = plain_logits(dest, (runs.out["lora"] / "final", runs.model_dir))
    # W + s·B·A folded vs applied: reassociated fp32 arithmetic
    assert_close(merged, adapted, torch.float32, Kind.REASSOCIATED, "merged vs adapter")
    _row(family, "LoRA ZeRO-3", runs.seconds["lora"], final_delta, result)


def _row(family: str, run: str, seconds: float, final_delta: float, export: Any) -> None:
    """One line of the matrix table (shown with `pytest -s`)."""
    print(
        f"\nMATRIX | {family} | {run} | train {seconds:.0f}s, final/ vs engine "
        f"{final_delta:.1e} | {export.kind} {export.seconds:.0f}s, {export.verdict} |"
    )


# ------------------------------------------------- driver-side checks (no Ray, no weights)


@pytest.fixture(scope="module")
def configs(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> a folder holding only its config.json and an empty weights file (the
    driver's checks read the config and the weights' headers only)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny.model_dir)
    root = tmp_path_factory.mktemp("configs")
    for family in FAMILIES:
        family_config(family, tokenizer).save_pretrained(root / family)
        save_file({}, root / family / "model.safetensors")
    return {family: root / family for family in FAMILIES}


def config_for(tiny: Any, model_dir: Path, **sections: dict[str, Any]) -> Config:
    raw = tiny_config(tiny, model_dir.parent / "out", **sections)
    raw["model"]["name_or_path"] = str(model_dir)
    return from_dict(raw)


def refusal(cfg: Config) -> list[str]:
    with pytest.raises(UserError) as info:
        check_model(cfg, local_only=True)
    return str(info.value).splitlines()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_attention_is_what_the_model_supports(
    family: str, configs: dict[str, Path], tiny: Any
) -> None:
    cfg, lines = check_model(config_for(tiny, configs[family]), local_only=True)
    want = "eager" if family == "gemma2" else "sdpa"  # Gemma-2 soft-caps: no SDPA
    assert cfg is not None and cfg.model.attn_implementation == want
    assert lines == [f"attention: {want} (auto)"]


def test_unsupported_attention_is_refused_naming_the_key(
    configs: dict[str, Path], tiny: Any
) -> None:
    sdpa = {"attn_implementation": "sdpa"}
    assert refusal(config_for(tiny, configs["gemma2"], model=sdpa)) == [
        "model.attn_implementation: Gemma2ForCausalLM does not support 'sdpa'; it supports "
        "eager, flash_attention_2 (or use 'auto')"
    ]
    flash = {"attn_implementation": "flash_attention_2"}
    assert refusal(config_for(tiny, configs["llama"], model=flash)) == [
        "model.attn_implementation: 'flash_attention_2' needs GPU workers "
        "(cluster.gpus_per_worker > 0); use 'auto', 'sdpa' or 'eager'"
    ]
    explicit = {"attn_implementation": "eager"}
    cfg, lines = check_model(config_for(tiny, configs["llama"], model=explicit), True)
    assert cfg is not None and cfg.model.attn_implementation == "eager"
    assert lines == ["attention: eager"]


def test_lora_targets_that_match_nothing_are_refused(configs: dict[str, Path], tiny: Any) -> None:
    lora = {"enabled": True, "target_modules": ["qkv_proj", "k_proj", "mlp"]}
    assert refusal(config_for(tiny, configs["phi3"], lora=lora)) == [
        "lora.target_modules: 'k_proj' matches no module of Phi3ForCausalLM; its linear "
        "layers: down_proj, gate_up_proj, o_proj, qkv_proj (or use 'all-linear')",
        "lora.target_modules: 'mlp' names a Phi3MLP, not a linear layer; linear layers of "
        "Phi3ForCausalLM: down_proj, gate_up_proj, o_proj, qkv_proj",
    ]
    gpt2 = {"enabled": True, "target_modules": ["c_attn", "c_proj"]}
    _, lines = check_model(config_for(tiny, configs["gpt2"], lora=gpt2), True)
    assert lines[-1] == "LoRA adapts: c_attn, c_proj"


@pytest.mark.parametrize(
    ("family", "layers"),
    [
        ("mixtral", "k_proj, o_proj, q_proj, v_proj"),
        ("qwen2_moe", "down_proj, gate_proj, k_proj, o_proj, q_proj, shared_expert_gate, "
         "up_proj, v_proj"),
    ],
    ids=["mixtral", "qwen2_moe"],
)  # fmt: skip
def test_all_linear_adapts_the_routed_experts(
    family: str, layers: str, configs: dict[str, Path], tiny: Any
) -> None:
    lora = {"enabled": True, "dropout": 0.0}
    _, lines = check_model(config_for(tiny, configs[family], lora=lora), True)
    assert lines[-1].startswith(
        f"LoRA adapts: {layers}; fused weights: experts.down_proj, experts.gate_up_proj"
    ), lines
    with_dropout = config_for(tiny, configs[family], lora={"enabled": True, "dropout": 0.05})
    (line,) = refusal(with_dropout)
    assert line.startswith("lora.dropout: ") and "set lora.dropout: 0" in line
    listed = {"enabled": True, "target_modules": ["q_proj", "v_proj"]}
    _, lines = check_model(config_for(tiny, configs[family], lora=listed), True)
    assert lines[1].startswith("warning: the routed experts of ") and "not adapted" in lines[1]


def test_train_refuses_before_ray_and_validate_names_the_choice(
    configs: dict[str, Path], tiny: Any, tmp_path: Path
) -> None:
    raw = tiny_config(tiny, tmp_path / "out")
    raw["model"].update(name_or_path=str(configs["gemma2"]), tokenizer=str(tiny.model_dir))
    path = write_config(tmp_path / "c.yaml", raw)
    proc = run_cli("train", str(path), "model.attn_implementation=sdpa")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.attn_implementation: Gemma2ForCausalLM does not support 'sdpa'")
    )
    assert not (tmp_path / "out").exists()  # refused before config.yaml or Ray
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0 and "attention: eager (auto)" in proc.stderr
