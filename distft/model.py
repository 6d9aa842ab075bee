"""Model and tokenizer loading. Full fine-tuning vs LoRA is decided here, once."""

from __future__ import annotations

from typing import Any

import torch

from distft.config import Config, Precision

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
        attn_implementation=cfg.model.attn_implementation,
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

    lora = cfg.lora
    peft_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: floats work
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
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
