"""Typed, strict run configuration: YAML + dotted overrides -> validated `Config`.

Every problem is reported as one line naming the key, the bad value and what is allowed
(`ConfigError.problems`); unknown keys are rejected. Nothing here starts a process.
"""

from distft.config.base import ConfigError
from distft.config.data import DataConfig, SourceConfig
from distft.config.loading import apply_overrides, from_dict, load, resolve_paths, save_resolved
from distft.config.objective import ObjectiveConfig, RewardConfig
from distft.config.sections import (
    BatchConfig,
    CheckpointConfig,
    ClusterConfig,
    Config,
    DeepSpeedConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    TensorboardConfig,
    WandbConfig,
)

__all__ = [
    "BatchConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "MlflowConfig",
    "ObjectiveConfig",
    "RewardConfig",
    "ModelConfig",
    "OptimConfig",
    "Precision",
    "SourceConfig",
    "TensorboardConfig",
    "WandbConfig",
    "apply_overrides",
    "from_dict",
    "load",
    "resolve_paths",
    "save_resolved",
]
