"""The LM head on target rows only, and the chunked head + cross-entropy.

Position i predicts token i+1. Only positions with a target go through the output layer:
a forward pre-hook on the model's output embeddings (`get_output_embeddings()`, the LM
head of every Hugging Face causal LM) keeps the hidden states of those positions
(`rows_of`), so the head's matmul, the logits and the softmax are computed for the trained
tokens alone. In SFT, prompts are often half the tokens; at a 128k vocabulary the logits of
one 8k-token sequence are 4 GiB in fp32. Gradients are the same: the dropped positions
contribute nothing to the loss. Every objective (`distft.objectives`) computes through it.

With `chunk` (the config's `model.loss_chunk_size`) the head's matmul and the
cross-entropy run inside the head module's own forward call, `chunk` target rows at a time
(`distft.objectives.chunked_ce`), so the (targets x vocab) logits never exist. Computing
inside the head's call is what keeps ZeRO-3 right: DeepSpeed gathers the head's partitioned
weight in its forward pre-hook and releases it in its forward hook; the chunked forward
computes the head's gradients while the weight is there (its backward needs no weight).
Whether a model can take this path is decided once per head (`head_plan`): the head must
be a plain `nn.Linear` (a frozen one under LoRA too; peft wrappers of the head keep the old
path), and a no-grad probe forward (of the first batch) must show that what the model
returns as logits is exactly what the head returned once the epilogues we reproduce
(softcapping, logit scales) are switched off in the model; any other post-processing keeps
the old path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from distft.data import Batch
from distft.data.batch import Targets
from distft.objectives.chunked_ce import Epilogue


def output_head(model: Any) -> torch.nn.Module | None:
    """The LM head of a causal LM, a PEFT model or a DeepSpeed engine around either."""
    inner = getattr(model, "module", model)  # DeepSpeedEngine.module
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


@contextmanager
def rows_of(head: torch.nn.Module | None, targets: Targets) -> Iterator[bool]:
    """While active, `head` sees only the hidden states of the target positions, flattened
    to (targets, hidden) in `targets.index` order. Yields whether the head was found.
    (`index_select` on an index built on the host: no wait for the device to count a
    mask.)"""
    if head is None:
        yield False
        return

    def select(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != targets.shape:  # not the LM's
            return args
        return (hidden.flatten(0, 1).index_select(0, targets.index), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        handle.remove()


@dataclass(frozen=True)
class HeadPlan:
    """How the chunked loss replaces a model's head: the `nn.Linear` whose forward computes
    the loss, the epilogue it reproduces, and the model settings that switch the model's
    own epilogue off meanwhile ((object, attribute, neutral value))."""

    linear: torch.nn.Linear
    epilogue: Epilogue
    neutral: tuple[tuple[Any, str, Any], ...]


_PLAN_ATTR = "_distft_head_plan"  # the decision, kept on the head (HeadPlan or None)
_PROBE = 1.5  # the value the probe's head returns; any epilogue left on changes it


def _causal_lm(model: Any) -> Any:
    inner = getattr(model, "module", model)  # DeepSpeedEngine.module
    get_base = getattr(inner, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else inner


def _epilogue(model: Any) -> tuple[Epilogue, tuple[tuple[Any, str, Any], ...]]:
    """The epilogue the model applies to the head's output (as far as distft reproduces
    one), and the settings that switch the model's own off."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)  # Granite
    multiply = getattr(lm, "logit_scale", None)  # Cohere (a plain float attribute)
    neutral: list[tuple[Any, str, Any]] = []
    ep = Epilogue()
    if isinstance(cap, (int, float)):
        neutral.append((config, "final_logit_softcapping", None))
        ep = replace(ep, softcap=float(cap))
    if isinstance(divide, (int, float)) and divide != 1:
        neutral.append((config, "logits_scaling", 1.0))
        ep = replace(ep, divide=float(divide))
    if isinstance(multiply, (int, float)) and multiply != 1:
        neutral.append((lm, "logit_scale", 1.0))
        ep = replace(ep, multiply=float(multiply))
    return ep, tuple(neutral)


@contextmanager
def head_computes(plan: HeadPlan, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the head's forward is `fn` (hooks, DeepSpeed's included, still run)
    and the model's own epilogue is off."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in plan.neutral]
    plan.linear.forward = fn  # type: ignore[method-assign,assignment]  # the instance's
    try:
        for obj, attr, value in plan.neutral:
            setattr(obj, attr, value)
        yield
    finally:
        del plan.linear.forward
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def head_plan(model: Any, head: torch.nn.Module, batch: Batch) -> HeadPlan | None:
    """The chunked-loss plan of `model`'s head, or None when it keeps the old path.
    Decided once per head; the first call runs a no-grad probe forward of `batch`."""
    if _PLAN_ATTR in head.__dict__:
        decided: HeadPlan | None = head.__dict__[_PLAN_ATTR]
        return decided
    plan = None
    if type(head) is torch.nn.Linear and "forward" not in head.__dict__:
        plan = HeadPlan(head, *_epilogue(model))
        # the batch itself, not a slice of it: every attention kernel sees the shapes it is
        # built for (Ulysses' fixed sequence shards, a packed row's 4-D mask). One no-grad
        # forward, once per process.
        inputs = batch.model_inputs()
        sentinel = torch.full((), _PROBE, device=batch.input_ids.device)
        devices = [batch.input_ids.device] if batch.input_ids.is_cuda else []
        probe = head_computes(plan, lambda _hidden: sentinel)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), probe:
            logits = model(**inputs).logits
        if not (logits.dim() == 0 and logits.item() == _PROBE):  # exact: nothing computed
            plan = None
    head.__dict__[_PLAN_ATTR] = plan  # not a module attribute: no state dict entry
    return plan
