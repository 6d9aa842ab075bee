"""What a local model or tokenizer folder must hold, checked from its files before Ray
starts (no weights read): a `config.json` that parses as a JSON object of a known model
type, weight files whose safetensors headers describe exactly the bytes the files hold
(a truncated download or copy fails here, not on every worker after minutes), and the
files a tokenizer is read from. Hub names are left to `from_pretrained`.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON
(`{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": ...}`), then the
tensor bytes; the largest `end` is the length of that last part.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from distft.config import Config
from distft.errors import UserError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_local_files(cfg: Config) -> None:
    """The model folder (`model.name_or_path`: config and weights) and the tokenizer folder
    (`model.tokenizer`, default the model's), when they are local folders. UserError: one
    line naming the key and the file. (The CLI runs this first, with the data checks: the
    tokenizer is read from these folders.)"""
    m = cfg.model
    if Path(m.name_or_path).is_dir():
        check_model_config(Path(m.name_or_path), m.trust_remote_code)
        check_weights(Path(m.name_or_path))
    key = "model.tokenizer" if m.tokenizer else "model.name_or_path"
    tokenizer = Path(m.tokenizer or m.name_or_path)
    if tokenizer.is_dir():
        check_tokenizer_folder(tokenizer, key)


def read_json(path: Path, key: str) -> Any:
    """The JSON in `path`; UserError naming `key`, the file and the problem."""
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(
            f"{key}: {path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        ) from None
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise UserError(f"{key}: {path} is not valid JSON ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{key}: cannot read {path} ({e.strerror or e})") from None


# ------------------------------------------------------------------ model folder


def check_model_config(folder: Path, trust_remote_code: bool = False) -> None:
    """A `config.json` that is a JSON object of a model type transformers knows (or the
    model's own code, trusted)."""
    key = "model.name_or_path"
    config_file = folder / "config.json"
    if not config_file.is_file():
        hint = "; it holds a PEFT adapter: name its base model" if _is_adapter(folder) else ""
        raise UserError(
            f"{key}: {folder} has no config.json (not a Hugging Face model folder{hint})"
        )
    config = read_json(config_file, key)
    if not isinstance(config, dict):
        raise UserError(f"{key}: {config_file} holds {_kind(config)}, not a JSON object")
    _check_model_type(config, config_file, trust_remote_code)


def is_reward_model(folder: Path) -> bool:
    """A model or adapter folder of `objective.method: reward`: a sequence classifier
    (`config.json`'s architecture, or a peft adapter of task SEQ_CLS). False when neither
    file reads (whoever loads the folder reports that)."""
    try:
        if (folder / "adapter_config.json").is_file():
            config = json.loads((folder / "adapter_config.json").read_text())
            return bool(config.get("task_type") == "SEQ_CLS")
        if (folder / "config.json").is_file():
            names = json.loads((folder / "config.json").read_text()).get("architectures") or []
            return any(str(a).endswith("ForSequenceClassification") for a in names)
    except (OSError, ValueError, AttributeError):
        return False
    return False


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}
    return names.get(type(value), "a number")


def _check_model_type(config: dict[str, Any], config_file: Path, trust_remote_code: bool) -> None:
    """A `model_type` transformers knows, or the model's own code (`auto_map`, trusted)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if trust_remote_code and "auto_map" in config:
        return
    if not isinstance(model_type, str) or not model_type:
        raise UserError(f"model.name_or_path: {config_file} has no 'model_type'")
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        import transformers

        raise UserError(
            f"model.name_or_path: {config_file}: model_type {model_type!r} is not known to "
            f"transformers {transformers.__version__} (a newer version may know it)"
        )


def check_weights(folder: Path) -> None:
    """Weight files present and, for safetensors, complete (headers only)."""
    key = "model.name_or_path"
    if (folder / SAFETENSORS_INDEX).is_file():
        for shard, names in _index_shards(folder / SAFETENSORS_INDEX).items():
            tensors = check_safetensors(folder / shard, key, SAFETENSORS_INDEX)
            missing = sorted(names - tensors)
            if missing:
                raise UserError(
                    f"{key}: {folder / shard} lacks tensor {missing[0]!r} "
                    f"(and {len(missing) - 1} more) that {SAFETENSORS_INDEX} places in it"
                )
    elif (folder / SAFETENSORS).is_file():
        check_safetensors(folder / SAFETENSORS, key)
    elif (folder / TORCH_BIN_INDEX).is_file():
        for shard in _index_shards(folder / TORCH_BIN_INDEX):
            _check_nonempty(folder / shard, TORCH_BIN_INDEX)
    elif (folder / TORCH_BIN).is_file():
        _check_nonempty(folder / TORCH_BIN)
    else:
        raise UserError(
            f"{key}: {folder} has a config.json but no weights "
            f"({SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or {TORCH_BIN_INDEX})"
        )


def _index_shards(index: Path) -> dict[str, set[str]]:
    """Shard file name -> the tensor names the index places in it."""
    key = "model.name_or_path"
    data = read_json(index, key)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{key}: {index} has no 'weight_map' of tensor names to files")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise UserError(f"{key}: {index}: weight_map[{name!r}] is not a file name: {shard!r}")
        shards.setdefault(shard, set()).add(name)
    return shards


def _check_nonempty(path: Path, index: str | None = None) -> None:
    listed = f" (listed in {index})" if index else ""
    if not path.is_file():
        raise UserError(f"model.name_or_path: weight file {path}{listed} is missing")
    if path.stat().st_size == 0:
        raise UserError(f"model.name_or_path: weight file {path}{listed} is empty")


def check_safetensors(path: Path, key: str, index: str | None = None) -> set[str]:
    """The tensor names of a safetensors file whose header is valid and whose size is the
    header's length plus the tensors' bytes; UserError naming the file otherwise."""
    _check_nonempty(path, index)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise UserError(f"{key}: {path} is not a safetensors file or is truncated "
                            f"(header length {n}, file size {size} bytes)")  # fmt: skip
        header = _header(f.read(n), path, key)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    held = size - 8 - n
    if held < end:
        raise UserError(
            f"{key}: {path} is truncated: its header describes {end:,} bytes of tensors, "
            f"the file holds {held:,} (an interrupted download or copy?)"
        )
    if held > end:
        raise UserError(
            f"{key}: {path} has {held - end:,} bytes after its tensors (not a valid "
            "safetensors file)"
        )
    return set(header)


def _header(raw: bytes, path: Path, key: str) -> dict[str, Any]:
    """The tensor entries of a safetensors header (without `__metadata__`)."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{key}: {path} is not a safetensors file (its header is not JSON)")
    header.pop("__metadata__", None)
    for name, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(x, int) and x >= 0 for x in offsets)):  # fmt: skip
            raise UserError(f"{key}: {path}: tensor {name!r} has no valid data_offsets")
    return header


# ------------------------------------------------------------------ tokenizer folder


def check_tokenizer_folder(folder: Path, key: str) -> None:
    """A folder a tokenizer can be read from: `tokenizer.json` or `tokenizer_config.json`,
    and every JSON file of the tokenizer parses."""
    if not any((folder / name).is_file() for name in TOKENIZER_JSON[:2]):
        raise UserError(f"{key}: {folder} has no tokenizer (no tokenizer.json or "
                        "tokenizer_config.json); set model.tokenizer to a folder or hub "
                        "name that has one")  # fmt: skip
    for name in TOKENIZER_JSON:
        if (folder / name).is_file():
            data = read_json(folder / name, key)
            if not isinstance(data, dict):
                raise UserError(f"{key}: {folder / name} holds {_kind(data)}, not a JSON object")
