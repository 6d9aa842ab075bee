"""The model's shape for the planner: every parameter (size, dtype, trainable, the module
that owns it) from the architecture built on the meta device (no weights read; LoRA
adapters added by peft on meta too), and the dimensions that size the activations."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from distft.config import Config


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    ndim: int
    trainable: bool
    module: str  # the owning module's dotted name (ZeRO-3 gathers a module's params at once)


PLAIN_MLP = frozenset({"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode"})


@dataclass(frozen=True)
class Dims:
    """What sizes a decoder's activations, read from the transformers config."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int = 0  # routed experts (0: dense MLP)
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # an always-on shared expert (Qwen2-MoE)
    attn_softcap: bool = False  # Gemma-2: tanh soft-capping of the attention scores (eager)
    final_softcap: bool = False  # Gemma-2/3: tanh soft-capping of the logits
    layer_norm: bool = False  # LayerNorm (GPT-NeoX, GPT-2), not RMSNorm
    gated_mlp: bool = True  # gate * up (Llama and most); False: up, act, down (GPT-NeoX)


@dataclass(frozen=True)
class ModelShape:
    params: tuple[Param, ...]
    dims: Dims

    @property
    def total(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def largest_module(self) -> int:
        """Elements of the largest module's own parameters (what ZeRO-3 gathers at once)."""
        sizes: dict[str, int] = {}
        for p in self.params:
            sizes[p.module] = sizes.get(p.module, 0) + p.numel
        return max(sizes.values(), default=0)


def _first(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def dims_of(config: Any) -> Dims:
    """The decoder's dimensions from a transformers config (the text config of a
    multimodal one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    experts = _first(text, "num_local_experts", "num_experts", "n_routed_experts")
    return Dims(
        model_type=str(getattr(text, "model_type", "")),
        hidden=hidden,
        intermediate=_first(text, "intermediate_size", "n_inner", default=4 * hidden),
        layers=_first(text, "num_hidden_layers", "n_layer"),
        heads=heads,
        kv_heads=_first(text, "num_key_value_heads", default=heads),
        head_dim=_first(text, "head_dim", default=hidden // max(heads, 1)),
        vocab=_first(text, "vocab_size"),
        experts=experts,
        top_k=_first(text, "num_experts_per_tok", "moe_topk") if experts else 0,
        expert_intermediate=_first(text, "moe_intermediate_size", "intermediate_size")
        if experts
        else 0,
        shared_intermediate=_first(text, "shared_expert_intermediate_size"),
        attn_softcap=getattr(text, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(text, "final_logit_softcapping", None) is not None,
        layer_norm=not hasattr(text, "rms_norm_eps")
        and any(hasattr(text, k) for k in ("layer_norm_eps", "layer_norm_epsilon")),
        gated_mlp=str(getattr(text, "model_type", "")) not in PLAIN_MLP,
    )


def shape_of(model: torch.nn.Module, config: Any) -> ModelShape:
    """Parameters of a built (meta) model; a tied weight is counted once, like DeepSpeed."""
    owner = {
        id(p): name for name, module in model.named_modules() for p in module.parameters(False)
    }
    params = tuple(
        Param(name, p.numel(), p.dim(), p.requires_grad, owner.get(id(p), ""))
        for name, p in model.named_parameters()  # named_parameters skips tied duplicates
    )
    return ModelShape(params, dims_of(config))


def model_shape(cfg: Config) -> ModelShape:
    """The run's model (with its LoRA adapters) on the meta device, from its config.json
    alone; local folders and cached hub models only (the planner downloads nothing)."""
    from distft.model import auto_class, hf_config, on_meta

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = hf_config(cfg, local_only=True)
        model = on_meta(config, auto=auto_class(cfg), trust_remote_code=cfg.model.trust_remote_code)
        if cfg.lora.enabled:
            from distft.lora import with_lora

            with torch.device("meta"):
                model = with_lora(model, cfg)
    return shape_of(model, config)
