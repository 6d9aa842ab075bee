"""Activations held for backward, and the loss's logits buffers, per rank and micro-batch.

Bytes per token, counted from what a Hugging Face decoder layer saves for backward
(pre-norm RMSNorm layers, rotary attention, gated MLP; checked against the saved tensors
of real tiny models in tests/test_plan.py), e = bytes of the compute dtype:
- each RMSNorm: its fp32 input (4h), the rsqrt (4) and its 16-bit output (e h);
- attention: the q, k, v projections' outputs after rotary (e (a + 2 kv) d), the
  attention output before o_proj (e a d) and the residual stream (e h); sdpa and
  flash-attention keep a fp32 log-sum-exp per head, eager the fp32 softmax and its
  16-bit copy (a x s probabilities per token: quadratic in the sequence length);
- MLP: gate and up outputs and the activation (3 e i); MoE: the router logits and the
  routed tokens' copies (top_k x (2 e h + 3 e i_expert)) plus a shared expert's 3 e i.
With gradient checkpointing each layer keeps only its input (e h) and backward recomputes
one layer at a time, so the peak adds one layer's activations.
The loss keeps the target rows only (distft.objectives.head): their logits (e V), the fp32 copy
(4 V) and its log-softmax (4 V, held for backward). Chunked (`model.loss_chunk_size`,
distft.objectives.chunked_ce), the gradients are computed in the forward and held until backward:
the head weight's (e V h, when the head trains) and the hidden rows' (e h per row); a
chunk's logits (e V), their fp32 copy and softmax (2 x 4 V) exist one chunk at a time
(measured on an H200: 2.24 GiB for 4096 rows, V 128,256, h 4096, chunk 1024, bf16;
this count gives 2.24).
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.plan.shape import Dims

FP32 = 4
# Families whose count was checked against the saved tensors of tiny models
# (tests/test_plan.py; within 10%). Others, GPT-2 among them (its dropouts keep the
# attention probabilities: measured 70-90% over the count), are counted with the same
# formulas, and the plan says they are not calibrated.
CALIBRATED = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "mixtral",
        "qwen2_moe",
        "gemma2",
        "gemma3",
        "gemma3_text",
        "phi3",
        "gpt_neox",
    }
)


def calibration_note(model_type: str) -> str | None:
    if model_type in CALIBRATED:
        return None
    return (
        f"activations: {model_type or 'this model'} is counted as a Llama-style decoder, "
        "not calibrated (calibrated: " + ", ".join(sorted(CALIBRATED)) + ")"
    )


@dataclass(frozen=True)
class Activations:
    layers: int  # held for backward by the decoder layers (and the checkpointed inputs)
    recompute: int  # one layer recomputed in backward (gradient checkpointing), else 0
    other: int  # embeddings output, final norm, rotary tables, ids and masks
    loss_held: int  # fp32 log-softmax of the target rows, held for backward
    loss_transient: int  # 16-bit logits and their fp32 copy while the loss is computed

    @property
    def held(self) -> int:
        """Saved for backward at the end of forward (what the tests measure)."""
        return self.layers + self.other + self.loss_held

    @property
    def peak(self) -> int:
        return self.held + self.recompute + self.loss_transient


def _norm(h: int, e: int) -> int:
    return FP32 * h + FP32 + 2 * e * h  # fp32 input, rsqrt, input and output in 16 bits


def materialised_mask(config: object, attention: str, packed: bool) -> bool:
    """Whether sdpa gets a (1, 1, s, s) mask: a sliding window or packed sequences
    (flash-attention takes neither as a matrix, eager's is counted with its softmax)."""
    if attention != "sdpa":
        return False
    window = getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True
    )
    return bool(window) or packed


def norms_per_layer(model_type: str) -> int:
    """Gemma-2/3 norm the attention and MLP outputs too (4 per layer)."""
    return 4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2


def layer_bytes_per_token(d: Dims, e: int, attention: str, seq: int, masked: bool) -> int:
    """Bytes one decoder layer saves for backward per token of a `seq`-token sequence."""
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    # LayerNorm keeps its output and a mean and rstd; RMSNorm its fp32 input, rsqrt, output
    norm = e * d.hidden + 2 * FP32 if d.layer_norm else _norm(d.hidden, e)
    total = norms_per_layer(d.model_type) * norm
    if d.model_type in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"):  # q/k norms
        total += (d.heads + d.kv_heads) * _norm(d.head_dim, e)
    total += e * (q + 2 * kv) + e * q  # q, k, v after rotary; the attention output
    if attention == "eager":
        # GQA: k and v repeated to every head; the fp32 softmax and its 16-bit copy
        total += e * 2 * (q - kv) + d.heads * seq * (FP32 + e)
        if d.attn_softcap:  # Gemma-2: the soft-capped scores (tanh's output), 16-bit
            total += d.heads * seq * e
    else:
        total += FP32 * d.heads  # log-sum-exp
        if masked:  # a materialised (1, 1, s, s) mask: sdpa gets k, v repeated to every head
            total += e * 2 * (q - kv) + e * seq
    if d.experts:
        # router logits; per routed copy: its input and output rows, three intermediate
        # rows and the indices that sort and scatter it back
        total += FP32 * d.experts + FP32
        total += d.top_k * (2 * e * d.hidden + 3 * e * d.expert_intermediate + 40)
        total += 4 * e * d.shared_intermediate
    elif d.gated_mlp:
        total += 4 * e * d.intermediate  # gate, up, act(gate), act(gate) * up
    else:
        total += 2 * e * d.intermediate  # up, act(up)
    return total


def activations(
    d: Dims,
    *,
    e: int,
    attention: str,
    seq: int,
    micro_batch: int,
    checkpointing: bool,
    target_fraction: float = 1.0,
    loss_chunk_size: int | None = None,
    sequence_parallel: int = 1,
    masked: bool = False,
    head_trains: bool = True,
) -> Activations:
    """Bytes per rank for one micro-batch of `micro_batch` sequences of `seq` tokens.
    `sequence_parallel` ranks share a sequence (each holds seq / sp tokens; attention
    sees the whole sequence for 1/sp of the heads, which this count treats as the same
    bytes). `target_fraction`: share of tokens with a target (1.0: pretraining, packing).
    `head_trains`: the LM head gets a gradient (not under LoRA)."""
    tokens = micro_batch * -(-seq // sequence_parallel)
    per_layer = layer_bytes_per_token(d, e, attention, seq, masked) * tokens
    if checkpointing:
        layers, recompute = d.layers * e * d.hidden * tokens, per_layer
    else:
        layers, recompute = d.layers * per_layer, 0
    # final norm + its output for the head, rotary cos/sin, ids, positions and mask
    other = (_norm(d.hidden, e) + 2 * e * d.head_dim + 8 + 8 + 1) * tokens
    rows = max(1, int(tokens * target_fraction))
    if loss_chunk_size is None:
        loss_held, loss_transient = FP32 * d.vocab * rows, (e + FP32) * d.vocab * rows
        if d.final_softcap:  # the capped logits' tanh, kept for backward (16-bit)
            loss_held += e * d.vocab * rows
    else:
        chunk = min(rows, loss_chunk_size)
        loss_held = e * d.hidden * (rows + (d.vocab if head_trains else 0))
        loss_transient = (e + 2 * FP32) * d.vocab * chunk
    return Activations(
        layers=layers,
        recompute=recompute,
        other=other,
        loss_held=loss_held,
        loss_transient=loss_transient,
    )
