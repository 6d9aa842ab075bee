"""Issue 16 (part A2): bad data records and bad model or tokenizer folders are refused on
the driver, before Ray starts: one `error:` line naming `file:line` (records) or the config
key and the file (model, tokenizer), exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distft.assets import TinyAssets
from distft.data import Completion, Conversation, read_conversations
from tests.bad_input import refuse, run
from tests.support import tiny_config, write_config

# ------------------------------------------------------------------ records


def chat(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = chat(("user", "Hi."), ("assistant", "Hello."))
ALTERNATE = "after an optional first system message, turns alternate user, assistant"


def jsonl(*records: Any) -> str:
    """Lines of records (a str is written as it is)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def data_config(tiny: TinyAssets, tmp_path: Path, name: str, text: str, **data: Any) -> Path:
    """A config whose only data is `name` holding `text`; the model is the tiny one."""
    f = tmp_path / name
    f.write_text(text, encoding="utf-8")
    data = {"train_files": [str(f)], "eval_files": [], "cache_dir": str(tmp_path / "c"), **data}
    return write_config(tmp_path / "run.yaml", tiny_config(tiny, tmp_path / "out", data=data))


ASSISTANT_FIRST = chat(("assistant", "A."), ("user", "Q?"), ("assistant", "A."))
SURROGATE = chat(("user", "\ud800"), ("assistant", "A."))  # json.dumps writes \ud800
# fmt: off
RECORD_CASES = [pytest.param(jsonl(GOOD, *bad), expected, id=name) for name, bad, expected in [
    ("assistant-first", [ASSISTANT_FIRST],
     "2: messages[0].role: 'assistant' where the user turn belongs; " + ALTERNATE),
    ("system-then-assistant", [chat(("system", "S."), ("assistant", "A."), ("user", "Q?"))],
     "2: messages[1].role: 'assistant' where the user turn belongs"),
    ("two-user-turns", [chat(("user", "Q?"), ("user", "Q?"), ("assistant", "A."))],
     "2: messages[1].role: 'user' where the assistant turn belongs"),
    ("two-assistant-turns", [GOOD, chat(("user", "Q?"), ("assistant", "A."), ("assistant", "B."))],
     "3: messages[2].role: 'assistant' where the user turn belongs"),
    ("system-later", [chat(("user", "Q?"), ("system", "S."), ("assistant", "A."))],
     "2: messages[1].role: a system message after the first message"),
    ("sharegpt-gpt-first", [{"conversations": [{"from": "gpt", "value": "A."}]}],
     "2: conversations[0].from: 'gpt' (assistant) where the user turn belongs"),
    ("empty", [{"messages": []}], "2: field 'messages' must be a non-empty list"),
    ("content-number", [{"messages": [{"role": "user", "content": 3}, *GOOD["messages"][1:]]}],
     "2: field 'content' must be a string, got int"),
    ("content-parts", [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}],
     "2: field 'content' must be a string, got list"),
    ("role-missing", [{"messages": [{"content": "Q?"}, *GOOD["messages"][1:]]}],
     "2: messages[0].role: unknown role None"),
    ("null-line", ["null"], "2: expected a JSON object, got NoneType"),
    ("cut-line", ['{"messages": ['], "2: invalid JSON (Expecting value)"),
    ("deep-nesting", ["[" * 100_000], "2: invalid JSON (nested too deeply)"),
    ("integer-too-long-to-read", ['{"input_ids": [1, ' + "9" * 5000 + "]}"],
     "2: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ("token-out-of-vocab", [{"input_ids": [1, 2, 99999]}],
     "2: input_ids[2]: token id 99999 is outside the vocabulary (size 512)"),
    ("token-beyond-int32", [{"input_ids": [1, 10**30]}],
     "2: input_ids[1]: 1000000000000000000000000000000 is not a token id"),
    ("lone-surrogate", [SURROGATE], "2: field 'content': character 0 is a lone surrogate"),
]]
# fmt: on


@pytest.mark.parametrize(("text", "expected"), RECORD_CASES)
def test_bad_record_is_refused_with_file_and_line(
    tiny: TinyAssets, tmp_path: Path, text: str, expected: str
) -> None:
    config = data_config(tiny, tmp_path, "train.jsonl", text)
    where = tmp_path / "train.jsonl"
    refuse("validate", str(config), expect=f"error: {where}:{expected}", unchanged=[tmp_path])


