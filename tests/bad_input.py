"""The bad-input battery's one assertion (issue 16): a refusal is one `error:` line that
names the problem, the promised exit code, no traceback, and nothing that was already
there changed.

`refuse` runs the real CLI. In-process (typer's runner, the default) it costs no
interpreter start; `train` is guarded so that a refusal that did not happen before Ray
fails the test instead of starting a cluster inside pytest. `subprocess=True` runs the
`distft` executable as a user would (for cases that must reach Ray or need a clean
process).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.support import run_cli

COUNT = {"cases": 0}  # how many refusals the session checked (printed by conftest)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


def snapshot(paths: Iterable[Path]) -> dict[str, tuple[str, float] | None]:
    """Content hash and mtime of every file under `paths` (None: does not exist)."""
    out: dict[str, tuple[str, float] | None] = {}
    for root in paths:
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for f in files:
            if f.is_file() and os.access(f, os.R_OK):
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                out[str(f)] = (digest, f.stat().st_mtime)
            elif f.is_dir():
                out[str(f)] = ("dir", 0.0)
    return out


def _in_process(args: tuple[str, ...], cwd: Path | None) -> Outcome:
    from typer.testing import CliRunner

    import distft.launch.ray as ray_launch
    from distft.cli import app

    def reached_ray(*_a: object, **_k: object) -> None:
        raise AssertionError("the refusal did not happen before Ray started")

    saved = ray_launch.init_ray, ray_launch.launch
    ray_launch.init_ray = ray_launch.launch = reached_ray  # type: ignore[assignment]
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    finally:
        os.chdir(old)
        ray_launch.init_ray, ray_launch.launch = saved  # type: ignore[assignment]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback a user would have seen
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run(*args: str, cwd: Path | None = None, subprocess: bool = False) -> Outcome:
    if subprocess:
        proc = run_cli(*args, **({"cwd": cwd} if cwd is not None else {}))
        return Outcome(proc.returncode, proc.stdout, proc.stderr)
    return _in_process(args, cwd)


def refuse(
    *args: str,
    expect: str | list[str],
    code: int = 2,
    unchanged: Iterable[Path] = (),
    cwd: Path | None = None,
    subprocess: bool = False,
) -> Outcome:
    """Run `distft ARGS`; assert exit `code`, exactly one `error:` line per expected
    text (each containing it), no traceback, and every file under `unchanged` as before."""
    watched = list(unchanged)
    before = snapshot(watched)
    outcome = run(*args, cwd=cwd, subprocess=subprocess)
    tail = f"stdout:\n{outcome.stdout[-3000:]}\nstderr:\n{outcome.stderr[-3000:]}"
    shown = f"exit {outcome.code}\n{tail}"
    expected = [expect] if isinstance(expect, str) else expect
    assert outcome.code == code, shown
    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    assert len(outcome.errors) == len(expected), shown
    for text, line in zip(expected, outcome.errors, strict=True):
        assert text in line, f"expected {text!r} in {line!r}\n{shown}"
    assert snapshot(watched) == before, f"files changed by a refused command\n{shown}"
    COUNT["cases"] += 1
    return outcome
