"""Model FLOPs, MFU and memory metrics: the count of each model family against
torch.utils.flop_counter on a real forward and backward, analytic checks of large real
configs, windowed attention against the masks transformers builds, the peak table, and one
real 2-worker run whose JSONL and W&B records carry `train/mfu`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers as hf

from distft.config import from_dict
from distft.dist import DistContext
from distft.flops import (
    FlopCounter,
    Throughput,
    flop_counter,
    layer_windows,
    model_shape,
    peak_memory_bytes,
    peak_of_name,
    peak_tflops,
    sequence_lengths,
)
from tests.support import read_metrics, run_cli, tiny_config, wandb_history, write_config

# The tiny Llama of distft.assets, by hand: vocab 512, hidden 64, 2 layers, 4 heads of 16,
# 2 kv heads, intermediate 128, untied LM head.
PER_LAYER = 64 * 64 + 2 * (64 * 2 * 16) + 64 * 64 + 3 * 64 * 128  # q, k+v, o, gate/up/down
N_TINY = 2 * PER_LAYER + 64 * 512  # + LM head = 106_496
ATTN_TINY = 12 * 2 * 4 * 16  # 12 * L * H * Q = 1536
HEAD_TINY = 64 * 512  # d * V


def tiny_hf_config(**kw: Any) -> Any:
    args = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    return hf.LlamaConfig(**(args | kw))


# One tiny random-init model per family, as its config class builds it (2 layers, hidden 32).
SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
FAMILIES: dict[str, Callable[[], Any]] = {
    "llama": lambda: hf.LlamaConfig(**SMALL),
    "qwen2": lambda: hf.Qwen2Config(**SMALL),  # q/k/v biases
    "qwen3": lambda: hf.Qwen3Config(**SMALL, head_dim=16),  # H*Q = 64 > hidden
    "mistral": lambda: hf.MistralConfig(**SMALL, sliding_window=64),
    "gemma2": lambda: hf.Gemma2Config(**SMALL, head_dim=16),  # tied head, softcapping
    "gemma3": lambda: hf.Gemma3TextConfig(**SMALL, head_dim=16),  # Gemma3ForCausalLM
    "phi3": lambda: hf.Phi3Config(**SMALL, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi2": lambda: hf.PhiConfig(**(SMALL | {"num_key_value_heads": 4})),  # fc1/fc2 MLP
    "gpt2": lambda: hf.GPT2Config(
        vocab_size=96,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=None,
        bos_token_id=0,
        eos_token_id=0,
    ),  # fmt: skip  # n_inner None: 4 * hidden; Conv1D weights
    "gpt_neox": lambda: hf.GPTNeoXConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    ),  # fmt: skip  # fused query_key_value, 2-matrix MLP
    "mixtral": lambda: hf.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: hf.Qwen2MoeConfig(**SMALL, **MOE, shared_expert_intermediate_size=40),
    "qwen3_moe": lambda: hf.Qwen3MoeConfig(**SMALL, **MOE),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_matches_torch_flop_counter_on_a_training_pass(family: str) -> None:
    """The reference is torch's FlopCounterMode over a real forward and backward of the
    model (eager attention, so QK^T and AV are matmuls it sees; a plain forward, so the
    head runs at every position, as `sequence` counts it). A routed expert's matmuls run
    on the tokens routed to it, so however the router splits them, every token pays for
    exactly top-k experts: the reference needs no routing assumption. Both sides count the
    same integer multiply-adds, so they must agree exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    config = FAMILIES[family]()
    extra = {"experts_implementation": "eager"} if "experts" in str(config.to_dict()) else {}
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(config, attn_implementation="eager", **extra)
    s = 24  # within every window here
    ids = torch.randint(3, 96, (1, s))
    with FlopCounterMode(display=False) as reference:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    assert reference.get_total_flops() > 1e6
    assert flop_counter(config).sequence(s) == reference.get_total_flops()