FILE_CASES = [
    pytest.param("d.json", json.dumps([1, 2]), ":1: expected a JSON object, got int", id="array"),
    pytest.param(
        "d.json",
        json.dumps({"data": [GOOD]}, indent=2),
        ":1: one JSON object over several lines (keys: data); a .json data file holds a "
        "JSON array of records, or one record per line (JSON Lines)",
        id="json-object",
    ),
    pytest.param(
        "d.csv", "question,answer\nQ?,A.\n", ":2: cannot tell the format", id="csv-columns"
    ),
    pytest.param("d.csv", "prompt,completion\n", ": no usable records", id="csv-header-only"),
]


@pytest.mark.parametrize(("name", "text", "expected"), FILE_CASES)
def test_bad_data_file_is_refused(
    tiny: TinyAssets, tmp_path: Path, name: str, text: str, expected: str
) -> None:
    config = data_config(tiny, tmp_path, name, text)
    refuse(
        "validate", str(config), expect=f"error: {tmp_path / name}{expected}", unchanged=[tmp_path]
    )


def test_bad_turn_order_follows_on_bad_record(tiny: TinyAssets, tmp_path: Path) -> None:
    """A conversation out of turn is a record problem: `skip` skips it, and when nothing
    is left the source has no usable records."""
    bad = chat(("user", "Q?"), ("user", "Q?"), ("assistant", "A."))
    config = data_config(tiny, tmp_path, "d.jsonl", jsonl(GOOD, bad), on_bad_record="skip")
    assert run("validate", str(config)).code == 0
    config = data_config(tiny, tmp_path, "d.jsonl", jsonl(bad, bad), on_bad_record="skip")
    refuse("validate", str(config), expect=f"{tmp_path / 'd.jsonl'}: no usable records")


def test_train_refuses_a_bad_record_before_ray(tiny: TinyAssets, tmp_path: Path) -> None:
    bad = chat(("assistant", "A."), ("user", "Q?"), ("assistant", "A."))
    config = data_config(tiny, tmp_path, "d.jsonl", jsonl(GOOD, bad))
    refuse(
        "train",
        str(config),
        expect=f"{tmp_path / 'd.jsonl'}:2: messages[0].role",
        unchanged=[tmp_path],
    )


BOM = "\ufeff"


@pytest.mark.parametrize(
    ("name", "text", "first"),
    [
        pytest.param("d.jsonl", BOM + jsonl(GOOD, GOOD), GOOD["messages"], id="jsonl"),
        pytest.param("d.json", BOM + json.dumps([GOOD, GOOD]), GOOD["messages"], id="json"),
        pytest.param("d.csv", BOM + "prompt,completion\nQ?,A.\nQ?,A.\n", ("Q?", "A."), id="csv"),
    ],
)
def test_byte_order_mark_is_accepted(
    tiny: TinyAssets, tmp_path: Path, name: str, text: str, first: Any
) -> None:
    config = data_config(tiny, tmp_path, name, text)
    outcome = run("validate", str(config))
    assert outcome.code == 0, outcome.stderr
    samples, _ = read_conversations([str(tmp_path / name)])
    sample = samples[0]
    if isinstance(sample, Completion):
        assert (sample.prompt, sample.completion) == first
    else:
        assert isinstance(sample, Conversation) and sample.messages == first
    assert sample.source == f"{tmp_path / name}:{2 if name.endswith('csv') else 1}"


# ------------------------------------------------------------------ model and tokenizer


Mutate = Callable[[Path], object]


