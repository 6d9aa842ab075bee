"""LoRA (and its DoRA / rsLoRA variants, `lora.use_dora`, `lora.use_rslora`): which
layers peft adapts (checked against the architecture on the driver, and
rebuilt the same way on the workers and by exports), `lora.modules_to_save`, and the
added tokens' trained rows (`distft.vocab.trainable_tokens`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distft import vocab
from distft.config import Config
from distft.errors import UserError


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


def _unknown_saved(modules: dict[str, Any], saved: list[str], cls: str) -> list[str]:
    """`lora.modules_to_save` names that match no module (peft's rule: the name or its
    dotted suffix)."""
    tops = sorted({n.rsplit(".", 1)[-1] for n in modules if n and "layers." not in n})
    return [
        f"lora.modules_to_save: {name!r} matches no module of {cls}; "
        f"its modules outside the layers: {', '.join(tops)}"
        for name in saved
        if not any(n == name or n.endswith(f".{name}") for n in modules)
    ]


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
        if strict and (
            unknown := _unknown_saved(dict(model.named_modules()), lora.modules_to_save, cls)
        ):
            raise UserError("\n".join(unknown))
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
    problems += _unknown_saved(modules, lora.modules_to_save, cls)
    if problems and strict:
        raise UserError("\n".join(problems))
    notes = []
    if experts:
        notes.append(
            f"warning: the routed experts of {cls} ({', '.join(experts)}) are not adapted: "
            "they are fused weights, not layers; lora.target_modules: all-linear adapts them"
        )
    return LoraPlan(list(lora.target_modules), [], notes)


def with_lora(model: Any, cfg: Config) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora, plan = cfg.lora, lora_plan(model, cfg, strict=False)
    ids = vocab.token_ids(cfg, vocab.load_tokenizer(cfg)) if cfg.model.add_special_tokens else []
    tokens = vocab.trainable_tokens(model, cfg, ids)
    peft_cfg = LoraConfig(
        # a reward model: peft trains its `score` head whole (modules to save), no adapter
        task_type="SEQ_CLS" if cfg.objective.method == "reward" else "CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: floats work
        lora_dropout=lora.dropout,
        target_modules=plan.target_modules,
        target_parameters=plan.target_parameters or None,
        modules_to_save=list(lora.modules_to_save) or None,
        trainable_token_indices=tokens,  # type: ignore[arg-type]  # a dict is documented
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,  # scaling alpha / sqrt(r) instead of alpha / r
    )
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()
    # peft copies the trained rows out of the embeddings: whole ZeRO-3 weights meanwhile
    with vocab.gathered(model, bool(tokens)):
        return get_peft_model(model, peft_cfg)
