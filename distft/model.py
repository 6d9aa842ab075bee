"""Model and tokenizer loading. Full fine-tuning vs LoRA is decided here, once.

`check_model` runs on the driver before Ray starts: from the model's config alone (a local
folder's `config.json` checked first, `model_files`; the architecture built on the meta
device, no weights read) it resolves `model.attn_implementation: auto` to what the model
supports, checks `data.max_seq_len` against the model's positions and that every LoRA
target exists. (A local folder's weight headers and tokenizer files are checked before
it, by the CLI: `model_files.check_local_files`.) Workers build the same
LoRA layout with `distft.lora.with_lora`. Added tokens and the tokenizer: `distft.vocab`;
NEFTune noise: `distft.neftune`.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch

from distft import neftune, quant, vocab
from distft.config import Config, Precision
from distft.errors import UserError
from distft.lora import _adapted, lora_plan, with_lora
from distft.model_files import check_model_config
from distft.vocab import load_tokenizer

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dtype(cfg: Config) -> torch.dtype:
    name = cfg.model.dtype
    if name == "auto":
        name = Precision(cfg.deepspeed.precision).value
    return _DTYPES[name]


# ------------------------------------------------------------------ driver-side checks


def check_model(cfg: Config, local_only: bool) -> tuple[Config | None, list[str]]:
    """Check a local model folder's config.json (`model_files`), resolve
    `model.attn_implementation`, check `data.max_seq_len` and the LoRA targets against the
    model's architecture, reading only its config (no weights). Returns the config with a
    concrete attention implementation and lines to print, or (None, [why]) when the model's config
    is not available here (`local_only`: a hub model that is not in the local cache).
    Raises UserError (one line per problem) for a choice the model cannot take."""
    with warnings.catch_warnings():  # peft/transformers notes about their own choices
        warnings.simplefilter("ignore")
        return _check_model(cfg, local_only)


def _check_model(cfg: Config, local_only: bool) -> tuple[Config | None, list[str]]:
    if Path(cfg.model.name_or_path).is_dir():  # its weights: model_files.check_local_files
        check_model_config(Path(cfg.model.name_or_path), cfg.model.trust_remote_code)
    try:
        config = hf_config(cfg, local_only)
        check_task(cfg, config)
        model = on_meta(config, auto=auto_class(cfg), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # not cached (validate), not reachable, unknown type
        if local_only and not Path(cfg.model.name_or_path).exists():
            return None, [
                f"model checks skipped: {cfg.model.name_or_path} is not in the local cache "
                "(`distft train` reads its config before starting Ray)"
            ]
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.name_or_path: cannot read the config of {cfg.model.name_or_path} ({why})"
        ) from None
    check_positions(cfg.data.max_seq_len, config)
    attn = pick_attention(cfg, type(model))
    from distft import seqpar  # lazy: seqpar reaches the data layer

    seqpar.check_model(config, attn, cfg.deepspeed.sequence_parallel_size)
    lines = [f"attention: {attn}" + (" (auto)" if cfg.model.attn_implementation == "auto" else "")]
    model_section = cfg.model.model_copy(update={"attn_implementation": attn})
    resolved = cfg.model_copy(update={"model": model_section}, deep=True)
    if vocab.customised(cfg):
        try:
            tokenizer = load_tokenizer(cfg)
        except OSError as e:  # validate: a hub tokenizer that is not cached
            if not local_only:
                raise UserError(f"model.tokenizer: cannot load the tokenizer ({e})") from None
            return resolved, [*lines, "added tokens and LoRA layout not checked: no tokenizer"]
        with torch.device("meta"):
            grown = vocab.resize(model, cfg, tokenizer)
        lines.append(f"tokenizer: {len(tokenizer)} tokens; embeddings grown by {grown} rows")
    if cfg.lora.enabled:
        lines += lora_plan(model, cfg).notes
        with torch.device("meta"):  # the adapters too: no memory, no initialisation
            lines.append(_adapted(with_lora(model, cfg)))
    return resolved, lines


def hf_config(cfg: Config, local_only: bool = False) -> Any:
    """The base model's transformers config (`local_only`: never download it); for a
    reward model (`objective.method: reward`) with one output, the reward."""
    from transformers import AutoConfig

    m = cfg.model
    config = AutoConfig.from_pretrained(
        m.name_or_path,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        local_files_only=local_only,
    )
    if cfg.objective.method == "reward":
        config.num_labels = 1
    return config


def check_task(cfg: Config, config: Any) -> None:
    """A reward model needs transformers' sequence-classification class for the model's
    architecture."""
    from transformers import AutoModelForSequenceClassification

    mapping = AutoModelForSequenceClassification._model_mapping  # type: ignore[attr-defined]
    if cfg.objective.method == "reward" and type(config) not in mapping:
        raise UserError(
            f"objective.method: 'reward' needs a sequence-classification model; transformers "
            f"has none for {config.model_type!r} ({cfg.model.name_or_path})"
        )


def auto_class(cfg: Config) -> Any:
    """The transformers auto class of the run's model: a causal LM, or for
    `objective.method: reward` a sequence classifier (the base with a one-output `score`
    head, initialised when the base has none; `distft.objectives.reward`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if cfg.objective.method == "reward":
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def on_meta(config: Any, model_cls: Any = None, auto: Any = None, **kwargs: Any) -> Any:
    """The architecture of a transformers `config` on the meta device: names, shapes and
    class flags, no memory and no initialisation. `model_cls`: the class of a model already
    built (remote code included); else `auto` (an auto class, default
    AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import (  # type: ignore[attr-defined,no-redef]
            no_init_weights,
        )
    with torch.device("meta"), no_init_weights():  # initialising is most of the time
        if model_cls is not None:
            return model_cls._from_config(config, **kwargs)
        return (auto or AutoModelForCausalLM).from_config(config, **kwargs)


def meta_model(cfg: Config, local_only: bool = False) -> Any:
    """The run's base architecture on the meta device, no weights read."""
    config = hf_config(cfg, local_only)
    return on_meta(config, auto=auto_class(cfg), trust_remote_code=cfg.model.trust_remote_code)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
SCALED = ("linear", "dynamic", "yarn", "longrope", "llama3")  # rope types with a `factor`


def max_positions(config: Any) -> tuple[int, str] | None:
    """The longest sequence the model's config allows and where that number comes from:
    its position limit (`max_position_embeddings`, GPT-2's `n_positions`, ...), or, with
    rope scaling, `factor` x `original_max_position_embeddings` when that is larger.
    None when the config names no limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = [(getattr(text, k, None), k) for k in POSITION_KEYS]
    found = [(n, k) for n, k in values if isinstance(n, int) and not isinstance(n, bool)]
    if not found:
        return None
    limit, key = found[0]
    key = getattr(text, "attribute_map", {}).get(key, key)  # the name in config.json
    for rope in _rope_settings(text):
        if rope.get("rope_type", rope.get("type")) in SCALED and rope.get("factor"):
            base = rope.get("original_max_position_embeddings") or limit
            scaled = int(float(rope["factor"]) * base)
            if scaled > limit:
                limit, key = scaled, f"rope scaling {rope['factor']} x {base}"
    return limit, key


def _rope_settings(config: Any) -> list[dict[str, Any]]:
    """Rope parameters (transformers 5: `rope_parameters`, per layer type for some models;
    before: `rope_scaling`)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return []
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def check_positions(max_seq_len: int, config: Any) -> None:
    """`data.max_seq_len` within the positions the model has (beyond them a model with
    learned positions fails on the workers, and a rope model was never trained there)."""
    found = max_positions(config)
    if found is not None and max_seq_len > found[0]:
        limit, key = found
        raise UserError(
            f"data.max_seq_len: {max_seq_len} is above the model's limit of {limit} "
            f"positions ({key}); set data.max_seq_len to at most {limit}"
        )


def pick_attention(cfg: Config, model_cls: type) -> str:
    """`auto`: flash_attention_2 on GPU workers in bf16/fp16 when `flash_attn` is installed
    and the model supports it, else sdpa when the model supports it, else eager. An
    explicit choice the model does not support is refused (transformers would refuse it
    on the workers, after Ray started)."""
    requested, name = cfg.model.attn_implementation, model_cls.__name__
    sdpa = bool(getattr(model_cls, "_supports_sdpa", False))
    flash = bool(
        getattr(model_cls, "_supports_flash_attn", False)
        or getattr(model_cls, "_supports_flash_attn_2", False)
    )
    gpu = cfg.cluster.use_gpu
    if requested == "auto":
        half = load_dtype(cfg) in (torch.bfloat16, torch.float16)
        if gpu and half and flash and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        return "sdpa" if sdpa else "eager"
    supported = ["eager"] + (["sdpa"] if sdpa else []) + (["flash_attention_2"] if flash else [])
    if requested not in supported:
        raise UserError(
            f"model.attn_implementation: {name} does not support {requested!r}; "
            f"it supports {', '.join(supported)} (or use 'auto')"
        )
    if requested == "flash_attention_2" and not gpu:
        raise UserError(
            "model.attn_implementation: 'flash_attention_2' needs GPU workers "
            "(cluster.gpus_per_worker > 0); use 'auto', 'sdpa' or 'eager'"
        )
    return requested


def resolved_attention(cfg: Config) -> str:
    """A concrete implementation for `from_pretrained` (the driver resolved `auto` already
    for runs launched by the CLI; this covers configs built in-process)."""
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    return pick_attention(cfg, type(meta_model(cfg)))


# ------------------------------------------------------------------ workers


def build_model(cfg: Config, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Load the causal LM (a reward model: `auto_class`); wrap it with LoRA adapters when
    `lora.enabled`.

    Under ZeRO-3 the weights are loaded straight into partitions (DeepSpeed's zero.Init,
    via transformers' HfDeepSpeedConfig), so no rank ever holds the whole model. A 4-bit
    base (`lora.quantize_base`, `distft.quant`) is loaded whole on each rank (transformers
    skips zero.Init for quantised models) and partitioned by `deepspeed.initialize`.
    """
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    # HfDeepSpeedConfig must stay alive while from_pretrained runs; transformers holds a
    # weak reference to it.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    model: Any = auto_class(cfg).from_pretrained(
        cfg.model.name_or_path,
        **task_kwargs(cfg),
        **placement(cfg, zero3),
        dtype=load_dtype(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=resolved_attention(cfg),
        revision=cfg.model.revision,
        quantization_config=quant.bnb_config(cfg, load_dtype(cfg)),
    )
    if vocab.customised(cfg):  # while transformers sees ZeRO-3: the resize gathers
        vocab.resize(model, cfg, load_tokenizer(cfg))
    if not cfg.lora.use_dora:
        # DoRA keeps it until peft has wrapped the model: peft computes each magnitude from
        # the whole base weight, gathered only while transformers sees ZeRO-3
        hf_ds = None
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = with_lora(model, cfg)
    del hf_ds
    if cfg.lora.quantize_base is not None:
        quant.skip_quant_state_on_load(model)  # resume: the base's quant state is rebuilt
        quant.keep_packed_layout(model)
    if cfg.model.neftune_alpha is not None:  # after peft: it may replace the embeddings
        neftune.attach(model, cfg.model.neftune_alpha)
    return model


def placement(cfg: Config, zero3: bool) -> dict[str, Any]:
    """Where `from_pretrained` puts the weights. On GPU workers under ZeRO 0-2 (and no
    4-bit base, which transformers places itself), straight into this rank's GPU, tensor
    by tensor from the memory-mapped files: no rank builds a host copy of the model.
    Under ZeRO-3, zero.Init partitions them as they load. On CPU workers transformers
    leaves weights whose dtype matches the files as views of the memory-mapped files, so
    the ranks of a node share one copy in the page cache (`tests/test_model_loading.py`)."""
    if zero3 or not cfg.cluster.use_gpu or cfg.lora.quantize_base is not None:
        return {}
    return {"device_map": {"": torch.cuda.current_device()}}


def task_kwargs(cfg: Config) -> dict[str, Any]:
    """`from_pretrained` arguments of the run's model class beyond the base's config: a
    reward model has one output and pads with the tokenizer's pad token (transformers
    scores a sequence at its last token that is not the pad token)."""
    if cfg.objective.method != "reward":
        return {}
    return {"num_labels": 1, "pad_token_id": load_tokenizer(cfg).pad_token_id}


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned params at their full size and a
    4-bit base's packed weights (bitsandbytes' Params4bit) at their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        n = state.shape.numel() if state is not None else getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
