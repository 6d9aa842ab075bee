"""Model and tokenizer loading. Full fine-tuning vs LoRA is decided here, once.

`check_model` runs on the driver before Ray starts: from the model's config alone (a local
folder's `config.json` checked first, `model_files`; the architecture built on the meta
device, no weights read) it resolves `model.attn_implementation: auto` to what the model
supports, checks `data.max_seq_len` against the model's positions and that every LoRA
target exists. (A local folder's weight headers and tokenizer files are checked before
it, by the CLI: `model_files.check_local_files`.) Workers build the same
LoRA layout with `_with_lora`.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distft.config import Config, Precision
from distft.errors import UserError
from distft.model_files import check_model_config

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dtype(cfg: Config) -> torch.dtype:
    name = cfg.model.dtype
    if name == "auto":
        name = Precision(cfg.deepspeed.precision).value
    return _DTYPES[name]


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.model.tokenizer or cfg.model.name_or_path,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # A missing chat template is the data layer's concern (data.chat_template names a
    # built-in one; text and pre-tokenized formats need none).
    return tok


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
        model = on_meta(config, trust_remote_code=cfg.model.trust_remote_code)
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
    lines = [f"attention: {attn}" + (" (auto)" if cfg.model.attn_implementation == "auto" else "")]
    if cfg.lora.enabled:
        lines += lora_plan(model, cfg).notes
        with torch.device("meta"):  # the adapters too: no memory, no initialisation
            lines.append(_adapted(_with_lora(model, cfg)))
    model_section = cfg.model.model_copy(update={"attn_implementation": attn})
    return cfg.model_copy(update={"model": model_section}, deep=True), lines


def hf_config(cfg: Config, local_only: bool = False) -> Any:
    """The base model's transformers config (`local_only`: never download it)."""
    from transformers import AutoConfig

    m = cfg.model
    return AutoConfig.from_pretrained(
        m.name_or_path,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        local_files_only=local_only,
    )


def on_meta(config: Any, model_cls: Any = None, **kwargs: Any) -> Any:
    """The architecture of a transformers `config` on the meta device: names, shapes and
    class flags, no memory and no initialisation. `model_cls`: the class of a model already
    built (remote code included); default AutoModelForCausalLM."""
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
        return AutoModelForCausalLM.from_config(config, **kwargs)


def meta_model(cfg: Config, local_only: bool = False) -> Any:
    """The run's base architecture on the meta device, no weights read."""
    config = hf_config(cfg, local_only)
    return on_meta(config, trust_remote_code=cfg.model.trust_remote_code)


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


# ------------------------------------------------------------------ LoRA targets


def _adapted(peft_model: Any) -> str:
    """One line: the layers and fused parameters peft put adapters on (peft may add some
    itself, e.g. Mixtral's router under transformers 5)."""
    tuner = peft_model.base_model
    layers = sorted({n.rsplit(".", 1)[-1] for n in tuner.targeted_module_names})
    params = sorted(
        {".".join(n.rsplit(".", 2)[-2:]) for n in getattr(tuner, "targeted_parameter_names", [])}
    )
    line = f"LoRA adapts: {', '.join(layers) or 'no layer'}"
    return line + (f"; fused weights: {', '.join(params)}" if params else "")


@dataclass(frozen=True)
class LoraPlan:
    target_modules: list[str] | str  # peft's target_modules ("all-linear" or names)
    target_parameters: list[str]  # fused 3-D expert weights ("experts.gate_up_proj", ...)
    notes: list[str]  # warnings the driver prints


def _linear_names(model: Any) -> list[str]:
    """Leaf names of the layers LoRA can adapt (Linear, GPT-2's Conv1D), head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        n.rsplit(".", 1)[-1]
        for n, mod in model.named_modules()
        if _is_linear(mod) and mod is not head and ".lora_" not in n
    }
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _expert_parameters(model: Any) -> list[str]:
    """`module.param` suffixes of fused expert weights: 3-D parameters (experts x out x in),
    as transformers 5 stores MoE experts. Partitioned ZeRO-3 parameters keep `ds_shape`."""
    found = set()
    for mod_name, mod in model.named_modules():
        if ".lora_" in mod_name or isinstance(mod, torch.nn.modules.conv._ConvNd):
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if len(getattr(p, "ds_shape", p.shape)) == 3:
                found.add(f"{mod_name.rsplit('.', 1)[-1]}.{p_name}")
    return sorted(found)


def lora_plan(model: Any, cfg: Config, strict: bool = True) -> LoraPlan:
    """What peft adapts, checked against the architecture. `all-linear`: every linear
    layer but the head, plus the routed experts' fused weights (peft `target_parameters`).
    A list: each name must match a linear layer by peft's rule (the module's name or its
    dotted suffix); names that match nothing are refused, not ignored (`strict`: on the
    driver; workers and exports of runs started before this check rebuild the layout as
    peft makes it)."""
    lora, cls = cfg.lora, type(model).__name__
    linear, experts = _linear_names(model), _expert_parameters(model)
    if lora.target_modules == "all-linear":
        if experts and lora.dropout > 0:
            raise UserError(
                f"lora.dropout: {cls} keeps its routed experts as fused weights "
                f"({', '.join(experts)}), which all-linear adapts and peft cannot apply "
                f"dropout to; set lora.dropout: 0, or list lora.target_modules to leave "
                f"the experts out (got {lora.dropout})"
            )
        return LoraPlan("all-linear", experts, [])
    modules = dict(model.named_modules())
    problems = []
    for target in lora.target_modules:
        hits = [m for n, m in modules.items() if n == target or n.endswith(f".{target}")]
        if not hits:
            problems.append(
                f"lora.target_modules: {target!r} matches no module of {cls}; "
                f"its linear layers: {', '.join(linear)} (or use 'all-linear')"
            )
        elif not all(_is_linear(m) or isinstance(m, torch.nn.Embedding) for m in hits):
            kind = type(next(m for m in hits if not _is_linear(m))).__name__
            problems.append(
                f"lora.target_modules: {target!r} names a {kind}, not a linear layer; "
                f"linear layers of {cls}: {', '.join(linear)}"
            )
    if problems and strict:
        raise UserError("\n".join(problems))
    notes = []
    if experts:
        notes.append(
            f"warning: the routed experts of {cls} ({', '.join(experts)}) are not adapted: "
            "they are fused weights, not layers; lora.target_modules: all-linear adapts them"
        )
    return LoraPlan(list(lora.target_modules), [], notes)


# ------------------------------------------------------------------ workers


def build_model(cfg: Config, ds_config: dict[str, Any]) -> torch.nn.Module:
    """Load the causal LM; wrap it with LoRA adapters when `lora.enabled`.

    Under ZeRO-3 the weights are loaded straight into partitions (DeepSpeed's zero.Init,
    via transformers' HfDeepSpeedConfig), so no rank ever holds the whole model.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    # HfDeepSpeedConfig must stay alive while from_pretrained runs; transformers holds a
    # weak reference to it.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero3 else None
    model: Any = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        dtype=load_dtype(cfg),
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=resolved_attention(cfg),
        revision=cfg.model.revision,
    )
    del hf_ds
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = _with_lora(model, cfg)
    return model


def _with_lora(model: Any, cfg: Config) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora, plan = cfg.lora, lora_plan(model, cfg, strict=False)
    peft_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: floats work
        lora_dropout=lora.dropout,
        target_modules=plan.target_modules,
        target_parameters=plan.target_parameters or None,
    )
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, peft_cfg)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned params at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