def test_big_real_configs_by_hand() -> None:
    """Pythia-1.4B (GPT-NeoX: 2-matrix MLP, the old gated count read 1.31x too high) and
    Qwen1.5-MoE-A2.7B (shared expert and its gate, the old count read 0.65x), built on the
    meta device in well under a second each."""
    d, layers = 2048, 24
    pythia = hf.GPTNeoXConfig(
        vocab_size=50304, hidden_size=d, num_hidden_layers=layers, num_attention_heads=16,
        intermediate_size=8192,
    )  # fmt: skip
    per_layer = 4 * d * d + 2 * d * 8192  # qkv + dense; h->4h, 4h->h
    assert model_shape(pythia).weights == layers * per_layer + d * 50304 == 1_310_982_144
    qwen_moe = hf.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=d, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
    )  # fmt: skip
    per_layer = (
        4 * d * d  # q, k, v, o (16 kv heads)
        + 4 * 3 * d * 1408  # the 4 routed experts a token visits (of 60)
        + 3 * d * 5632  # the shared expert, always active
        + d  # its sigmoid gate
        + 60 * d  # the router
    )
    shape = model_shape(qwen_moe)
    assert shape.weights == layers * per_layer + d * 151936 == 2_377_760_768
    assert shape.head == d * 151936 and shape.attn_widths == (d,) * layers


def test_tiny_model_shape_and_full_finetune_flops_by_hand() -> None:
    assert N_TINY == 106_496
    shape = model_shape(tiny_hf_config())
    assert (shape.weights, shape.head, shape.attn_widths) == (N_TINY, HEAD_TINY, (64, 64))
    counter = flop_counter(tiny_hf_config())
    assert counter == FlopCounter(6.0 * N_TINY, float(ATTN_TINY), 6.0 * HEAD_TINY)
    assert counter.sequence(100) == 6 * N_TINY * 100 + ATTN_TINY * 100**2


def test_shape_matches_the_matmul_weights_of_the_real_model(tiny: Any) -> None:
    """N = every Linear weight of the built model (the input embedding is a lookup)."""
    model = hf.AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model_shape(model.config).weights == linear == N_TINY


def test_lora_counts_4n_for_the_frozen_base_and_6_per_adapter_weight(tiny: Any) -> None:
    """Through `Throughput.for_run`, as the loop builds it: the peft-wrapped model is
    counted from its base class, without the adapters' own Linear layers."""
    from peft import LoraConfig, get_peft_model

    from distft.model import count_params

    base = hf.AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora = count_params(model)[0]
    # per layer: q 16*(64+64), k and v 16*(64+32) each; 2 layers
    assert lora == 2 * (16 * 128 + 2 * 16 * 96) == 10_240
    cfg = from_dict(
        {
            "model": {"name_or_path": str(tiny.model_dir)},
            "data": {"train_files": ["unused"]},
            "lora": {"enabled": True},
            "checkpoint": {"output_dir": "unused"},
        }
    )
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    counter = Throughput.for_run(cfg, model, ctx).counter
    assert counter is not None
    assert counter.dense_per_token == 4 * N_TINY + 6 * 10_240
    assert counter.attn_per_token_ctx == ATTN_TINY  # attention has no weights to freeze
    assert counter.head_per_token == 4 * HEAD_TINY  # the frozen head: no weight gradient


def test_layer_windows_as_transformers_applies_them() -> None:
    gemma2 = hf.Gemma2Config(**SMALL, sliding_window=16)
    assert gemma2.layer_types == ["sliding_attention", "full_attention"]
    assert layer_windows(gemma2) == [16, None]
    assert layer_windows(hf.MistralConfig(**SMALL, sliding_window=16)) == [16, 16]
    assert layer_windows(hf.Phi3Config(**SMALL, pad_token_id=0, sliding_window=8)) == [8, 8]
    assert layer_windows(hf.LlamaConfig(**SMALL)) == [None, None]
    assert layer_windows(hf.Qwen2Config(**SMALL)) == [None, None]  # use_sliding_window off
    assert layer_windows(hf.Qwen2MoeConfig(**SMALL)) == [None, None]
    assert layer_windows(hf.MistralConfig(**SMALL, sliding_window=None)) == [None, None]


