"""The config sections: every key, its type, default and allowed values, and the checks
that span sections. Unknown keys are rejected."""

from __future__ import annotations

import importlib.util
from enum import Enum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from distft.config.base import _Section
from distft.config.checks import adapter_problems, sequence_parallel_problems
from distft.config.data import DataConfig
from distft.config.objective import ObjectiveConfig, objective_problems


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
    add_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens added to the tokenizer as special tokens; the embeddings grow "
        "(new rows: the mean of the old ones) and under LoRA their rows are trained.",
    )
    pad_token: str | None = Field(
        None, description="Padding token (added when missing); null: the tokenizer's, else eos."
    )
    pad_vocab_to_multiple_of: int | None = Field(
        None, gt=0, description="Resized embeddings get a multiple of this many rows."
    )
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune noise alpha on the input embeddings (training only)."
    )
    loss_chunk_size: int | None = Field(
        1024,
        ge=0,
        description="Target tokens per chunk of the LM head + cross-entropy, recomputed in "
        "backward (peak loss memory O(chunk x vocab)); null or 0: the whole head at once. "
        "SFT only: preference objectives run the head on the response rows at once.",
    )

    @field_validator("add_special_tokens")
    @classmethod
    def _distinct_tokens(cls, v: list[str]) -> list[str]:
        if any(not t for t in v):
            raise ValueError("a token must not be empty")
        if len(set(v)) != len(v):
            raise ValueError(f"tokens listed twice: {sorted({t for t in v if v.count(t) > 1})}")
        return v

    @field_validator("pad_token")
    @classmethod
    def _non_empty_pad(cls, v: str | None) -> str | None:
        if v == "":
            raise ValueError("must not be empty (null: the tokenizer's own, else eos)")
        return v


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

    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained whole and saved with the adapter (e.g. lm_head); each "
        "must match a module of the model.",
    )
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output row on top of LoRA (peft)."
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale the adapters by alpha/sqrt(r) instead of alpha/r."
    )
    quantize_base: Literal["nf4", "fp4"] | None = Field(
        None,
        description="QLoRA: the base model's linear layers in 4 bits (bitsandbytes, double "
        "quantisation, computed in the training dtype); null: the training dtype.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


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
    micro_batch_size: int | Literal["auto"] = Field(
        1,
        description="Sequences per worker per micro-step; auto: the largest the memory "
        "planner fits (`distft plan`), resolved before Ray starts.",
    )
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    stop_after_steps: int | None = Field(
        None,
        gt=0,
        description="Commit a checkpoint and exit after this step; the schedule "
        "is unchanged, so the next run continues it (time-boxed jobs).",
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be > 0 or 'auto'")
        return v

    @property
    def micro(self) -> int:
        """The micro batch size, once `auto` is resolved (distft.plan.auto)."""
        if not isinstance(self.micro_batch_size, int):
            raise ValueError("batch.micro_batch_size: 'auto' is resolved before training")
        return self.micro_batch_size


class EvalConfig(_Section):
    every_n_steps: int | None = Field(None, gt=0, description="null: only before/after.")
    micro_batch_size: int = Field(4, gt=0)


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    precision: Precision = Precision.bf16
    sequence_parallel_size: int = Field(
        1,
        ge=1,
        description="Ranks that split each sequence (Ulysses); must divide cluster.num_workers.",
    )
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
    dashboard: bool = Field(False, description="Embedded Ray: start the Ray dashboard.")
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
    async_save: bool = Field(
        False, description="Periodic saves: snapshot, then write and commit in the background."
    )

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


class MlflowConfig(_Section):
    enabled: bool = False
    tracking_uri: str | None = Field(
        None,
        min_length=1,
        description="null: a SQLite store in <output_dir>/mlruns; or http(s)://, sqlite:///, "
        "databricks ... (user:password@ in it is taken out and never logged or written).",
    )
    experiment: str = Field("distft", min_length=1)
    run_name: str | None = Field(None, description="null: the output directory's name.")
    token: SecretStr | None = Field(None, description="Prefer env MLFLOW_TRACKING_TOKEN.")

    def split_uri(self) -> tuple[str | None, str | None, str | None]:
        """(the tracking URI without `user:password@`, user, password): MLflow gets the
        credentials from its environment variables, so its messages never show them."""
        uri, userinfo = self.tracking_uri, self._userinfo()
        if uri is None or userinfo is None:
            return uri, None, None
        user, _, password = userinfo.partition(":")
        return uri.replace(f"{userinfo}@", "", 1), user or None, password or None

    def redacted_uri(self) -> str | None:
        """The tracking URI as config.yaml and the logs may show it: `***@` for credentials."""
        uri, userinfo = self.tracking_uri, self._userinfo()
        return uri if uri is None or userinfo is None else uri.replace(f"{userinfo}@", "***@", 1)

    def _userinfo(self) -> str | None:
        netloc = urlsplit(self.tracking_uri or "").netloc
        return netloc.rpartition("@")[0] if "@" in netloc else None

    def missing_package(self) -> str | None:
        if not self.enabled:
            return None
        uri = self.tracking_uri or "sqlite:"
        db = not uri.startswith(("http:", "https:", "databricks", "file:", "/"))
        needed = ["mlflow", "sqlalchemy", "alembic"] if db else ["mlflow"]
        if all(importlib.util.find_spec(m) is not None for m in needed):
            return None
        return (
            "logging.mlflow.enabled: needs the mlflow package "
            "(pip install 'distft[mlflow]', or pip install mlflow-skinny sqlalchemy alembic)"
        )


class TensorboardConfig(_Section):
    enabled: bool = False
    log_dir: str | None = Field(
        None, min_length=1, description="null: <output_dir>/tensorboard; this run's own folder."
    )

    def missing_package(self) -> str | None:
        if not self.enabled or importlib.util.find_spec("tensorboard") is not None:
            return None
        return (
            "logging.tensorboard.enabled: needs the tensorboard package "
            "(pip install 'distft[tensorboard]', or pip install tensorboard)"
        )


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
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    tensorboard: TensorboardConfig = Field(default_factory=TensorboardConfig)


class Config(_Section):
    seed: int = Field(42, ge=0)
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
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
        problems += sequence_parallel_problems(self)
        for tracker in (self.logging.mlflow, self.logging.tensorboard):
            if missing := tracker.missing_package():
                problems.append(missing)
        save = self.lora.modules_to_save
        if save and not self.lora.enabled:
            problems.append(
                "lora.modules_to_save: needs lora.enabled: true (a full fine-tune trains "
                "every module)"
            )
        elif save and ds.zero_stage == 3:
            problems.append(
                "lora.modules_to_save: not supported with deepspeed.zero_stage 3 (peft copies "
                "the modules while their weights are partitioned); use zero_stage 2, or "
                "model.add_special_tokens to train new tokens' rows alone"
            )
        problems += adapter_problems(self)
        problems += objective_problems(self)
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
        mlflow = data["logging"]["mlflow"]
        if self.logging.mlflow.token is not None:
            mlflow["token"] = "***"
        mlflow["tracking_uri"] = self.logging.mlflow.redacted_uri()
        return data
