"""Throughput accounting: model FLOPs per step, MFU and peak memory per worker.

Weights. N is counted from what the model holds, not from a formula per family: the model
class is built from its config on the meta device (no memory, no init) and every matmul
weight a token multiplies is summed:

- every weight of two or more dimensions (`nn.Linear`, GPT-2's `Conv1D`, fused q/k/v or
  gate/up projections, routers) except the input embeddings, which are lookups;
- routed experts (parameters under a module named `experts`, fused 3-D `[E, out, in]` or a
  list of E expert modules) scaled by top-k / E: a token visits `num_experts_per_tok` of
  them; shared experts, their gates and the router run for every token and count whole;
- the LM head, d*V, counted even when it is tied to the input embedding.

A matmul with n weights costs 2n FLOPs per token forward and 4n backward (2n for the
gradient of its input, 2n for the gradient of its weights): 6N per token (Kaplan et al.
2020). Attention adds, per layer, QK^T and AV: 4*H*Q*T per token forward at context T,
3x that with backward, i.e. 12*H*Q*s^2 per layer for a sequence of s tokens (PaLM,
Chowdhery et al. 2022, app. B), H query heads of size Q. Like PaLM, nanoGPT and torchtitan
we count the full score matrix, twice the causal half that is computed, so MFU compares
with published figures: s^2 = 2 x (the s(s+1)/2 pairs a causal mask allows) - s. A layer
with a sliding window of w tokens counts its pairs the same way, 2 x pairs - s, which is
s^2 - m(m+1) with m = max(s - w, 0): the window removes m(m+1)/2 pairs. So

    full fine-tuning:  6*N * tokens + sum over layers and sequences of 12*H*Q*s^2 (windowed)
    LoRA:              (4*N + 6*N_lora) * tokens + the same attention term

LoRA: the frozen base still runs forward (2N) and back-propagates through activations
(2N) but computes no weight gradients; the adapters' own N_lora weights cost 6*N_lora.

distft's loop runs the LM head (d*V of N) only at positions with a target
(distft.objectives.head), so its steps count the head per target token, not per token.
Only real tokens count (padding is wasted work, not model FLOPs); a packed row counts each
of its samples as its own sequence (attention is isolated). Activation recomputation
(gradient checkpointing) is not counted: MFU counts model FLOPs, not hardware FLOPs.
Biases, norms, rotary embeddings and softmax are left out (well under 0.1%). Not modelled:
chunked attention (Llama 4) counts as full, and attention with value heads of another size
than the query heads (MLA) counts the query head size for both matmuls.

MFU = model FLOPs per second per worker / the device's peak dense FLOP/s. The peak comes
from `logging.peak_tflops` when set, else from `PEAK_TFLOPS` for bf16/fp16 runs on a known
GPU; otherwise (CPU, fp32, unknown GPU) no MFU is reported.
"""

from __future__ import annotations

import copy
import re
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from distft.config import Config
    from distft.data.loader import StepTotals
    from distft.dist import DistContext

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data
# sheets. An entry matches when all its words are words of torch.cuda.get_device_name()
# ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S"); the entry with the
# most words wins, so "H100 PCIe" beats "H100", and "L4" never matches an L40 or L40S.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
GIB = float(1 << 30)


@dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs of a batch: `dense_per_token` per real token plus
    `attn_per_token_ctx` x s^2 for each sequence of s tokens, less `c` x m(m+1), m = s - w,
    for each `(w, c)` of `windows` when s > w (layers with a sliding window of w; see the
    module docstring)."""

    dense_per_token: float
    attn_per_token_ctx: float
    head_per_token: float = 0.0  # the LM head's part of dense_per_token
    windows: tuple[tuple[int, float], ...] = ()  # (window, its layers' part of attn)

    def training(
        self,
        tokens: float,
        squared_lengths: float,
        targets: float | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
    ) -> float:
        """FLOPs of a training pass over sequences holding `tokens` real tokens whose
        squared lengths sum to `squared_lengths`; with `targets`, the LM head runs only at
        that many positions (distft), else at every token (a plain forward). Windowed
        layers need the sequence `lengths`; without them they count as full attention."""
        head = self.head_per_token * (tokens if targets is None else targets)
        body = (self.dense_per_token - self.head_per_token) * tokens
        attn = self.attn_per_token_ctx * squared_lengths
        if self.windows and lengths is not None:
            s = np.asarray(lengths, dtype=np.float64)
            for w, coeff in self.windows:
                m = np.maximum(s - w, 0.0)
                attn -= coeff * float((m * (m + 1)).sum())
        return body + head + attn

    def sequence(self, s: int) -> float:
        """FLOPs of one training pass over one sequence of `s` tokens."""
        return self.training(s, s * s, lengths=[s])

    def batch(self, batch: Any, pad_id: int | None = None) -> float:
        """A batch's FLOPs; its real tokens are `batch.n_tokens` when it carries them."""
        lengths = sequence_lengths(batch, pad_id).double()
        tokens = getattr(batch, "n_tokens", 0) or float(lengths.sum())
        return self.training(tokens, float((lengths**2).sum()), lengths=lengths.numpy())


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs of a model depend on: matmul weights per token (`weights`, the head
    included), the head's `head` of them, and per layer the attention width H*Q and the
    sliding window (None: full attention)."""

    weights: float
    head: int
    attn_widths: tuple[int, ...]
    windows: tuple[int | None, ...]


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config holds it as `text_config`)."""
    return getattr(config, "text_config", None) or config


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window in tokens (None: full attention), as Hugging Face's masks
    apply them: `layer_types` where the config has them ("sliding_attention" layers get
    `sliding_window`), else `sliding_window` on every layer (Mistral, Phi-3). A query at
    position i sees the keys at positions i-w+1 .. i."""
    config = text_config(config)
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers") or 0
    window = getattr(config, "sliding_window", None) or None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * layers
    return [window if t == "sliding_attention" else None for t in types]


def meta_model(config: Any, model_cls: Any = None) -> Any:
    """The model of `config` on the meta device (`distft.model.on_meta`), with eager
    attention. The config is copied: building sets its attention fields."""
    from distft.model import on_meta

    config = copy.deepcopy(config)
    try:
        return on_meta(config, model_cls, attn_implementation="eager")
    except (ValueError, TypeError, RuntimeError, NotImplementedError, KeyError) as e:
        raise ValueError(
            f"cannot build {config.__class__.__name__}'s model to count it: {e}"
        ) from e


def count_weights(model: Any, config: Any) -> tuple[float, int]:
    """(matmul weights a token multiplies, LM head weights) of `model` (see the docstring)."""
    config = text_config(config)
    head_module = model.get_output_embeddings()
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    # a sequence classifier (a reward model) has no LM head: its d x labels head runs at
    # every position and is counted with the body
    head_weight = None if head_module is None else head_module.weight
    if head_weight is not None:
        skip.add(id(head_weight))
    top_k = _get(config, "num_experts_per_tok", "moe_top_k", "top_k")
    total = 0.0
    for name, p in model.named_parameters():
        if id(p) in skip or p.dim() < 2:
            continue
        parts = name.split(".")
        if "experts" not in parts[:-1]:
            total += p.numel()
            continue
        if top_k is None:
            raise ValueError("the model has experts but its config no num_experts_per_tok")
        at = parts.index("experts")
        if parts[at + 1].isdigit():  # a list of expert modules
            n_experts = len(list(model.get_submodule(".".join(parts[: at + 1])).children()))
            total += p.numel() * top_k / n_experts
        elif p.dim() == 3:  # fused [experts, out, in]; a fused 2-D tensor is a bias
            total += p.numel() * top_k / p.shape[0]
    head = 0 if head_weight is None else head_weight.numel()
    return total + head, head


def model_shape(config: Any, model_cls: Any = None) -> ModelShape:
    """The counted shape of the model `config` describes (built on the meta device)."""
    model = meta_model(config, model_cls)
    weights, head = count_weights(model, config)
    tc = text_config(config)
    d = _get(tc, "hidden_size", "n_embd", "d_model")
    heads = _get(tc, "num_attention_heads", "n_head")
    if d is None or heads is None:
        raise ValueError("model config has no hidden_size/num_attention_heads: cannot count")
    head_dim = _get(tc, "head_dim") or d // heads
    windows = layer_windows(config)
    return ModelShape(weights, head, (heads * head_dim,) * len(windows), tuple(windows))


def flop_counter(config: Any, lora_params: int | None = None, model_cls: Any = None) -> FlopCounter:
    """Full fine-tuning (`lora_params=None`) or LoRA with `lora_params` adapter weights."""
    shape = model_shape(config, model_cls)
    per_weight = 6.0 if lora_params is None else 4.0  # a frozen base: no weight gradient
    dense = per_weight * shape.weights + (0.0 if lora_params is None else 6.0 * lora_params)
    by_window: dict[int, float] = {}
    for width, w in zip(shape.attn_widths, shape.windows, strict=True):
        if w is not None:
            by_window[w] = by_window.get(w, 0.0) + 12.0 * width
    return FlopCounter(
        dense_per_token=dense,
        attn_per_token_ctx=12.0 * sum(shape.attn_widths),
        head_per_token=per_weight * shape.head,
        windows=tuple(sorted(by_window.items())),
    )


def sequence_lengths(batch: Any, pad_id: int | None = None) -> torch.Tensor:
    """Lengths of the sequences attention runs over, padding excluded.

    Packed rows (`position_ids` restarting at 0 per sample): one length per sample; a
    segment made only of `pad_id` tokens is padding. Otherwise one length per row: a 2-D
    padding mask's sum or, with no mask (right padding needs none under causal attention),
    up to the last token that is not a `pad_id` with an ignored label (the whole row when
    `pad_id` is None).
    """
    ids = batch.input_ids.cpu()
    positions = getattr(batch, "position_ids", None)
    mask = getattr(batch, "attention_mask", None)
    if positions is None and mask is not None and mask.dim() == 2:
        return mask.sum(1).long().cpu()
    if positions is None:
        if pad_id is None or getattr(batch, "n_tokens", None) == ids.numel():  # no padding
            return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
        labels = getattr(batch, "labels", None)
        pad = ids == pad_id
        if labels is not None:
            pad &= labels.cpu() == -100
        real = ~pad
        last = ids.shape[1] - real.flip(1).int().argmax(1)
        return torch.where(real.any(1), last, torch.zeros_like(last))
    starts = (positions == 0).reshape(-1).cpu()
    segment = torch.cumsum(starts.long(), 0) - 1
    lengths = torch.bincount(segment)
    if pad_id is not None:
        pads = torch.bincount(segment, weights=(ids.reshape(-1) == pad_id).double())
        lengths = lengths[pads.long() < lengths]
    return lengths


def peak_tflops(device: torch.device, precision: str, configured: float | None) -> float | None:
    """Peak dense TFLOP/s of one worker's device, or None when it is not known."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    return peak_of_name(torch.cuda.get_device_name(device))


