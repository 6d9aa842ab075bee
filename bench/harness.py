"""Running the contenders and reading what they measured.

Every contender runs as a separate process tree started here and waited for (never
killed by name): `distft train` with its embedded Ray, or a torchrun group bound to
127.0.0.1. Throughput is always taken from wall-clock times stamped at the end of
each optimizer step by the contender itself (distft: `metrics.jsonl`; baselines: their
`result.json`), over the steps after a warm-up, so start-up never enters a rate.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DISTFT = str(Path(sys.executable).with_name("distft"))
WARMUP_STEPS = 10  # steps left out of every rate


class BenchError(RuntimeError):
    pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the venv's bin first on PATH, as Ray gives its workers: every
    contender then finds the same `ninja`. DeepSpeed JIT-builds its CPU shm-comm op with
    whichever is on PATH, and the venv's ninja (1.13) and Debian's (1.11) hash build
    commands differently, so alternating them rebuilds the op (a minute of CPU) each time."""
    path = f"{Path(PYTHON).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **(extra or {})}


def _run(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    timeout: int = 1800,
    cwd: Path = REPO,
) -> float:
    """Run to completion with output in `log`; the wall time. Raises with the log's tail."""
    t0 = time.time()
    print(
        f"[bench] {time.strftime('%H:%M:%S')} {Path(cmd[0]).name} ... -> {log}",
        file=sys.stderr,
        flush=True,
    )
    with log.open("w") as f:
        proc = subprocess.run(
            cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False,
            env=child_env(env),
        )  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise BenchError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); {log}:\n{tail}")
    return time.time() - t0


@dataclass
class DistftRun:
    """One `distft train`: when it was launched, its metrics rows and start-up lines."""

    out: Path
    launched: float
    wall_s: float
    rows: list[dict[str, Any]]
    log: Path
    phases: dict[str, float] = field(default_factory=dict)  # worker start-up, from "ready"

    def checkpoint_saves(self) -> dict[int, float]:
        """step -> seconds, from the coordinator's "checkpoint ... committed" lines."""
        found = _COMMITTED.findall(self.log.read_text())
        return {int(step): float(secs) for step, secs in found}

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if "train/loss" in r]

    def step_times(self) -> list[float]:
        return [r["time"] for r in self.train_rows]

    def step_tokens(self) -> list[float]:
        return [r["train/tokens_per_s"] * r["train/step_time_s"] for r in self.train_rows]

    def first_step_at(self, step: int = 1) -> float:
        """Seconds from launch until `step` was logged (the first step of this run)."""
        return next(r["time"] for r in self.train_rows if r["step"] == step) - self.launched


_READY = re.compile(r"(?:\[distft\] )?ready in [\d.]+s \((.*?)\);")
_COMMITTED = re.compile(r"(?:\[distft\] )?checkpoint step_(\d+) committed: [\d.]+ MB in ([\d.]+)s")


def write_config(cfg: dict[str, Any], workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "bench-config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def metric_rows(output_dir: Path, key: str) -> list[Any]:
    """`key` of every training row of a run's metrics.jsonl."""
    rows = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines() if x]
    return [r[key] for r in rows if "train/loss" in r]


def run_distft(cfg: dict[str, Any], workdir: Path, overrides: list[str] | None = None) -> DistftRun:
    """`distft train` on `cfg`; its config and log go to `workdir`, which must not be the
    run's checkpoint.output_dir (distft refuses an output dir holding foreign files)."""
    assert Path(cfg["checkpoint"]["output_dir"]) != workdir, "output_dir must not be workdir"
    path = write_config(cfg, workdir)
    launched = time.time()
    log = workdir / f"distft-{int(launched)}.log"
    wall = _run([DISTFT, "train", str(path), *(overrides or [])], log)
    out = Path(cfg["checkpoint"]["output_dir"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    phases: dict[str, float] = {}
    m = _READY.search(log.read_text())
    if m:
        for part in m.group(1).split(", "):
            name, _, secs = part.rpartition(" ")
            phases[name] = float(secs.rstrip("s"))
    return DistftRun(out, launched, wall, rows, log, phases)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_torchrun(
    module: str, args: list[str], nproc: int, log: Path, checkout: Path = REPO
) -> float:
    """`python -m torch.distributed.run` of `python -m <module>`, on loopback only; the
    module and distft come from `checkout` (this one, or another for an A/B)."""
    cmd = [
        PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module, *args,
    ]  # fmt: skip
    # One thread per worker, as Ray gives a worker with cpus_per_worker=1.
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(checkout)}
    return _run(cmd, log, env=env, cwd=checkout)


# ----------------------------------------------------------------------- measurements


def rate(times: list[float], amounts: list[float] | None = None, skip: int = WARMUP_STEPS) -> float:
    """Amount per second over steps skip+1..n, timed from the end of step `skip` (>= 1) to
    the end of step n; `times[i]` is when step i+1 ended. Default amount: one step."""
    if skip < 1 or len(times) <= skip + 1:
        raise BenchError(f"{len(times)} steps, skip {skip}: need skip >= 1 and more steps")
    done = sum(amounts[skip:]) if amounts is not None else len(times) - skip
    return done / (times[-1] - times[skip - 1])


def steps_per_s(times: list[float], skip: int = WARMUP_STEPS) -> float:
    """1 / the median step interval after the warm-up: fixed work per step, so the median
    ignores the stalls other processes on a shared machine cause now and then."""
    if skip < 1 or len(times) <= skip + 1:
        raise BenchError(f"{len(times)} steps, skip {skip}: need skip >= 1 and more steps")
    window = times[skip - 1 :]
    return 1.0 / statistics.median(b - a for a, b in zip(window, window[1:], strict=False))


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = "{:,.1f}") -> str:
    """'median (min–max, n=k)'."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def eval_loss(model_dir: Path, eval_file: Path) -> float:
    """Token-weighted next-token NLL on the target tokens, one sample at a time (no padding,
    fp32): the same number for every contender's saved model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from bench.samples import read_jsonl

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in read_jsonl(eval_file):
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            targets = torch.tensor(row["labels"][1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dd_seconds(target: Path, n_bytes: int) -> float:
    """`dd if=/dev/zero of=target bs=1M count=N conv=fsync`: the disk's plain write time."""
    count = max(1, round(n_bytes / (1 << 20)))
    t0 = time.time()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={count}", "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    elapsed = time.time() - t0
    target.unlink()
    return elapsed


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), "unknown CPU",
    )  # fmt: skip
    return f"{os.cpu_count()} cores ({cpu}), load average {os.getloadavg()[0]:.1f} at start"
