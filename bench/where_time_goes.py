"""Where a training step's time goes: py-spy samples of rank 0, distft beside the
hand-written DeepSpeed loop, on the P1 workload (tiny Llama, 2 workers, ZeRO-2 fp32).

    python -m bench.where_time_goes [--steps 400] [--seconds 15] [--torchrun] [--out DIR]

Each contender runs long enough for py-spy (`--idle`, so waits in collectives count too)
to sample `--seconds` of steady-state steps; the table gives each direct callee of the
loop's function (distft's `train`, the baseline's `main`) as a share of the loop's samples.
`--torchrun` runs distft's worker under torchrun (`bench.worker_torchrun`, no Ray), as the
baseline runs. Each contender's CPU seconds per step (all processes under its launcher,
every thread) are printed beside it: on a machine whose cores the ranks fill, CPU time is
what a contender takes from the others, and it is less noisy than a step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench import harness as h
from bench.samples import fixed_samples, write_jsonl
from bench.suites import GLOBAL_BATCH, Setup, distft_config

PY_SPY = str(Path(h.PYTHON).with_name("py-spy"))
_SITE = re.compile(r"\(/\S*?site-packages/")


def breakdown(raw: Path, anchor: str) -> dict[str, float]:
    """Share of the samples under the frame matching `anchor`, by its direct callee."""
    by_callee: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if anchor in f), None)
        if at is not None:
            below = [f for f in frames[at + 1 :] if "instrument_w_nvtx" not in f]  # decorator
            callee = below[0] if below else "(self)"
            by_callee[_SITE.sub("(", re.sub(r":\d+\)", ")", callee))] += int(count)
    total = sum(by_callee.values()) or 1
    return {k: v / total for k, v in by_callee.most_common()}


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def record(
    proc: subprocess.Popen, find_pid, log: Path, seconds: int, out: Path, step_times
) -> tuple[Path, float]:
    """Wait for the contender's 20th step, then sample its rank 0 for `seconds`. Also
    returns the CPU seconds per step of every process under `proc` over that window
    (`step_times()`: when each step ended, read once the contender has finished)."""
    deadline = time.time() + 600
    pid = None
    while pid is None:
        if proc.poll() is not None or time.time() > deadline:
            raise h.BenchError(f"contender ended before it could be profiled; see {log}")
        time.sleep(1)  # polling a log file for a line; nothing to wait on directly
        pid = find_pid(log.read_text())
    raw = out.with_suffix(".raw")
    cmd = [PY_SPY, "record", "-p", str(pid), "-d", str(seconds), "-r", "200", "--idle",
           "-f", "raw", "-o", str(raw)]  # fmt: skip
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    cpu0, t0 = _cpu_s(tree), time.time()
    subprocess.run(cmd, check=True, capture_output=True)
    cpu1, t1 = _cpu_s(tree), time.time()
    proc.wait()
    steps = sum(t0 <= t <= t1 for t in step_times())
    return raw, (cpu1 - cpu0) / max(steps, 1)


def _rank0_pid(launcher: int) -> int | None:
    """The torchrun child whose RANK is 0."""
    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == "0":
                return child.pid
        except psutil.Error:
            continue
    return None


def _torchrun() -> list[str]:
    return [h.PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={h.free_port()}"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.where_time_goes", description=__doc__.splitlines()[0]
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--out", type=Path)
    p.add_argument("--torchrun", action="store_true", help="distft's worker without Ray")
    args = p.parse_args(argv)
    if not shutil.which(PY_SPY):
        raise SystemExit("py-spy is not installed: pip install py-spy (the dev extra has it)")
    from distft.assets import build_tiny_assets

    root = args.out or Path(tempfile.mkdtemp(prefix="distft-profile-"))
    s = Setup(root, build_tiny_assets(root / "tiny"), 1)
    data = write_jsonl(
        root / "fixed128.jsonl", fixed_samples(args.steps * GLOBAL_BATCH, 128, 512, 0)
    )
    work = root / "distft"
    out = work / "run"
    cfg = distft_config(
        out, s.assets.model_dir, data, batch={"max_steps": args.steps},
        data={"max_seq_len": 128, "batching": "padded", "shuffle": False},
    )  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / "train.log"
    config = str(work / "bench-config.yaml")
    distft_cmd = (
        [*_torchrun(), "-m", "bench.worker_torchrun", config]
        if args.torchrun
        else [h.DISTFT, "train", config]
    )
    with log.open("w") as f:
        proc = subprocess.Popen(distft_cmd, cwd=h.REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=h.child_env({"OMP_NUM_THREADS": "1"}))  # fmt: skip

    def distft_pid(text: str) -> int | None:
        if args.torchrun:
            return _rank0_pid(proc.pid) if re.search(r"step +20/", text) else None
        m = re.search(r"RayTrainWorker pid=(\d+)\)\S* \[distft\] step +20/", text)
        return int(m.group(1)) if m else None

    raw, cpu = record(proc, distft_pid, log, args.seconds, work,
                      lambda: h.metric_rows(out, "time"))  # fmt: skip
    shares = {"distft": breakdown(raw, "train (")}
    cpu_per_step = {"distft": cpu}
    hand_log = root / "hand.log"
    cmd = [*_torchrun(), "-m", "bench.ds_loop",
           "--model", str(s.assets.model_dir), "--data", str(data),
           "--out", str(root / "hand.json"), "--steps", str(args.steps), "--print-pid"]  # fmt: skip
    with hand_log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=h.REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=h.child_env({"OMP_NUM_THREADS": "1"}))  # fmt: skip

    def hand_pid(text: str) -> int | None:
        m = re.search(r"RANK0_PID (\d+) step 20\b", text)
        return int(m.group(1)) if m else None

    def hand_times() -> list[float]:
        return json.loads((root / "hand.json").read_text())["step_times"]

    raw, cpu_per_step["hand"] = record(proc, hand_pid, hand_log, args.seconds, root / "hand",
                                       hand_times)  # fmt: skip
    shares["hand"] = breakdown(raw, "main (bench/ds_loop.py")
    for name, by_callee in shares.items():
        print(
            f"\n{name}: {1000 * cpu_per_step[name]:.1f} CPU-ms per step (all processes); "
            "share of rank 0's loop samples by direct callee"
        )
        for callee, share in list(by_callee.items())[:12]:
            print(f"  {100 * share:5.1f}%  {callee}")


if __name__ == "__main__":
    main()
