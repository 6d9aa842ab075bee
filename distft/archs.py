"""Tiny random-init models of the architecture families distft is tested with, built from
transformers' own config classes (no downloads), each saved with the tiny tokenizer of
`distft.assets` so that the tiny datasets train on every family.

`build_family(name, tokenizer_dir, out)` writes a Hugging Face folder (model + tokenizer);
`distft make-tiny DIR --arch NAME` does the same from the command line. Every model has
hidden size 64 and 2 layers; the vocabulary is the tokenizer's (518 tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

_COMMON: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
_GQA: dict[str, Any] = {**_COMMON, "num_key_value_heads": 2, "intermediate_size": 128}


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_GQA)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_GQA)  # biases on q/k/v


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_GQA, head_dim=16)  # q/k RMSNorm


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_GQA, sliding_window=64)


def _gemma2() -> Any:
    from transformers import Gemma2Config

    # Logit soft-capping makes transformers refuse SDPA for Gemma-2 (eager or flash only).
    return Gemma2Config(**_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)


def _phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(**_GQA)  # fused qkv_proj and gate_up_proj


def _gpt2() -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024)  # Conv1D, tied


def _gpt_neox() -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**_COMMON, intermediate_size=128)  # fused query_key_value


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2)


def _qwen2_moe() -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_GQA,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
    )


FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
}


def family_config(name: str, tokenizer: Any) -> Any:
    """The family's tiny transformers config, sized to `tokenizer` and using its ids."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    config = FAMILIES[name]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = 1024
    return config


def build_family(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random-init model of family `name` with the tokenizer of `tokenizer_dir`, saved
    (fp32 safetensors + tokenizer) into `out`. Deterministic in `seed`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = family_config(name, tokenizer)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
