"""Throughput accounting: model FLOPs per step, MFU and peak memory per worker.

Model FLOPs of one training step (forward + backward), for a decoder-only transformer with
L layers, hidden size d, H query heads and K key/value heads of size Q, a gated MLP of
width I (3 matrices) and a vocabulary of V:

    N = L * (d*H*Q + 2*d*K*Q + H*Q*d + 3*d*I) + d*V     weights that take part in a matmul

The input embedding is a lookup (no FLOPs); the LM head is counted even when it is tied.
A matmul with n weights costs 2n FLOPs per token forward and 4n backward (2n for the
gradient of its input, 2n for the gradient of its weights): 6N per token (Kaplan et al.
2020). Attention adds, per layer, QK^T and AV: 4*H*Q*T per token forward at context T,
3x that with backward, i.e. 12*L*H*Q*T per token, or 12*L*H*Q*s^2 for a sequence of s
tokens (PaLM, Chowdhery et al. 2022, app. B). Like PaLM, nanoGPT and torchtitan we count
the full score matrix, not its causal half, so MFU compares with published figures. So

    full fine-tuning:  6*N * tokens + 12*L*H*Q * sum(s^2 over sequences)
    LoRA:              (4*N + 6*N_lora) * tokens + the same attention term

LoRA: the frozen base still runs forward (2N) and back-propagates through activations
(2N) but computes no weight gradients; the adapters' own N_lora weights cost 6*N_lora.

distft's loop runs the LM head (d*V of N) only at positions with a target
(distft.objective), so its steps count the head per target token, not per token.
Only real tokens count (padding is wasted work, not model FLOPs); a packed row counts each
of its samples as its own sequence (attention is isolated). Activation recomputation
(gradient checkpointing) is not counted: MFU counts model FLOPs, not hardware FLOPs.
Biases and norms are left out (well under 0.1%). A mixture-of-experts MLP counts the
`num_experts_per_tok` experts a token visits.

MFU = model FLOPs per second per worker / the device's peak dense FLOP/s. The peak comes
from `logging.peak_tflops` when set, else from `PEAK_TFLOPS` for bf16/fp16 runs on a known
GPU; otherwise (CPU, fp32, unknown GPU) no MFU is reported.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from distft.config import Config
    from distft.data.loader import StepTotals
    from distft.dist import DistContext

# Dense (no sparsity) bf16/fp16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data
# sheets. Matched in order against torch.cuda.get_device_name(): specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("B200", 2250.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
)
GIB = float(1 << 30)


@dataclass(frozen=True)
class FlopCounter:
    """Training FLOPs of a batch: `dense_per_token` per real token plus
    `attn_per_token_ctx` x s^2 for each sequence of s tokens (see the module docstring)."""

    dense_per_token: float
    attn_per_token_ctx: float
    head_per_token: float = 0.0  # the LM head's part of dense_per_token

    def training(
        self, tokens: float, squared_lengths: float, targets: float | None = None
    ) -> float:
        """FLOPs of a training pass over sequences holding `tokens` real tokens whose
        squared lengths sum to `squared_lengths`; with `targets`, the LM head runs only at
        that many positions (distft), else at every token (a plain forward)."""
        head = self.head_per_token * (tokens if targets is None else targets)
        body = (self.dense_per_token - self.head_per_token) * tokens
        return body + head + self.attn_per_token_ctx * squared_lengths

    def sequence(self, s: int) -> float:
        """FLOPs of one training pass over one sequence of `s` tokens."""
        return self.training(s, s * s)

    def batch(self, batch: Any, pad_id: int | None = None) -> float:
        """A batch's FLOPs; its real tokens are `batch.n_tokens` when it carries them."""
        lengths = sequence_lengths(batch, pad_id).double()
        tokens = getattr(batch, "n_tokens", 0) or float(lengths.sum())
        return self.training(tokens, float((lengths**2).sum()))


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_shape(config: Any) -> tuple[int, int, int]:
    """(N matmul weights, layers L, attention width H*Q) from a Hugging Face model config.

    Needs the Llama-family fields (Llama, Mistral, Qwen, Gemma, Phi-3 ... and their MoE
    variants); raises ValueError naming the missing one otherwise."""
    config = getattr(config, "text_config", None) or config
    d = _get(config, "hidden_size", "n_embd", "d_model")
    layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(config, "num_attention_heads", "n_head")
    vocab = _get(config, "vocab_size")
    mlp = _get(config, "moe_intermediate_size", "intermediate_size", "n_inner")
    missing = [
        name
        for name, v in (("hidden_size", d), ("num_hidden_layers", layers),
                        ("num_attention_heads", heads), ("vocab_size", vocab),
                        ("intermediate_size", mlp))
        if v is None
    ]  # fmt: skip
    if missing:
        raise ValueError(f"model config has no {', '.join(missing)}: cannot count FLOPs")
    kv = _get(config, "num_key_value_heads") or heads
    head_dim = _get(config, "head_dim") or d // heads
    experts = _get(config, "num_experts_per_tok") or 1
    attn_width = heads * head_dim
    per_layer = d * attn_width + 2 * d * kv * head_dim + attn_width * d + 3 * d * mlp * experts
    return layers * per_layer + d * vocab, layers, attn_width


def flop_counter(config: Any, lora_params: int | None = None) -> FlopCounter:
    """Full fine-tuning (`lora_params=None`) or LoRA with `lora_params` adapter weights."""
    n, layers, attn_width = model_shape(config)
    config = getattr(config, "text_config", None) or config
    head = float(_get(config, "hidden_size", "n_embd", "d_model") * _get(config, "vocab_size"))
    per_weight = 6.0 if lora_params is None else 4.0  # a frozen head: no weight gradient
    dense = 6.0 * n if lora_params is None else 4.0 * n + 6.0 * lora_params
    return FlopCounter(
        dense_per_token=dense,
        attn_per_token_ctx=12.0 * layers * attn_width,
        head_per_token=per_weight * head,
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
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


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
        try:
            counter: FlopCounter | None = flop_counter(model.config, lora)
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
        return self.counter.training(totals.tokens, totals.squared_lengths, totals.targets)

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
