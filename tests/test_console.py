"""The console of `distft train`: distft's own lines only, library output in the run's
log file (distft/console.py), the progress line and the end-of-run summary
(distft/console_lines.py)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distft.console import LOG_FILE, Display, RunConsole
from distft.console_lines import (
    duration,
    eval_changes,
    eval_loss_keys,
    load_snippet,
    progress_line,
    summary,
)
from tests.reference_runs import TrainedRun
from tests.support import DISTFT, REPO, tiny_config, write_config

NUM = r"[\d.]+"
# Every line distft train may print on a successful run, by shape. A line that matches
# none of them is somebody else's (Ray, DeepSpeed, transformers, torch) and belongs in
# the log file.
ALLOWED = [
    re.compile(p)
    for p in (
        r"attention: \w+ \(.+\)",
        rf"plan: {NUM} GiB per rank \(.+\), host {NUM} GiB per rank.*",
        r"batch\.micro_batch_size: auto -> \d+ .+",
        r"LoRA adapts: .+",
        r"workers up: \d+ workers? on \d+ nodes?; all see the output dir",
        r"(preprocessed|cached) \S+: [\d,]+ samples, [\d,]+ tokens.*",
        r"data: .+",
        r"deepspeed\.ds_config overrides generated keys: .+",
        rf"params: [\d,]+ trainable of [\d,]+ \({NUM}%\)",
        rf"ready in {NUM}s \(.+\); \d+ steps",
        r"model FLOPs/token \S+ \+ attention; MFU .+",
        rf"step +\d+/\d+ +\d+% loss {NUM}( eval( \S+)? loss {NUM})* lr \S+ [\d,]+ tok/s"
        rf"( MFU {NUM}%)? eta \w+",
        r"checkpoint step_\d+ committed: .+",
        r"final model written to \S+; verified: .+",
        r"done in \w+: \S+",
        rf"eval( \S+)? loss {NUM}( -> {NUM})?",
        r"(final model|LoRA adapter): \S+; load it with:",
        r"    (from |model = |tokenizer = ).+",
        r"report: \S+report\.html",
        r"log: \S+train\.log",
    )
]


def foreign(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if not any(p.fullmatch(ln) for p in ALLOWED)]


# ------------------------------------------------------------------ real runs' console


@pytest.mark.slow  # the `trained` runs
def test_reference_runs_print_only_distft_lines(trained: dict[str, TrainedRun]) -> None:
    """The three reference runs (ZeRO-2/3, full and LoRA) through the real CLI: every
    stdout and stderr line is one of distft's shapes; the noise is in the log file."""
    for run in trained.values():
        console = run.proc.stdout + run.proc.stderr
        assert foreign(console) == [], (run.name, console[-3000:])
        assert re.search(r"^step 8/8 100% loss ", run.proc.stdout, re.M), run.name
        log = (run.out / LOG_FILE).read_text()
        # hidden, not lost: Ray Train's, DeepSpeed's lines and distft's own, per worker
        assert re.search(r"^\(RayTrainWorker pid=\d+, ip=\S+\) Setting up process group", log, re.M)
        if not torch.cuda.is_available():  # DeepSpeed's logger (driver + workers), on CPU
            assert "Setting accelerator to CPU" in log
        assert re.search(r"^\(RayTrainWorker pid=\d+, ip=\S+\) \[distft\] step 8/8", log, re.M)
        # the summary names what was written, and the log file
        assert f"log: {run.out / LOG_FILE}" in run.proc.stdout
        kind = "LoRA adapter" if run.cfg.get("lora", {}).get("enabled") else "final model"
        assert f"{kind}: {run.out / 'final'}; load it with:" in run.proc.stdout


