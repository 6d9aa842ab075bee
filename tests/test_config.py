"""distft.config: strict loading, one line per problem, overrides, secrets, local paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from distft.config import (
    Config,
    ConfigError,
    Precision,
    apply_overrides,
    from_dict,
    load,
    resolve_paths,
    save_resolved,
)

MINIMAL = """\
model:
  name_or_path: meta-llama/Llama-3.1-8B
data:
  train_files: train.jsonl
checkpoint:
  output_dir: out
"""


def minimal() -> dict[str, Any]:
    raw = yaml.safe_load(MINIMAL)
    assert isinstance(raw, dict)
    return raw


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    return info.value.problems


def with_section(section: str, **values: Any) -> dict[str, Any]:
    raw = minimal()
    raw.setdefault(section, {}).update(values)
    return raw


# ----------------------------------------------------------------------------- valid


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    assert cfg.model.name_or_path == "meta-llama/Llama-3.1-8B"
    assert cfg.data.train_files == ["train.jsonl"]  # a single string becomes a list
    assert cfg.output_dir == Path("out")
    assert cfg.seed == 42
    assert cfg.lora.enabled is False
    assert cfg.lora.target_modules == "all-linear"  # fits every architecture (checked)
    assert cfg.model.attn_implementation == "auto"  # resolved before Ray starts
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.deepspeed.precision is Precision.bf16
    assert cfg.deepspeed.offload_optimizer == "none" and cfg.deepspeed.offload_param == "none"
    assert cfg.deepspeed.ds_config == {}
    assert cfg.optim.schedule == "cosine" and cfg.optim.max_grad_norm == 1.0
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.batch.micro_batch_size == 1 and cfg.batch.grad_accum == 1
    assert cfg.batch.max_steps is None
    assert cfg.cluster.num_workers == 1 and cfg.cluster.use_gpu is False
    assert cfg.logging.wandb.api_key is None


def test_empty_file_reports_every_missing_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, ""))
    assert sorted(info.value.problems) == [
        "checkpoint: required key is missing",
        "data: required key is missing",
        "model: required key is missing",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    assert info.value.problems == [f"{tmp_path / 'nope.yaml'}: config file not found"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, "- a\n- b\n"))
    assert len(info.value.problems) == 1
    assert "mapping" in info.value.problems[0]


# ----------------------------------------------------------------------------- one line each


def test_unknown_key_lists_allowed_keys() -> None:
    assert problems_of(with_section("optim", lrr=1e-4)) == [
        "optim.lrr: unknown key; allowed: betas, eps, lr, max_grad_norm, min_lr_ratio, "
        "schedule, warmup_steps, weight_decay"
    ]


def test_unknown_nested_and_top_level_keys() -> None:
    raw = minimal()
    raw["logging"] = {"wandb": {"projekt": "x"}}
    raw["trainer"] = {}
    problems = problems_of(raw)
    assert len(problems) == 2
    assert "logging.wandb.projekt: unknown key; allowed: api_key, entity, mode, name, project" in (
        problems
    )
    top = next(p for p in problems if p.startswith("trainer:"))
    assert "unknown key" in top and "checkpoint" in top and "deepspeed" in top


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("deepspeed", "precision", "fp8", ["'fp32'", "'bf16'", "'fp16'"]),
        ("deepspeed", "zero_stage", 4, ["0", "1", "2", "3"]),
        ("optim", "schedule", "exponential", ["'cosine'", "'linear'", "'constant'"]),
        ("data", "format", "csv", ["'auto'", "'instruction'", "'chat'"]),
    ],
)
def test_bad_enum_lists_allowed_values(
    section: str, key: str, value: Any, allowed: list[str]
) -> None:
    problems = problems_of(with_section(section, **{key: value}))
    assert len(problems) == 1
    line = problems[0]
    assert line.startswith(f"{section}.{key}: ")
    assert repr(value) in line
    for item in allowed:
        assert item in line


def test_missing_required_key() -> None:
    raw = minimal()
    del raw["model"]["name_or_path"]
    assert problems_of(raw) == ["model.name_or_path: required key is missing"]


def test_out_of_range_value() -> None:
    problems = problems_of(with_section("optim", lr=-1))
    assert len(problems) == 1
    assert problems[0].startswith("optim.lr: ") and "greater than 0" in problems[0]
    assert "(got -1)" in problems[0]


def test_offload_param_needs_stage3() -> None:
    problems = problems_of(with_section("deepspeed", zero_stage=2, offload_param="cpu"))
    assert problems == ["deepspeed.offload_param: 'cpu' needs deepspeed.zero_stage 3 (got 2)"]


def test_offload_optimizer_needs_zero() -> None:
    problems = problems_of(with_section("deepspeed", zero_stage=0, offload_optimizer="cpu"))
    assert len(problems) == 1
    assert problems[0].startswith("deepspeed.offload_optimizer:")


def test_fp16_rejected_on_cpu_accepted_on_gpu() -> None:
    problems = problems_of(with_section("deepspeed", precision="fp16"))
    assert len(problems) == 1
    assert problems[0].startswith("deepspeed.precision: 'fp16'")
    assert "cluster.gpus_per_worker" in problems[0]
    raw = with_section("deepspeed", precision="fp16")
    raw["cluster"] = {"gpus_per_worker": 1}
    assert from_dict(raw).deepspeed.precision is Precision.fp16


def test_several_problems_several_lines() -> None:
    raw = minimal()
    raw["optim"] = {"lr": 0, "schedule": "step", "foo": 1}
    raw["batch"] = {"micro_batch_size": 0}
    del raw["checkpoint"]
    problems = problems_of(raw)
    assert len(problems) == 5
    for prefix in ("optim.lr:", "optim.schedule:", "optim.foo:", "batch.micro_batch_size:"):
        assert sum(p.startswith(prefix) for p in problems) == 1, prefix
    assert "checkpoint: required key is missing" in problems
    assert all("\n" not in p for p in problems)


def test_several_cross_field_problems_several_lines() -> None:
    raw = with_section("deepspeed", zero_stage=2, offload_param="cpu", precision="fp16")
    problems = problems_of(raw)
    assert len(problems) == 2
    assert problems[0].startswith("deepspeed.offload_param:")
    assert problems[1].startswith("deepspeed.precision:")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 would read 5e8 as a string, which DeepSpeed later rejects in a worker."""
    body = MINIMAL + "deepspeed:\n  ds_config:\n    zero_optimization: {reduce_bucket_size: 5e8}\n"
    cfg = load(write(tmp_path, body), ["optim.lr=1e-5"])
    assert cfg.optim.lr == 1e-5
    assert cfg.deepspeed.ds_config["zero_optimization"]["reduce_bucket_size"] == 5e8