def peak_of_name(name: str) -> float | None:
    """The `PEAK_TFLOPS` entry of a device name as torch reports it: the most specific one
    whose words are all in the name (None when none is)."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    best: tuple[int, float] | None = None
    for key, tflops in PEAK_TFLOPS:
        need = key.lower().split()
        if set(need) <= words and (best is None or len(need) > best[0]):
            best = (len(need), tflops)
    return None if best is None else best[1]


def peak_memory_bytes(device: torch.device) -> float:
    """Peak memory of this worker so far: allocated GPU memory, or the process's RSS."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)  # Linux: KiB


class Throughput:
    """Per-step FLOPs and the throughput metrics of the loop."""

    def __init__(
        self,
        counter: FlopCounter | None,
        peak: float | None,
        rank: int,
        world: int,
        device: torch.device,
    ):
        self.counter, self.peak = counter, peak
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def for_run(cls, cfg: Config, model: Any, dist: DistContext) -> Throughput:
        """From the run config and the built (possibly peft-wrapped) model; logs on rank 0
        what MFU is measured against."""
        from distft.model import count_params

        lora = count_params(model)[0] if cfg.lora.enabled else None
        inner = getattr(model, "module", model)  # a DeepSpeed engine's model
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
        try:
            counter: FlopCounter | None = flop_counter(inner.config, lora, type(base))
        except ValueError as e:
            counter = None
            dist.log(f"no FLOPs/MFU metrics: {e}")
        precision = cfg.deepspeed.precision.value
        peak = peak_tflops(dist.device, precision, cfg.logging.peak_tflops)
        if counter is not None:
            against = f"{peak:g} TFLOP/s peak" if peak else "no known peak: set logging.peak_tflops"
            dist.log(
                f"model FLOPs/token {counter.dense_per_token:.3g} + attention; MFU vs {against}"
            )
        return cls(counter, peak, dist.rank, dist.world_size, dist.device)

    def flops(self, totals: StepTotals) -> float:
        """Model FLOPs of one optimizer step over all ranks (0 when they cannot be counted):
        every sample is its own sequence, padding is not counted, the head runs per target."""
        if self.counter is None:
            return 0.0
        return self.counter.training(
            totals.tokens, totals.squared_lengths, totals.targets, totals.lengths
        )

    def memory_by_rank(self) -> list[float]:
        """This rank's peak memory (GiB) at its index, zeros elsewhere: summed over ranks
        (in the step's existing all-reduce) it gives every worker's peak."""
        out = [0.0] * self.world
        out[self.rank] = peak_memory_bytes(self.device) / GIB
        return out

    def metrics(
        self, dt: float, global_tokens: float, global_flops: float, peak_mem_gib: list[float]
    ) -> dict[str, float]:
        out = {
            "train/tokens_per_s_per_worker": global_tokens / dt / self.world,
            "train/peak_mem_gib": max(peak_mem_gib),
        }
        out.update({f"memory/peak_gib_rank{r}": v for r, v in enumerate(peak_mem_gib)})
        if self.counter is not None:
            per_worker = global_flops / dt / self.world
            out["train/tflops_per_s_per_worker"] = per_worker / 1e12
            if self.peak:
                out["train/mfu"] = per_worker / (self.peak * 1e12)
        return out