@pytest.mark.slow  # the `trained` runs
@pytest.mark.parametrize("name", ["zero2_full", "zero3_lora"])
def test_the_summary_snippet_loads_the_final_model(
    trained: dict[str, TrainedRun], name: str, tmp_path: Path
) -> None:
    """The three lines the summary prints, run as they are, load what was trained."""
    run = trained[name]
    lines = run.proc.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.endswith("; load it with:"))
    snippet = "\n".join(ln.strip() for ln in lines[at + 1 : at + 4])
    check = "\nprint(type(model).__name__, len(tokenizer('hello world')['input_ids']))"
    proc = subprocess.run(
        [sys.executable, "-c", snippet + check],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_class, n_tokens = proc.stdout.split()[-2:]
    lora = run.cfg.get("lora", {}).get("enabled")
    assert model_class == ("PeftModelForCausalLM" if lora else "LlamaForCausalLM")
    assert int(n_tokens) > 0


@pytest.mark.slow
def test_on_a_terminal_the_progress_line_is_redrawn(tiny: Any, tmp_path: Path) -> None:
    """`distft train` on a pseudo-terminal: progress redrawn in place (carriage return
    + erase line), every other line still one of distft's."""
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny, out, batch={"max_steps": 4}, data={"eval_files": []}, checkpoint={"keep_last": 1}
    )
    path = write_config(tmp_path / "c.yaml", cfg)
    text, code = _run_on_pty([DISTFT, "train", str(path)], timeout=600)
    assert code == 0, text[-3000:]
    redraws = re.findall(r"\r\x1b\[K(step +\d/4 [^\r\n]*)", text)
    assert [r.split()[1] for r in redraws][-1] == "4/4", text[-3000:]
    lines = re.sub(r"\r\x1b\[K", "\n", text).replace("\r\n", "\n")
    lines = re.sub(r"\x1b\[[0-9;]*m", "", lines)  # colour resets at exit: no text
    assert foreign("\n".join(ln for ln in lines.splitlines() if ln.strip())) == [], text[-3000:]
    assert (out / LOG_FILE).is_file()


def _run_on_pty(cmd: list[str], timeout: float) -> tuple[str, int]:
    main, child = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=child, stdout=child, stderr=child)
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 1.0)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # the child side closed: the process has ended
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    return b"".join(chunks).decode("utf-8", "replace"), code


# --------------------------------------------------------------------- routing (unit)


def _ray_batch(lines: list[str], is_err: bool = False, pid: int = 7) -> dict[str, Any]:
    """One batch of a worker's lines as Ray's log monitor publishes it to the driver."""
    return {"ip": "10.0.0.1", "pid": pid, "actor_name": "RayTrainWorker",
            "is_err": is_err, "lines": lines}  # fmt: skip


