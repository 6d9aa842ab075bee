"""Loading: YAML (1.2 floats) + dotted overrides -> a validated `Config`, each problem as
one line naming the key, the bad value and what is allowed; local paths made absolute."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distft.config.base import ConfigError
from distft.config.sections import Config


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping that names the same key twice (PyYAML would keep the last silently)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` and `5e8` as floats (YAML 1.2), not strings, and
    refuses a key given twice in one mapping (merge keys `<<` may still override)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in first_line:
                problem = f"duplicate key {key!r} (first at line {first_line[key]})"
                raise DuplicateKey(None, None, problem, key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists."""
    out = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override '{item}': expected key=value, e.g. optim.lr=1e-5")
            continue
        parts = [part.strip() for part in key.strip().split(".")]
        if not all(parts):
            problems.append(f"override '{item}': empty key part")
            continue
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override '{item}': '{part}' is not a section")
                break
            node = child
        else:
            try:
                node[parts[-1]] = _yaml(value) if value != "" else ""
            except DuplicateKey as e:
                problems.append(f"override '{item}': {e.problem}")
            except yaml.YAMLError:
                node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{loc}: unknown key{hint}"
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:
        return msg  # cross-section checks already name their keys (one per line)
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{loc}: {msg}{shown}"


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = [line for err in e.errors() for line in _describe(dict(err), Config).splitlines()]
        raise ConfigError(lines) from None


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read YAML at `path`, apply overrides, validate. Raises ConfigError."""
    p = Path(path)
    try:
        raw = _yaml(_read_text(p)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        if isinstance(e, DuplicateKey):
            raise ConfigError([f"{where}: {e.problem}"]) from None
        raise ConfigError([f"{where}: invalid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: expected a mapping of sections at the top level"])
    return from_dict(apply_overrides(raw, overrides or []))


def _read_text(p: Path) -> str:
    """The config file's text; anything that is not a readable UTF-8 file is one line."""
    if p.is_dir():
        raise ConfigError([f"{p}: is a directory, not a config file"])
    if not p.exists():
        raise ConfigError([f"{p}: config file not found"])
    if not p.is_file() and not p.is_fifo():  # a pipe: `distft train <(envsubst < c.yaml)`
        raise ConfigError([f"{p}: not a regular file"])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read ({e.strerror or e})"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text (byte {e.start})"]) from None


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Check local inputs exist and make them absolute (workers run in other directories).

    Hub names (`org/name`) are left to `from_pretrained`. Returns a new Config.
    """
    base = base or Path.cwd()
    problems = []

    def absolute(value: str) -> str:
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    data, data_problems = cfg.data.resolved(absolute)
    problems += data_problems
    model = cfg.model.model_copy()
    for key in ("name_or_path", "tokenizer"):
        value = getattr(cfg.model, key)
        if not value:
            continue
        if Path(absolute(value)).exists():
            setattr(model, key, absolute(value))
        elif _looks_local(value):
            problems.append(f"model.{key}: directory not found: {value}")
    if problems:
        raise ConfigError(problems)
    ckpt = cfg.checkpoint.model_copy(update={"output_dir": absolute(cfg.checkpoint.output_dir)})
    logging = cfg.logging.model_copy(deep=True)
    if logging.tensorboard.log_dir is not None:
        logging.tensorboard.log_dir = absolute(logging.tensorboard.log_dir)
    return cfg.model_copy(
        update={"data": data, "model": model, "checkpoint": ckpt, "logging": logging}, deep=True
    )


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") >= 2


def save_resolved(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.redacted(), sort_keys=False))
