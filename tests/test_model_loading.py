"""Model loading holds no more host memory than needed (`distft.model.placement`).

Each case loads a ~58M-parameter Llama (233 MB of fp32 safetensors) through the workers'
`build_model` in a fresh process, reads every weight once, and reports the process's
private (anonymous) memory growth next to the weights' bytes:

- CPU, ZeRO-2, the files' dtype: transformers leaves the weights as views of the
  memory-mapped files, so they are page cache that every rank of a node shares (one host
  copy per node), not private memory of each rank;
- CPU, bf16 from fp32 files: each rank holds its cast copy (the bf16 bytes), no more;
- GPU (`gpu` marker), ZeRO-2: the weights go straight to the rank's GPU; no host copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SAVE = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                     num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=512)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
"""

_LOAD = r"""
import json, sys, torch
from distft.config import from_dict
from distft.model import build_model

model_dir, precision, gpu = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfg = from_dict({
    "model": {"name_or_path": model_dir, "attn_implementation": "sdpa",
              "tokenizer": sys.argv[4]},
    "data": {"train_files": ["unused.jsonl"]},
    "checkpoint": {"output_dir": "unused"},
    "deepspeed": {"zero_stage": 2, "precision": precision},
    "cluster": {"gpus_per_worker": 1 if gpu else 0},
})

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

import peft, transformers  # noqa: F401  # their own memory is not the model's
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401
before = anon()
model = build_model(cfg, {"zero_optimization": {"stage": 2}})
touched = sum(float(p.float().sum()) for p in model.parameters())  # every page read
params = list(model.parameters())
print("LOAD " + json.dumps({
    "growth": anon() - before,
    "bytes": sum(p.numel() * p.element_size() for p in params),
    "device": str(params[0].device), "dtype": str(params[0].dtype),
}))
"""


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("load") / "model"
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE, str(out)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def load(model_dir: Path, tokenizer: Path, precision: str, gpu: bool = False) -> dict:
    # glibc returns freed blocks of 128 KiB or more at once: RSS follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD, str(model_dir), precision, "1" if gpu else "0",
         str(tokenizer)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOAD ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    out: dict = json.loads(lines[0][5:])
    print("LOAD", precision, "gpu" if gpu else "cpu", out)
    return out


def test_cpu_ranks_share_the_files_pages(model_dir: Path, tiny) -> None:
    got = load(model_dir, tiny.model_dir, "fp32")
    assert got["dtype"] == "torch.float32" and got["bytes"] > 200e6
    assert got["growth"] < 0.10 * got["bytes"], got  # measured: a few MB of 233 MB


def test_a_cast_holds_one_copy_in_the_training_dtype(model_dir: Path, tiny) -> None:
    got = load(model_dir, tiny.model_dir, "bf16")
    assert got["dtype"] == "torch.bfloat16"
    assert got["growth"] < 1.2 * got["bytes"], got  # the bf16 copy; no fp32 copy kept


@pytest.mark.gpu
def test_gpu_ranks_load_straight_to_their_device(model_dir: Path, tiny) -> None:
    got = load(model_dir, tiny.model_dir, "bf16", gpu=True)
    assert got["device"].startswith("cuda"), got
    assert got["growth"] < 0.10 * 2 * got["bytes"], got  # of the fp32 files' bytes