def test_worker_lines_go_to_the_log_and_distfts_to_the_console(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    con = RunConsole(Display(out, err, tty=False), verbose=False)
    con.open_log(tmp_path)
    con.on_worker_output(_ray_batch([
        "[2026-01-01 10:00:00,000] [WARNING] [real_accelerator.py:213:get_accelerator] x",
        "[distft] workers up: 2 workers on 1 node; all see the output dir",
        "[distft] step 1/8  12% loss 6.2454 lr 1.50e-03 14,009 tok/s eta 1s",
    ]))  # fmt: skip
    con.on_worker_output(_ray_batch(["Traceback (most recent call last):"], is_err=True))
    con.on_worker_output(_ray_batch(["[distft] error: hang at step 5"], is_err=True))
    assert out.getvalue().splitlines() == [
        "workers up: 2 workers on 1 node; all see the output dir",
        "step 1/8  12% loss 6.2454 lr 1.50e-03 14,009 tok/s eta 1s",
    ]
    assert err.getvalue() == "error: hang at step 5\n"
    log = (tmp_path / LOG_FILE).read_text().splitlines()
    assert log[0].startswith("==== distft train, ")
    assert log[1:] == [
        "(RayTrainWorker pid=7, ip=10.0.0.1) [2026-01-01 10:00:00,000] [WARNING] "
        "[real_accelerator.py:213:get_accelerator] x",
        "(RayTrainWorker pid=7, ip=10.0.0.1) [distft] workers up: 2 workers on 1 node; "
        "all see the output dir",
        "(RayTrainWorker pid=7, ip=10.0.0.1) [distft] step 1/8  12% loss 6.2454 lr 1.50e-03 "
        "14,009 tok/s eta 1s",
        "(RayTrainWorker pid=7, ip=10.0.0.1) Traceback (most recent call last):",
        "(RayTrainWorker pid=7, ip=10.0.0.1) [distft] error: hang at step 5",
    ]
    con.open_log(tmp_path)  # a resumed run appends
    assert (tmp_path / LOG_FILE).read_text().count("==== distft train, ") == 2
    con.close()


def test_verbose_leaves_the_console_to_ray_and_still_writes_the_log(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    con = RunConsole(Display(out, err, tty=False), verbose=True)
    con.open_log(tmp_path)
    con.on_worker_output(_ray_batch(["[distft] params: 1 trainable of 1 (100.00%)"]))
    assert out.getvalue() == err.getvalue() == ""  # Ray's own printer shows it
    assert "[distft] params: 1 trainable" in (tmp_path / LOG_FILE).read_text()
    con.close()


ROUTING = r"""
import io, logging, sys, warnings
from pathlib import Path
from distft import console
out, err = io.StringIO(), io.StringIO()
with console.session(False, out, err) as con:
    logging.getLogger("ray.early").warning("before the log file")
    import deepspeed  # its logger: own stdout handler, logs on import on CPU
    con.open_log(Path(sys.argv[1]))
    logging.getLogger("ray._private.worker").warning("ray warning")
    deepspeed.utils.logger.warning("deepspeed warning")
    warnings.warn("a FutureWarning", FutureWarning)
    logging.getLogger("ray.train").error("ray error line\nits traceback")
    logging.getLogger("ray.train").error("ray error line\nits traceback")
sys.__stdout__.write("OUT:" + out.getvalue() + "ERR:" + err.getvalue())
"""


def test_driver_library_logs_go_to_the_log_file_errors_once_to_the_console(
    tmp_path: Path,
) -> None:
    """In a process of its own (the routing is for the rest of the process): Ray's,
    DeepSpeed's and Python's warnings reach the log file only; an error also reaches the
    console, once."""
    proc = subprocess.run(
        [sys.executable, "-c", ROUTING, str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "OUT:ERR:ray error: ray error line\n", proc.stdout
    assert proc.stderr == ""  # nothing around distft's streams either
    log = (tmp_path / LOG_FILE).read_text()
    for text in ("before the log file", "ray warning", "deepspeed warning",
                 "FutureWarning: a FutureWarning", "ERROR ray.train: ray error line"):  # fmt: skip
        assert text in log, (text, log)
    assert log.count("ray error line") == 2  # the log keeps both


# -------------------------------------------------------------------- display (unit)


def test_on_a_tty_the_progress_line_stays_at_the_bottom() -> None:
    out, err = io.StringIO(), io.StringIO()
    d = Display(out, err, tty=True)
    d.progress("step 1/2")
    d.line("checkpoint step_1 committed")
    d.progress("step 2/2")
    d.close()
    d.line("done in 3s: run")
    clear = "\r\x1b[K"
    assert out.getvalue() == (
        f"{clear}step 1/2{clear}checkpoint step_1 committed\nstep 1/2{clear}step 2/2\n"
        "done in 3s: run\n"
    )
    d.once("ray error: x")
    d.once("ray error: x")
    assert err.getvalue() == "ray error: x\n"


def test_off_a_tty_progress_lines_are_plain_lines() -> None:
    out = io.StringIO()
    d = Display(out, io.StringIO(), tty=False)
    d.progress("step 1/2")
    d.line("checkpoint")
    d.progress("step 2/2")
    d.close()
    assert out.getvalue() == "step 1/2\ncheckpoint\nstep 2/2\n"


# ------------------------------------------------------------ progress and summary text


METRICS = {"train/loss": 6.03041, "train/lr": 2.25e-3, "train/tokens_per_s": 20241.4}


def test_progress_line() -> None:
    assert progress_line(4, 8, METRICS, elapsed=2.0) == (
        "step 4/8  50% loss 6.0304 lr 2.25e-03 20,241 tok/s eta 2s"
    )
    at_eval = {**METRICS, "eval/loss": 5.85191, "eval/code/loss": 4.5, "train/mfu": 0.4123}
    assert progress_line(40, 100, at_eval, elapsed=100.0, start=20) == (
        "step  40/100  40% loss 6.0304 eval loss 5.8519 eval code loss 4.5000 lr 2.25e-03 "
        "20,241 tok/s MFU 41.2% eta 5m00s"  # 20 steps in 100 s, 60 left
    )
    assert progress_line(0, 8, METRICS, elapsed=0.0).endswith("eta 0s")


def test_durations() -> None:
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_eval_changes_cover_every_eval_loss() -> None:
    rows = [
        {"step": 0, "eval/loss": 6.0, "eval/code/loss": 5.0, "eval/chat/loss": 7.0},
        {"step": 4, "train/loss": 5.5, "eval/loss": 5.8},
        {"step": 4, "eval/loss": 5.7},  # a resumed run logged step 4 again: the last wins
        {"step": 8, "eval/loss": 5.6, "eval/code/loss": 4.0},
    ]
    # the unnamed set first, then the named ones in the order logged (the config's)
    assert eval_loss_keys(rows[0]) == ["eval/loss", "eval/code/loss", "eval/chat/loss"]
    assert eval_changes(rows) == [
        "eval loss 6.0000 -> 5.6000",
        "eval code loss 5.0000 -> 4.0000",
        "eval chat loss 7.0000",
    ]
    assert eval_changes([{"step": 1, "train/loss": 1.0}]) == []


def test_summary_of_a_run_dir(tmp_path: Path) -> None:
    rows = [{"step": 0, "eval/loss": 6.25}, {"step": 8, "train/loss": 5.6, "eval/loss": 5.61}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    report, log = tmp_path / "report.html", tmp_path / LOG_FILE
    lines = summary(tmp_path, 125.0, report, log)
    assert lines == [
        f"done in 2m05s: {tmp_path}",
        "eval loss 6.2500 -> 5.6100",
        f"LoRA adapter: {final}; load it with:",
        *[f"    {line}" for line in load_snippet(final)],
        f"report: {report}",
        f"log: {log}",
    ]
    assert "AutoPeftModelForCausalLM" in lines[3] and json.dumps(str(final)) in lines[4]
    assert foreign("\n".join(lines)) == []  # the allow-list knows the summary's shapes
    (final / "adapter_config.json").unlink()  # no model in final/: no load lines
    assert summary(tmp_path, 5, None, None) == [f"done in 5s: {tmp_path}", lines[1]]


def test_a_crashed_workers_traceback_comes_with_the_failure() -> None:
    """Ray Train's own failure (its message holds each failed worker's traceback): the
    CLI prints `trace` before the `error:` line; a user error stays one line."""
    from ray.train.v2.api.exceptions import WorkerGroupError

    from distft.errors import UserError
    from distft.launch.ray import _explain

    trace = 'Traceback (most recent call last):\n  File "train.py", line 1\nRuntimeError: boom'
    crashed = _explain(WorkerGroupError(f"[Rank 1]\n{trace}", {1: RuntimeError("boom")}))
    assert str(crashed) == "worker 1 failed: RuntimeError: boom" and not crashed.user_error
    assert trace in crashed.trace
    refused = _explain(WorkerGroupError(f"[Rank 0]\n{trace}", {0: UserError("data: bad")}))
    assert str(refused) == "data: bad" and refused.user_error and refused.trace == ""
