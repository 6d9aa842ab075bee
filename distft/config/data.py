"""The data sections: training and eval datasets, their formats and field names, and the
checks on local data paths (missing, unreadable, eval data that is also training data)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distft.config.base import _Section

DataFormat = Literal[
    "auto", "instruction", "chat", "prompt_completion", "text", "tokenized", "preference"
]
# Record field names a config may remap (`fields: {canonical: name in the records}`).
DATA_FIELDS = (
    "instruction", "input", "output", "system", "messages", "role", "content",
    "prompt", "completion", "text", "input_ids", "labels", "chosen", "rejected",
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


EVAL_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class EvalSetConfig(_Section):
    """A named eval set: its loss is logged as `eval/<name>/loss`."""

    files: list[str] = Field(default_factory=list, description="Local files or folders.")
    sources: list[SourceConfig] = Field(default_factory=list, description="As data.sources.")

    @field_validator("files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_data(self) -> EvalSetConfig:
        if not self.files and not self.sources:
            raise ValueError("an eval set needs 'files' or 'sources'")
        return self


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=list, description="Local .json/.jsonl/.parquet/.csv files or folders."
    )
    eval_files: list[str] = Field(default_factory=list)
    sources: list[SourceConfig] = Field(default_factory=list, description="More train data.")
    eval_sources: list[SourceConfig] = Field(default_factory=list)
    val_fraction: float = Field(0.0, ge=0, lt=1, description="Eval carved from train.")
    eval_sets: dict[str, EvalSetConfig] = Field(
        default_factory=dict, description="Named eval sets: {name: {files, sources}}."
    )
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
    num_proc: int | Literal["auto"] = Field(
        "auto", description="Processes that tokenize a source; auto: the node's usable cores."
    )

    _fields = field_validator("fields")(_check_fields)

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("num_proc", mode="before")
    @classmethod
    def _num_proc(cls, v: Any) -> Any:
        if v == "auto" or (type(v) is int and v >= 1):
            return v
        raise ValueError("must be an int >= 1 or 'auto'")

    @field_validator("eval_sets")
    @classmethod
    def _set_names(cls, v: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
        bad = [n for n in v if not EVAL_SET_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"eval set name {bad[0]!r}: use letters, digits, '_', '.', '-'")
        return v

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
        for es in data.eval_sets.values():
            es.files = [absolute(f) for f in es.files]
        eval_set_sources = [s for es in data.eval_sets.values() for s in es.sources]
        for src in data.sources + data.eval_sources + eval_set_sources:
            src.path = None if src.path is None else absolute(src.path)
        problems = [p for key, path in data.local_paths() if (p := _path_problem(key, path))]
        if self.cache_dir is not None:
            data.cache_dir = absolute(self.cache_dir)
            problems += _dir_problem("data.cache_dir", Path(data.cache_dir))
        return data, problems + data.eval_overlaps()

    def eval_set_keys(self) -> list[tuple[str, str, list[str], list[SourceConfig]]]:
        """(metric key, config key prefix, files, sources) of every eval set: the unnamed one
        (`eval/loss`; eval_files/eval_sources) if given, then the named ones in config order."""
        out = [("eval/loss", "data.eval_", self.eval_files, self.eval_sources)]
        out = out if self.eval_files or self.eval_sources else []
        out += [(f"eval/{n}/loss", f"data.eval_sets.{n}.", s.files, s.sources)
                for n, s in self.eval_sets.items()]  # fmt: skip
        return out

    def local_paths(self, which: str = "") -> list[tuple[str, str]]:
        """(key, path) of every local data path; `which`: "train", "eval" or both."""
        sets = [("data.train_", self.train_files, self.sources)] if which != "eval" else []
        if which != "train":
            sets += [(prefix, f, s) for _, prefix, f, s in self.eval_set_keys()]
        out = []
        for prefix, files, sources in sets:
            out += [(f"{prefix}files", f) for f in files]
            out += [(f"{prefix}sources.{i}.path", s.path)
                    for i, s in enumerate(sources) if s.path is not None]  # fmt: skip
        return [(k.replace("data.train_sources", "data.sources"), p) for k, p in out]

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
        for _, prefix, _, sources in self.eval_set_keys():
            for i, s in enumerate(sources):
                j = train_hubs.get((s.hub, s.subset, s.split, s.revision))
                if s.hub is not None and j is not None:
                    problems.append(
                        f"{prefix}sources.{i}.hub: {s.hub} (split {s.split}) is also training "
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