def model_config(
    tiny: TinyAssets,
    tmp_path: Path,
    mutate: Mutate,
    model: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A config naming a copy of the tiny model folder changed by `mutate`."""
    folder = tmp_path / "model"
    shutil.copytree(tiny.model_dir, folder)
    mutate(folder)
    section = {"name_or_path": str(folder), **(model or {})}
    small = tmp_path / "d.jsonl"  # a few records: the data checks take no time
    small.write_text(jsonl(GOOD, GOOD, GOOD))
    data = {
        "train_files": [str(small)],
        "eval_files": [],
        "cache_dir": str(tmp_path / "c"),
        **sections.pop("data", {}),
    }
    cfg = tiny_config(tiny, tmp_path / "out", model=section, data=data, **sections)
    return write_config(tmp_path / "run.yaml", cfg)


def remove(*names: str) -> Mutate:
    return lambda folder: [(folder / n).unlink() for n in names]


def write(name: str, text: str) -> Mutate:
    return lambda folder: (folder / name).write_text(text)


def cut(name: str, keep: int) -> Mutate:
    """Keep the first `keep` bytes (negative: drop that many at the end)."""

    def apply(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:keep])

    return apply


def append(name: str, extra: bytes) -> Mutate:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes() + extra)


def empty(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


def adapter_only(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "adapter_config.json").write_text("{}")


def sharded(change: Callable[[Path], object] = lambda folder: None) -> Mutate:
    """The model's weights in two shards with an index, then `change`d."""

    def apply(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        for shard, part in shards.items():
            save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map = {n: shard for shard, part in shards.items() for n in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        change(folder)

    return apply


def map_extra_tensor(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def scaled_rope(folder: Path) -> None:
    text = (folder / "config.json").read_text()
    linear = '"rope_type": "linear", "factor": 4.0'
    (folder / "config.json").write_text(text.replace('"rope_type": "default"', linear))


SHARD1 = "model-00001-of-00002.safetensors"
INDEX = "model.safetensors.index.json"
# fmt: off
MODEL_CASES = [pytest.param(mutate, expected, id=name) for name, mutate, expected in [
    ("no-config", remove("config.json"),
     "{m} has no config.json (not a Hugging Face model folder)"),
    ("empty-folder", empty, "{m} has no config.json"),
    ("adapter-folder", adapter_only, "{m} has no config.json (not a Hugging Face model folder; "
     "it holds a PEFT adapter: name its base model)"),
    ("config-cut", cut("config.json", 100),
     "{m}/config.json is not valid JSON (Expecting value, line 6 column 23)"),
    ("config-array", write("config.json", "[1]"),
     "{m}/config.json holds an array, not a JSON object"),
    ("config-no-type", write("config.json", "{}"), "{m}/config.json has no 'model_type'"),
    ("config-unknown-type", write("config.json", '{"model_type": "nope"}'),
     "{m}/config.json: model_type 'nope' is not known to transformers"),
    ("weights-cut", cut("model.safetensors", -100), "{m}/model.safetensors is truncated: its "
     "header describes 558,336 bytes of tensors, the file holds 558,236"),
    ("weights-cut-in-header", cut("model.safetensors", 20), "{m}/model.safetensors is not a "
     "safetensors file or is truncated (header length 2144, file size 20 bytes)"),
    ("weights-empty", cut("model.safetensors", 0), "weight file {m}/model.safetensors is empty"),
    ("weights-extra-bytes", append("model.safetensors", b"xx"),
     "{m}/model.safetensors has 2 bytes after its tensors"),
    ("no-weights", remove("model.safetensors"), "{m} has a config.json but no weights"),
    ("shard-missing", sharded(remove(SHARD1)),
     f"weight file {{m}}/{SHARD1} (listed in {INDEX}) is missing"),
    ("shard-cut", sharded(cut(SHARD1, -1)), f"{{m}}/{SHARD1} is truncated"),
    ("index-names-absent-tensor", sharded(map_extra_tensor),
     f"{{m}}/{SHARD1} lacks tensor 'model.extra.weight'"),
    ("index-cut", write(INDEX, "{"), f"{{m}}/{INDEX} is not valid JSON"),
    ("tokenizer-cut", cut("tokenizer.json", 200), "{m}/tokenizer.json is not valid JSON"),
    ("tokenizer-config-cut", cut("tokenizer_config.json", 20),
     "{m}/tokenizer_config.json is not valid JSON"),
    ("tokenizer-json-not-a-tokenizer", write("tokenizer.json", "{}"),
     "cannot load tokenizer '{m}': KeyError"),
    ("no-tokenizer", remove("tokenizer.json", "tokenizer_config.json"),
     "{m} has no tokenizer (no tokenizer.json or tokenizer_config.json)"),
]]
# fmt: on


@pytest.mark.parametrize(("mutate", "expected"), MODEL_CASES)
def test_bad_model_folder_is_refused(
    tiny: TinyAssets, tmp_path: Path, mutate: Mutate, expected: str
) -> None:
    config = model_config(tiny, tmp_path, mutate)
    m = tmp_path / "model"
    refuse(
        "validate",
        str(config),
        expect=f"error: model.name_or_path: {expected.format(m=m)}",
        unchanged=[tmp_path],
    )


def test_model_tokenizer_folder_is_checked(tiny: TinyAssets, tmp_path: Path) -> None:
    """`model.tokenizer` names its own folder: its problems name that key."""
    tok = tmp_path / "tok"
    tok.mkdir()
    config = model_config(tiny, tmp_path, lambda _: None, model={"tokenizer": str(tok)})
    refuse(
        "validate",
        str(config),
        expect=f"error: model.tokenizer: {tok} has no tokenizer",
        unchanged=[tmp_path],
    )
    shutil.copy(tiny.model_dir / "tokenizer_config.json", tok)
    (tok / "tokenizer.json").write_bytes((tiny.model_dir / "tokenizer.json").read_bytes()[:-50])
    refuse(
        "validate",
        str(config),
        unchanged=[tmp_path],
        expect=f"error: model.tokenizer: {tok}/tokenizer.json is not valid JSON",
    )
    shutil.rmtree(tok)
    expect = f"error: model.tokenizer: directory not found: {tok}"
    refuse("train", str(config), expect=expect, unchanged=[tmp_path])


def test_lora_target_the_model_lacks_is_refused(tiny: TinyAssets, tmp_path: Path) -> None:
    lora = {"enabled": True, "target_modules": ["q_proj", "qkv_proj"]}
    config = model_config(tiny, tmp_path, lambda _: None, lora=lora)
    for command in ("validate", "train"):
        refuse(
            command,
            str(config),
            unchanged=[tmp_path],
            expect="error: lora.target_modules: 'qkv_proj' matches no module of "
            "LlamaForCausalLM; its linear layers: down_proj",
        )


def test_max_seq_len_above_the_model_positions_is_refused(tiny: TinyAssets, tmp_path: Path) -> None:
    config = model_config(tiny, tmp_path, lambda _: None, data={"max_seq_len": 2048})
    expect = (
        "error: data.max_seq_len: 2048 is above the model's limit of 1024 positions "
        "(max_position_embeddings); set data.max_seq_len to at most 1024"
    )
    for command in ("validate", "train"):
        refuse(command, str(config), expect=expect, unchanged=[tmp_path])


def test_rope_scaling_raises_the_position_limit(tiny: TinyAssets, tmp_path: Path) -> None:
    config = model_config(tiny, tmp_path, scaled_rope, data={"max_seq_len": 4096})
    assert run("validate", str(config)).code == 0
    refuse(
        "validate",
        str(config),
        "data.max_seq_len=4097",
        unchanged=[tmp_path],
        expect="error: data.max_seq_len: 4097 is above the model's limit of 4096 positions "
        "(rope scaling 4.0 x 1024)",
    )


def test_max_positions_of_other_architectures() -> None:
    from transformers import GPT2Config, LlamaConfig

    from distft.model import max_positions

    assert max_positions(GPT2Config(n_positions=64)) == (64, "n_positions")
    llama31 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "rope_theta": 5e5,
    }
    config = LlamaConfig(max_position_embeddings=131072, rope_parameters=llama31)
    assert max_positions(config) == (131072, "max_position_embeddings")


def test_sharded_model_passes(tiny: TinyAssets, tmp_path: Path) -> None:
    """The weight checks accept a valid sharded folder (no false refusals)."""
    config = model_config(tiny, tmp_path, sharded())
    outcome = run("validate", str(config))
    assert outcome.code == 0, outcome.stderr


def test_train_refuses_a_truncated_model_before_ray(tiny: TinyAssets, tmp_path: Path) -> None:
    config = model_config(tiny, tmp_path, cut("model.safetensors", -1))
    refuse(
        "train",
        str(config),
        unchanged=[tmp_path],
        expect=f"error: model.name_or_path: {tmp_path / 'model'}/model.safetensors is truncated",
    )
