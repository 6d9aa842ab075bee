"""Model FLOPs, MFU and memory metrics: the counts against hand computations for the tiny
Llama, and one real 2-worker run whose JSONL and W&B records carry `train/mfu`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from distft.flops import (
    FlopCounter,
    Throughput,
    flop_counter,
    model_shape,
    peak_memory_bytes,
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
    from transformers import LlamaConfig

    args = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**(args | kw))


def test_tiny_model_shape_and_full_finetune_flops_by_hand() -> None:
    assert N_TINY == 106_496
    assert model_shape(tiny_hf_config()) == (N_TINY, 2, 64)
    counter = flop_counter(tiny_hf_config())
    assert counter == FlopCounter(6.0 * N_TINY, float(ATTN_TINY), 6.0 * HEAD_TINY)
    assert counter.sequence(100) == 6 * N_TINY * 100 + ATTN_TINY * 100**2


def test_shape_matches_the_matmul_weights_of_the_real_model(tiny: Any) -> None:
    """N = every Linear weight of the built model (the input embedding is a lookup)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model_shape(model.config)[0] == linear == N_TINY


def test_lora_counts_4n_for_the_frozen_base_and_6_per_adapter_weight(tiny: Any) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distft.model import count_params

    base = AutoModelForCausalLM.from_pretrained(tiny.model_dir)
    model = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    lora = count_params(model)[0]
    # per layer: q 16*(64+64), k and v 16*(64+32) each; 2 layers
    assert lora == 2 * (16 * 128 + 2 * 16 * 96) == 10_240
    counter = flop_counter(model.config, lora)
    assert counter.dense_per_token == 4 * N_TINY + 6 * 10_240
    assert counter.attn_per_token_ctx == ATTN_TINY  # attention has no weights to freeze
    assert counter.head_per_token == 4 * HEAD_TINY  # the frozen head: no weight gradient


def test_mixture_of_experts_counts_the_experts_a_token_visits() -> None:
    from transformers import MixtralConfig

    cfg = MixtralConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, num_local_experts=8,
        num_experts_per_tok=2,
    )  # fmt: skip
    n, _, _ = model_shape(cfg)
    assert n == N_TINY + 2 * 3 * 64 * 128  # one more expert's MLP per layer


def test_config_without_the_needed_fields_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="intermediate_size"):
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
