"""The config sections: every key, its type, default and allowed values, and the checks
that span sections. Unknown keys are rejected."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from distft.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ModelConfig(_Section):
    name_or_path: str = Field(
        min_length=1, description="Local directory or hub name of a causal LM."
    )
    tokenizer: str | None = Field(None, description="Tokenizer path/name; default: the model's.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Load dtype; auto follows deepspeed.precision."
    )
    gradient_checkpointing: bool = False
    trust_remote_code: bool = Field(False, description="Run code shipped with the model.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="auto: the best the model supports (flash_attention_2 on GPU workers "
        "in bf16/fp16 with flash-attn installed, else sdpa, else eager); resolved before "
        "Ray starts.",
    )
    revision: str | None = None


class LoraConfig(_Section):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="all-linear: every linear layer but the output head, and the routed "
        "experts of MoE models; or module names, each of which must match a layer.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


DataFormat = Literal["auto", "instruction", "chat", "prompt_completion", "text", "tokenized"]
# Record field names a config may remap (`fields: {canonical: name in the records}`).
DATA_FIELDS = (
    "instruction", "input", "output", "system", "messages", "role", "content",
    "prompt", "completion", "text", "input_ids", "labels",
)  # fmt: skip


def _check_fields(v: dict[str, str] | None) -> dict[str, str] | None:
    unknown = sorted(set(v or {}) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; allowed: {', '.join(DATA_FIELDS)}")
    return v


class SourceConfig(_Section):
    """One dataset: a local file or folder (`path`) or a `datasets` hub name (`hub`)."""

    path: str | None = Field(None, description="Local .json/.jsonl/.parquet/.csv file or folder.")
    hub: str | None = Field(None, description="Hub dataset name, read with datasets.load_dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", min_length=1, description="Hub dataset split.")
    revision: str | None = Field(None, description="Hub dataset revision.")
    format: DataFormat | None = Field(None, description="null: data.format.")
    fields: dict[str, str] | None = Field(None, description="null: data.fields.")
    weight: float = Field(1.0, gt=0, description="Epoch share: weight x records (train only).")
    max_samples: int | None = Field(None, gt=0, description="null: data.max_samples.")

    _fields = field_validator("fields")(_check_fields)

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local) or 'hub' (datasets hub name)")
        return self


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=list, description="Local .json/.jsonl/.parquet/.csv files or folders."
    )
    eval_files: list[str] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list, description="More train data.")
    eval_sources: list[SourceConfig] = Field(default_factory=list)
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Eval carved from train.")
    format: DataFormat = "auto"
    fields: dict[str, str] = Field(default_factory=dict, description="Record field renames.")
    max_samples: int | None = Field(None, gt=0, description="Records read per source.")
    chat_template: Literal["tokenizer", "chatml", "llama3"] = "tokenizer"
    train_on: Literal["assistant", "last_assistant_turn", "all"] = "assistant"
    max_seq_len: int = Field(1024, gt=8)
    too_long: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["error", "skip"] = "error"
    shuffle: bool = True
    batching: Literal["auto", "packed", "length_grouped", "padded"] = "auto"
    cache_dir: str | None = Field(None, description="null: ~/.cache/distft/data.")

    _fields = field_validator("fields")(_check_fields)

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_train_data(self) -> DataConfig:
        if not self.train_files and not self.sources:
            raise ValueError("no training data: set data.train_files or data.sources")
        if self.val_fraction and (self.eval_files or self.eval_sources):
            raise ValueError("data.val_fraction: set it or eval_files/eval_sources, not both")
        return self

    def resolved(self, absolute: Any) -> tuple[DataConfig, list[str]]:
        """Local paths made absolute by `absolute(str) -> str`; unusable ones (missing,
        not a file or folder, a folder without data files), a cache_dir that is no
        folder, and eval data that is also training data, as problems."""
        data = self.model_copy(deep=True)
        for key in ("train_files", "eval_files"):
            setattr(data, key, [absolute(f) for f in getattr(self, key)])
        for src in data.sources + data.eval_sources:
            src.path = None if src.path is None else absolute(src.path)
        problems = [p for key, path in data.local_paths() if (p := _path_problem(key, path))]
        if self.cache_dir is not None:
            data.cache_dir = absolute(self.cache_dir)
            problems += _dir_problem("data.cache_dir", Path(data.cache_dir))
        return data, problems + data.eval_overlaps()

    def local_paths(self, which: str = "") -> list[tuple[str, str]]:
        """(key, path) of every local data path; `which`: "train", "eval" or both."""
        out = []
        for split, files, sources in (
            ("train", "train_files", "sources"),
            ("eval", "eval_files", "eval_sources"),
        ):
            if which in ("", split):
                out += [(f"data.{files}", f) for f in getattr(self, files)]
                out += [
                    (f"data.{sources}.{i}.path", s.path)
                    for i, s in enumerate(getattr(self, sources))
                    if s.path is not None
                ]
        return out

    def eval_overlaps(self) -> list[str]:
        """Eval data that is (or lies inside, or contains) training data: evaluating on
        what the model trains on hides overfitting."""
        train = [(key, Path(p).resolve()) for key, p in self.local_paths("train")]
        train_hubs = {(s.hub, s.subset, s.split, s.revision): i for i, s in enumerate(self.sources)}
        problems = []
        for key, path in self.local_paths("eval"):
            real = Path(path).resolve()
            hit = next(
                (k for k, t in train if real == t or t in real.parents or real in t.parents), None
            )
            if hit is not None:
                problems.append(f"{key}: {path} is also training data ({hit}); {_OVERLAP}")
        for i, s in enumerate(self.eval_sources):
            j = train_hubs.get((s.hub, s.subset, s.split, s.revision))
            if s.hub is not None and j is not None:
                problems.append(
                    f"data.eval_sources.{i}.hub: {s.hub} (split {s.split}) is also training "
                    f"data (data.sources.{j}); {_OVERLAP}"
                )
        return problems


_OVERLAP = "evaluating on the training data hides overfitting (data.val_fraction holds some out)"


def _path_problem(key: str, path: str) -> str | None:
    """Why a local data path cannot be read, or None."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"{key}: dangling symlink: {path}"
    if not p.exists():
        return f"{key}: file not found: {path}"
    if p.is_dir():
        from distft.data.records import DataError, data_files

        try:
            data_files(p)
        except DataError as e:
            return f"{key}: {e}"
        return None
    if not p.is_file():
        return f"{key}: not a regular file or folder: {path}"
    if not os.access(p, os.R_OK):
        return f"{key}: not readable: {path}"
    return None