# ----------------------------------------------------------------------------- overrides


def test_overrides_are_typed_via_yaml(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, MINIMAL),
        [
            "optim.lr=3e-4",
            "batch.max_steps=10",
            "data.shuffle=false",
            "optim.max_grad_norm=null",
            "optim.betas=[0.9, 0.95]",
            "lora.target_modules=[q_proj, v_proj]",
            "deepspeed.zero_stage=3",
            "deepspeed.ds_config.zero_optimization.stage3_param_persistence_threshold=0",
            "checkpoint.output_dir=/tmp/x=y",  # only the first '=' splits
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.batch.max_steps == 10
    assert cfg.data.shuffle is False
    assert cfg.optim.max_grad_norm is None
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.deepspeed.ds_config == {
        "zero_optimization": {"stage3_param_persistence_threshold": 0}
    }
    assert cfg.checkpoint.output_dir == "/tmp/x=y"


def test_override_does_not_mutate_input() -> None:
    raw = minimal()
    out = apply_overrides(raw, ["model.name_or_path=other", "seed=1"])
    assert raw == minimal()
    assert out["model"]["name_or_path"] == "other" and out["seed"] == 1


def test_override_unknown_key_is_a_validation_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, MINIMAL), ["optim.lrr=1"])
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("optim.lrr: unknown key; allowed: ")


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(minimal(), ["optim.lr", "=3", "model.name_or_path.x=1"])
    assert info.value.problems == [
        "override 'optim.lr': expected key=value, e.g. optim.lr=1e-5",
        "override '=3': expected key=value, e.g. optim.lr=1e-5",
        "override 'model.name_or_path.x=1': 'name_or_path' is not a section",
    ]


# ----------------------------------------------------------------------------- YAML errors


def test_invalid_yaml_reports_file_and_line(tmp_path: Path) -> None:
    text = "model:\n  name_or_path: x\n   bad: indent\ndata: {}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert len(info.value.problems) == 1
    line = info.value.problems[0]
    assert line.startswith(f"{path}:3: invalid YAML"), line


# ----------------------------------------------------------------------------- secrets


