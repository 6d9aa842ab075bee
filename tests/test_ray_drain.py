"""Ray node drains (spot preemption): unit checks of distft.checkpoint.preempt's drain helpers and
the launcher's restart, then the real thing.

A Ray node drain (spot preemption) mid-run, on two test hosts in network namespaces
(tests/netns_fixture.py): a Ray head on host 1 (10.233.0.1, 2 CPUs) and a Ray worker node
on host 2 (10.233.0.2, 1 CPU); `cluster.placement: spread` puts one rank on each host.

Mid-run, `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` announces that host 2 goes
away in 60 s. Ray Train's PreemptionWatcher tells every worker; each rank sees it at its
next step (distft.checkpoint.preempt.drain_announced), the ranks stop at the same step with a
committed checkpoint, and distft's launcher starts a new worker group (on host 1: Ray
schedules nothing new on a draining node) that resumes from it and finishes the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from distft.checkpoint import preempt
from tests import netns_fixture
from tests.cluster_run import cluster_config, launches, losses, start_train
from tests.support import REPO
from tests.test_cluster_netns import HEAD, cluster_env

NO_NETNS = netns_fixture.unavailable()

STEPS = 30
DEADLINE_S = 120  # generous: on a loaded 2-core machine the first step can take 30 s
CONTEXT = "ray.train.v2._internal.execution.context"


def _fake_train_context(monkeypatch: pytest.MonkeyPatch, context: Any) -> None:
    module = types.ModuleType(CONTEXT)
    module.get_train_context = lambda: context  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, CONTEXT, module)


def test_drain_announced_reads_the_workers_own_preemption_info(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, CONTEXT, raising=False)
    assert preempt.drain_announced() is None  # not in a Ray Train worker
    _fake_train_context(monkeypatch, types.SimpleNamespace())  # another Ray's layout
    assert preempt.drain_announced() is None
    context = types.SimpleNamespace(preemption_context=types.SimpleNamespace(preemption_info=None))
    _fake_train_context(monkeypatch, context)
    assert preempt.drain_announced() is None  # no drain yet
    context.preemption_context.preemption_info = types.SimpleNamespace(
        deadline_ms=int((time.time() + 57.4) * 1000), preempted_node_to_ranks={"ab" * 28: [1]}
    )
    monkeypatch.setattr(preempt, "_describe_nodes", lambda ids: f"node {ids[0][:8]}")
    assert preempt.drain_announced() == "node abababab is being drained (deadline in 57 s)"
    context.preemption_context.preemption_info.deadline_ms = None
    assert preempt.drain_announced() == "node abababab is being drained (no deadline)"


def test_drain_flag_never_overrides_a_signal(tmp_path: Path) -> None:
    preempt.note_drain(tmp_path, "node x is being drained; checkpoint committed at step 3")
    assert preempt.requested(tmp_path)
    assert (
        preempt.drain_reason(tmp_path) == "node x is being drained; checkpoint committed at step 3"
    )
    (tmp_path / preempt.FLAG).write_text("signal 15\n")
    preempt.note_drain(tmp_path, "node y is being drained; checkpoint committed at step 4")
    assert preempt.drain_reason(tmp_path) is None
    assert (tmp_path / preempt.FLAG).read_text() == "signal 15\n"


def test_launch_restarts_after_a_drain_and_not_after_a_signal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from distft.launch import ray as launch_ray

    cfg = types.SimpleNamespace(output_dir=tmp_path, cluster=types.SimpleNamespace(max_failures=0))
    flags = ["ray drain", "ray drain", None]  # what each _fit leaves behind
    calls: list[bool] = []

    def fit(cfg: Any, launch_id: str) -> None:
        calls.append(preempt.requested(tmp_path))  # the new group starts without the flag
        if flags[len(calls) - 1]:
            preempt.note_drain(tmp_path, f"node n is being drained; step {len(calls)}")

    monkeypatch.setattr(launch_ray, "init_ray", lambda cfg: None)
    monkeypatch.setattr(launch_ray, "_check_room", lambda cfg, log: None)
    monkeypatch.setattr(launch_ray, "_fit", fit)
    lines: list[str] = []
    launch_ray.launch(cfg, log=lines.append)  # type: ignore[arg-type]
    assert calls == [False, False, False]  # max_failures 0: drains do not count
    assert lines == [
        "node n is being drained; step 1; restarting the workers",
        "node n is being drained; step 2; restarting the workers",
    ]
    (tmp_path / preempt.FLAG).write_text("signal 15\n")  # the driver's: exit 75, no restart
    calls.clear()
    launch_ray.launch(cfg, log=lines.append)  # type: ignore[arg-type]
    assert calls == [True] and len(lines) == 2


_NODE_ID = """
import ray, sys
ray.init(address=sys.argv[1], logging_level="ERROR")
ip = sys.argv[2]
print([n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerAddress"] == ip][0])
"""
# Started before the drain and polling from then on: the node is draining only until its
# workers have left it (then it is drained and gone), which on a fast run can be sooner than
# a new Python process takes to import Ray once `ray drain-node` has returned.
_DRAINING = """
import json, sys, time, ray._raylet
client = ray._raylet.GcsClient(address=sys.argv[1])
client.get_draining_nodes(timeout=30)  # connected
print("ready", flush=True)
deadline, nodes = time.monotonic() + float(sys.argv[2]), {}
while not nodes and time.monotonic() < deadline:
    nodes = client.get_draining_nodes(timeout=30)
    time.sleep(0.05)  # polling Ray's state: GCS offers nothing to wait on
print(json.dumps({getattr(k, "hex", lambda: k)(): v for k, v in nodes.items()}), flush=True)
"""


def _watch_draining(host: netns_fixture.Host, env: dict[str, str]) -> subprocess.Popen:
    """A process on `host` that prints the first non-empty set of draining nodes it sees
    (node id -> deadline in ms), or {} after 120 s; returned once it is polling."""
    cmd = host.argv([sys.executable, "-c", _DRAINING, HEAD, "120"])
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _python(host: netns_fixture.Host, code: str, *args: str, env: dict[str, str]) -> str:
    proc = host.run([sys.executable, "-c", code, *args], cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(NO_NETNS is not None, reason=str(NO_NETNS))
def test_ray_drain_commits_a_checkpoint_and_resumes_on_the_other_node(
    tiny: Any, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    # Ray Train polls the drain state every 5 s by default; 1 s keeps the tiny run short.
    env = {**cluster_env(), "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}
    with netns_fixture.TestNet("dr") as net:
        h1, h2 = net.add_host(), net.add_host()
        netns_fixture.ray_start(net, h1, tmp_path / "head.log", num_cpus=2, env=env)
        netns_fixture.ray_start(net, h2, tmp_path / "worker.log", head=h1, num_cpus=1, env=env)
        wait = [sys.executable, "-m", "distft.launch.raycluster", "wait-nodes", HEAD, "2"]
        joined = h1.run([*wait, "--timeout", "120"], cwd=REPO, env={**os.environ, **env})
        assert joined.returncode == 0, joined.stdout + joined.stderr
        node2 = _python(h1, _NODE_ID, HEAD, h2.ip, env=env)
        t_cluster = time.monotonic() - t0

        out = tmp_path / "run"
        cfg = cluster_config(
            tiny, out, batch={"max_steps": STEPS}, cluster={"address": HEAD, "placement": "spread"}
        )
        log = tmp_path / "train.log"
        proc = start_train(h1, cfg, log, env)
        drained_after, watcher = None, None
        draining: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                # As soon as the workers are up: `ray drain-node` alone takes 5-20 s here
                # (CLI start-up on a loaded machine), about as long as the 30 steps.
                if launches(out):
                    watcher = _watch_draining(h1, env)
                    t_drain, asked_at = time.monotonic(), time.time()
                    drained_after = max(losses(out), default=0)
                    ray = str(Path(sys.executable).with_name("ray"))
                    drain = h1.run(
                        [ray, "drain-node", f"--address={HEAD}", f"--node-id={node2}",
                         "--reason=DRAIN_NODE_REASON_PREEMPTION",
                         "--reason-message=spot preemption (distft test)",
                         f"--deadline-remaining-seconds={DEADLINE_S}"],
                        cwd=REPO, env={**os.environ, **env},
                    )  # fmt: skip
                    assert drain.returncode == 0, drain.stdout + drain.stderr
                    t_drain = time.monotonic() - t_drain
                    draining = json.loads(watcher.communicate(timeout=150)[0].splitlines()[-1])
                    break
                time.sleep(0.05)
            proc.wait(timeout=300)
        finally:
            for started in (proc, watcher):
                if started is not None and started.poll() is None:
                    started.kill()
                    started.wait()
    text = log.read_text(errors="replace")
    elapsed = time.monotonic() - t0
    where = f"drained host 2 after step {drained_after}"
    assert drained_after is not None, f"the workers never started:\n{text[-4000:]}"
    # Ray Core's own view of the drained node: draining, with the deadline given
    assert list(draining) == [node2], draining
    assert 0 <= draining[node2] / 1000 - asked_at - DEADLINE_S < t_drain + 1, draining
    assert proc.returncode == 0, f"{where}:\n{text[-5000:]}"

    m = re.search(
        rf"warning: node {re.escape(h2.ip)} \({node2[:8]}\) is being drained \(deadline in "
        r"\d+ s\); checkpoint committed at step (\d+); restarting the workers",
        text,
    )
    assert m, f"{where}: no drain line:\n{text[-5000:]}"
    stop = int(m.group(1))
    assert max(drained_after, 1) <= stop < STEPS, (where, stop)
    assert f"stopped at step {stop} (preemption); checkpoint committed" in text
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert resumed == [stop], (where, resumed)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{stop:08d}", f"step_{STEPS:08d}"], ckpts
    assert max(losses(out)) == STEPS
    assert not (out / "PREEMPT").exists()

    first, second = launches(out)
    assert sorted(w["node_ip"] for w in first["workers"]) == [h1.ip, h2.ip], first
    assert [w["node_ip"] for w in second["workers"]] == [h1.ip, h1.ip], second
    print(
        f"{where}; stopped at step {stop}; cluster up in {t_cluster:.0f}s, "
        f"`ray drain-node` took {t_drain:.0f}s, whole test {elapsed:.0f}s"
    )