def _dir_problem(key: str, path: Path) -> list[str]:
    """A folder distft will create or write into: anything but a folder in its place (or
    in place of a parent) is a problem."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if p.is_dir():
                return []
            where = "" if p == path else f"cannot be created: {p} "
            return [f"{key}: {path} {where}is not a folder"]
    return []


class OptimConfig(_Section):
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="null disables clipping.")


class BatchConfig(_Section):
    micro_batch_size: int = Field(1, gt=0, description="Sequences per worker per micro-step.")
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    stop_after_steps: int | None = Field(
        None,
        gt=0,
        description="Commit a checkpoint and exit after this step; the schedule "
        "is unchanged, so the next run continues it (time-boxed jobs).",
    )


class EvalConfig(_Section):
    every_n_steps: int | None = Field(None, gt=0, description="null: only before/after.")
    micro_batch_size: int = Field(4, gt=0)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    precision: Precision = Precision.bf16
    ds_config: dict[str, Any] = Field(
        default_factory=dict, description="Raw DeepSpeed keys; override generated ones."
    )


class ClusterConfig(_Section):
    address: str | None = Field(None, description="null: embedded local Ray; 'auto' or ray://.")
    num_workers: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    placement: Literal["pack", "spread"] = "pack"
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts; -1 = unlimited.")
    dashboard_host: str = Field("127.0.0.1", description="Embedded Ray only.")
    resource_timeout_s: float = Field(
        300,
        gt=0,
        description="Give up (exit 2, naming what was asked and what the cluster has) when "
        "the workers' resources are not available within this time.",
    )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class CheckpointConfig(_Section):
    output_dir: str
    every_n_steps: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0, description="Newest committed checkpoints kept.")
    keep_best: bool = Field(False, description="Also keep the one with the lowest eval loss.")
    resume: str = Field("auto", min_length=1, description="auto (newest valid), never, or a path.")
    allow_fingerprint_change: bool = Field(
        False, description="Resume even if model/data/hyperparameters changed since the save."
    )
    save_final_model: bool = True

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class WandbConfig(_Section):
    project: str = "distft"
    entity: str | None = None
    name: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online if an API key is set, else offline."
    )
    api_key: SecretStr | None = Field(None, description="Prefer env WANDB_API_KEY.")


class WatchdogConfig(_Section):
    """Hang detection: a stuck step dumps every rank's stack and restarts the workers."""

    enabled: bool = True
    slow_factor: float = Field(
        20, gt=1, description="A step slower than this x the median of recent steps hangs."
    )
    min_s: float = Field(300, gt=0, description="Never call a step hung before this.")
    max_s: float = Field(
        3600, gt=0, description="Any step, eval or checkpoint save longer than this hangs."
    )


class LoggingConfig(_Section):
    every_n_steps: int = Field(1, gt=0)
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak dense TFLOP/s per worker for MFU; null: known GPUs only."
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class Config(_Section):
    seed: int = Field(42, ge=0)
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        ds, problems = self.deepspeed, []
        if ds.offload_param == "cpu" and ds.zero_stage != 3:
            problems.append(
                f"deepspeed.offload_param: 'cpu' needs deepspeed.zero_stage 3 (got {ds.zero_stage})"
            )
        if ds.offload_optimizer == "cpu" and ds.zero_stage == 0:
            problems.append("deepspeed.offload_optimizer: 'cpu' needs deepspeed.zero_stage >= 1")
        if ds.precision == Precision.fp16 and not self.cluster.use_gpu:
            problems.append(
                "deepspeed.precision: 'fp16' is not supported on CPU workers "
                "(cluster.gpus_per_worker is 0); use 'bf16' or 'fp32'"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.checkpoint.output_dir)

    def redacted(self) -> dict[str, Any]:
        """Plain dict for saving/logging; secrets replaced by '***'."""
        data = self.model_dump(mode="json")
        if self.logging.wandb.api_key is not None:
            data["logging"]["wandb"]["api_key"] = "***"
        return data