def test_redacted_hides_api_key() -> None:
    raw = minimal()
    raw["logging"] = {"wandb": {"api_key": "sk-very-secret-123"}}
    cfg = from_dict(raw)
    assert cfg.logging.wandb.api_key is not None
    assert cfg.logging.wandb.api_key.get_secret_value() == "sk-very-secret-123"
    red = cfg.redacted()
    assert red["logging"]["wandb"]["api_key"] == "***"
    assert "sk-very-secret-123" not in repr(red) and "sk-very-secret-123" not in repr(cfg)
    assert from_dict(minimal()).redacted()["logging"]["wandb"]["api_key"] is None


def test_save_resolved_never_writes_secret_and_round_trips(tmp_path: Path) -> None:
    cfg = load(
        write(tmp_path, MINIMAL),
        ["logging.wandb.api_key=sk-very-secret-123", "optim.betas=[0.9, 0.95]"],
    )
    out = tmp_path / "run" / "config.yaml"
    save_resolved(cfg, out)
    text = out.read_text()
    assert "sk-very-secret-123" not in text
    reloaded = load(out)
    assert reloaded.logging.wandb.api_key is not None
    assert reloaded.logging.wandb.api_key.get_secret_value() == "***"
    assert reloaded.redacted() == cfg.redacted()


# ----------------------------------------------------------------------------- local paths


def test_resolve_paths_reports_missing_data_and_model_dirs(tmp_path: Path) -> None:
    raw = minimal()
    raw["data"] = {"train_files": ["missing.jsonl"], "eval_files": ["also-missing.jsonl"]}
    raw["model"] = {"name_or_path": "./no-such-model", "tokenizer": "/no/such/tokenizer"}
    with pytest.raises(ConfigError) as info:
        resolve_paths(from_dict(raw), base=tmp_path)
    assert info.value.problems == [
        f"data.train_files: file not found: {tmp_path / 'missing.jsonl'}",
        f"data.eval_files: file not found: {tmp_path / 'also-missing.jsonl'}",
        "model.name_or_path: directory not found: ./no-such-model",
        "model.tokenizer: directory not found: /no/such/tokenizer",
    ]


def test_resolve_paths_accepts_hub_names_and_makes_local_paths_absolute(
    tmp_path: Path,
) -> None:
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "tok").mkdir()
    raw = minimal()
    raw["model"]["tokenizer"] = "./tok"
    cfg = from_dict(raw)
    resolved = resolve_paths(cfg, base=tmp_path)
    assert resolved.model.name_or_path == "meta-llama/Llama-3.1-8B"
    assert resolved.model.tokenizer == str(tmp_path / "tok")
    assert resolved.data.train_files == [str(tmp_path / "train.jsonl")]
    assert resolved.checkpoint.output_dir == str(tmp_path / "out")
    assert cfg.data.train_files == ["train.jsonl"]  # the input is left as it was
    assert cfg.model.tokenizer == "./tok"


def test_resolve_paths_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data.jsonl").write_text("{}\n")
    raw = minimal()
    raw["data"] = {"train_files": ["~/data.jsonl"]}
    raw["model"] = {"name_or_path": "~/models/missing"}
    with pytest.raises(ConfigError) as info:
        resolve_paths(from_dict(raw), base=tmp_path)
    assert info.value.problems == ["model.name_or_path: directory not found: ~/models/missing"]


def test_every_config_key_is_in_the_readme_reference() -> None:
    """The README's config reference stays true: each section's table names every key of
    that section (nested sections as `wandb.project`), and no key that does not exist."""
    import re
    import typing

    from pydantic import BaseModel

    from distft.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()

    def keys(model: type[BaseModel], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for name, field in model.model_fields.items():
            ann = field.annotation
            nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            args = [a for a in typing.get_args(ann) if isinstance(a, type)]
            nested = nested or next((a for a in args if issubclass(a, BaseModel)), None)
            if nested is not None and typing.get_origin(ann) is not list:
                out |= keys(nested, f"{prefix}{name}.")
            else:
                out.add(f"{prefix}{name}")
        return out

    for section, field in Config.model_fields.items():
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            continue
        m = re.search(rf"^\*\*{section}\*\*[^\n]*\n\n((?:\|.*\n)+)", readme, re.M)
        assert m, f"README has no reference table for section {section!r}"
        documented = set(re.findall(r"^\| `([\w.]+)` \|", m.group(1), re.M))
        assert documented == keys(ann), (section, documented ^ keys(ann))


def test_attn_implementation_names_the_allowed_values() -> None:
    assert problems_of(with_section("model", name_or_path="m", attn_implementation="flash")) == [
        "model.attn_implementation: Input should be 'auto', 'sdpa', 'eager' or "
        "'flash_attention_2' (got 'flash')"
    ]