@pytest.mark.parametrize("s", [10, 16, 17, 40, 100])
def test_windowed_attention_counts_the_pairs_the_real_masks_allow(s: int) -> None:
    """Per layer and sequence, attention counts 12*H*Q*(2*pairs - s), pairs being the
    (query, key) pairs the layer's mask allows: s^2 for a causal mask (the PaLM convention)
    and s^2 - (s - w)(s - w + 1) for a window of w < s. The masks are the ones transformers
    builds for Gemma-2's sliding and full layers."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = hf.Gemma2Config(**SMALL, head_dim=16, sliding_window=16)
    config._attn_implementation = "sdpa"
    args = dict(
        config=config,
        inputs_embeds=torch.zeros(1, s, 32),
        attention_mask=None,
        past_key_values=None,
        position_ids=torch.arange(s)[None],
        allow_is_causal_skip=False,
    )
    pairs = [
        int(create_sliding_window_causal_mask(**args).sum()),
        int(create_causal_mask(**args).sum()),
    ]
    assert pairs[1] == s * (s + 1) // 2
    counter = flop_counter(config)
    attention = counter.sequence(s) - counter.dense_per_token * s
    assert attention == sum(12 * 4 * 16 * (2 * p - s) for p in pairs)
    assert counter.windows == ((16, 12.0 * 4 * 16),)
    if s > 16:  # without the lengths, the windowed layer counts as full: an upper bound
        assert counter.training(s, s * s) > counter.sequence(s)


def test_config_that_cannot_be_built_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="cannot build SimpleNamespace"):
        model_shape(SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=10))  # fmt: skip


def _batch(ids: list[list[int]], mask: Any = None, positions: Any = None) -> Any:
    t = torch.tensor
    return SimpleNamespace(
        input_ids=t(ids),
        attention_mask=None if mask is None else t(mask),
        position_ids=None if positions is None else t(positions),
    )


def test_sequence_lengths_padded_unpadded_and_packed() -> None:
    from distft.data import collate

    padded = collate(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5, 0], "labels": [5, 0]}], 0
    )  # the trained 0 of row 2 (a pad id that is also EOS, say) is real: it has a label
    assert sequence_lengths(padded, pad_id=0).tolist() == [3, 2]
    assert sequence_lengths(padded).tolist() == [3, 3]  # pad id unknown: the whole row
    masked = _batch([[5, 6, 7], [5, 0, 0]], mask=[[1, 1, 1], [1, 0, 0]])
    assert sequence_lengths(masked).tolist() == [3, 1]  # a 2-D padding mask (HF batches)
    full = collate([{"input_ids": [5, 6], "labels": [5, 6]}] * 3, 0)
    assert sequence_lengths(full, pad_id=0).tolist() == [2, 2, 2]
    # two packed rows: [3 + 2 samples], [4 samples... of 1+1 and a pad tail of 3 (id 0)]
    packed = _batch(
        [[5, 6, 7, 8, 9], [5, 6, 0, 0, 0]],
        positions=[[0, 1, 2, 0, 1], [0, 0, 0, 1, 2]],
    )
    assert sequence_lengths(packed, pad_id=0).tolist() == [3, 2, 1, 1]
    assert sequence_lengths(packed).tolist() == [3, 2, 1, 1, 3]  # pad unknown: counted
    counter = FlopCounter(10.0, 1.0)
    assert counter.batch(packed, pad_id=0) == 10 * 7 + (9 + 4 + 1 + 1)


def test_step_flops_count_every_sample_as_its_own_sequence() -> None:
    from distft.data.loader import StepTotals

    perf = Throughput(FlopCounter(10.0, 1.0), None, rank=0, world=2, device=torch.device("cpu"))
    # the packed example above: samples of 3, 2, 1 and 1 tokens
    assert perf.flops(StepTotals(targets=3, tokens=7, squared_lengths=15)) == 10 * 7 + 15
    # the head (4 of the 10 per token) runs at the 3 target positions only
    perf.counter = FlopCounter(10.0, 1.0, head_per_token=4.0)
    assert perf.flops(StepTotals(targets=3, tokens=7, squared_lengths=15)) == 6 * 7 + 4 * 3 + 15
    assert Throughput(None, None, 0, 2, torch.device("cpu")).flops(StepTotals(1, 7, 15)) == 0
    # a window of 2 on half the attention: the 3-token sample loses m(m+1) = 2 there
    perf.counter = FlopCounter(10.0, 1.0, head_per_token=4.0, windows=((2, 0.5),))
    totals = StepTotals(targets=3, tokens=7, squared_lengths=15, lengths=(3, 2, 1, 1))
    assert perf.flops(totals) == 6 * 7 + 4 * 3 + 15 - 0.5 * 2


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A10G", None),  # not in the table: no guess from a longer name
        ("Tesla T4", None),
    ],
)
def test_peak_table_matches_the_most_specific_name(name: str, peak: float | None) -> None:
    assert peak_of_name(name) == peak


def test_peak_table_config_wins_and_cpu_or_fp32_has_none() -> None:
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "bf16", None) is None
    assert peak_tflops(cpu, "fp32", 1.5) == 1.5
    if torch.cuda.is_available():
        assert peak_tflops(torch.device("cuda", 0), "fp32", None) is None


def test_throughput_metrics_mfu_only_with_a_peak() -> None:
    counter = flop_counter(tiny_hf_config())
    mem = peak_memory_bytes(torch.device("cpu"))
    assert 10e6 < mem < 64e9  # this process's peak RSS
    with_peak = Throughput(counter, 2.0, rank=1, world=2, device=torch.device("cpu"))
    by_rank = with_peak.memory_by_rank()
    assert by_rank[0] == 0 and by_rank[1] == pytest.approx(mem / 2**30, rel=0.5)
    m = with_peak.metrics(dt=0.5, global_tokens=1000, global_flops=4e12, peak_mem_gib=[1.0, 3.0])
    assert m["train/tokens_per_s_per_worker"] == 1000
    assert m["train/tflops_per_s_per_worker"] == pytest.approx(4.0)
    assert m["train/mfu"] == pytest.approx(2.0)  # 4 TFLOP/s per worker against a 2 peak
    assert m["train/peak_mem_gib"] == 3.0 and m["memory/peak_gib_rank0"] == 1.0
    no_peak = Throughput(counter, None, rank=0, world=2, device=torch.device("cpu"))
    assert "train/mfu" not in no_peak.metrics(0.5, 1000, 4e12, [1.0, 1.0])


# ----------------------------------------------------------------------- one real run

SEQ = 40  # every training sample has exactly this many tokens


@pytest.mark.slow
def test_run_logs_mfu_equal_to_the_hand_computation(tiny: Any, tmp_path: Path) -> None:
    """2 workers, peak set in the config, samples of one length: each logged MFU equals
    tokens/s per worker x (6N + 12*L*H*Q*s) / peak, in JSONL and in the W&B records, with
    the LM head's 6*d*V counted at the s-1 predicted positions of each sample only."""
    import random

    rng = random.Random(0)
    data = tmp_path / "tokens.jsonl"
    with data.open("w") as f:
        for _ in range(64):
            f.write(json.dumps({"input_ids": [rng.randrange(10, 500) for _ in range(SEQ)]}) + "\n")
    out = tmp_path / "run"
    peak = 0.002  # TFLOP/s: a made-up peak, so MFU is some fraction on any CPU
    cfg = tiny_config(
        tiny,
        out,
        data={"train_files": [str(data)], "eval_files": [], "format": "tokenized"},
        batch={"micro_batch_size": 4, "grad_accum": 2, "max_steps": 4},
        logging={"every_n_steps": 1, "peak_tflops": peak, "wandb": {"mode": "offline"}},
        checkpoint={"output_dir": str(out), "save_final_model": False},
    )
    proc = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU vs 0.002 TFLOP/s peak" in proc.stdout

    per_sample = 6 * (N_TINY - HEAD_TINY) * SEQ + 6 * HEAD_TINY * (SEQ - 1) + ATTN_TINY * SEQ**2
    per_token = per_sample / SEQ
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        per_worker = r["train/tokens_per_s"] / 2
        assert r["train/tokens_per_s_per_worker"] == pytest.approx(per_worker, rel=1e-12)
        assert r["train/mfu"] == pytest.approx(per_worker * per_token / (peak * 1e12), rel=1e-9)
        assert 0.1 < r["train/peak_mem_gib"] < 16  # a torch + DeepSpeed process's RSS
        assert {"memory/peak_gib_rank0", "memory/peak_gib_rank1"} <= r.keys()
    logged = {step: row["train/mfu"] for step, row in wandb_history(out) if "train/mfu" in row}
    assert logged == pytest.approx({r["step"]: r["train/mfu"] for r in rows}, rel=1e-12)
