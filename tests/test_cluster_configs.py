"""Every file in cluster_configs/ and the launch scripts: parsed and checked against the
code and against the example they are sized for (examples/llama3_70b_full_zero3_32gpu.yaml,
32 GPUs). Ray cluster YAMLs also go through Ray's own schema validation."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from distft.checkpoint import preempt
from distft.config import Config, load
from tests.support import REPO

CONFIGS = REPO / "cluster_configs"
SBATCH = REPO / "launch" / "slurm" / "distft.sbatch"
SUBMIT = REPO / "launch" / "ray" / "submit.sh"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
TESTED = {
    "README.md",
    "ray/aws-gpu.yaml",
    "ray/gcp-gpu.yaml",
    "kuberay/Dockerfile",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob.yaml",
    "slurm/profile_example.sh",
}


def run_config(command: str, base: Path = REPO, extra: list[str] | None = None) -> Config:
    """The Config a `distft train CONFIG k=v ...` command line would train."""
    argv = shlex.split(command)
    assert argv[:2] == ["distft", "train"], argv
    return load(base / argv[2], [*argv[3:], *(extra or [])])


def test_every_file_is_checked_and_says_how_to_use_it() -> None:
    files = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*") if p.is_file()}
    assert files == TESTED
    for name in TESTED - {"README.md"}:
        assert (CONFIGS / name).read_text().startswith("# Run: "), name
        assert name in (CONFIGS / "README.md").read_text(), f"{name} is not documented"


# ------------------------------------------------------------------ Ray cluster launcher


@pytest.mark.parametrize("name", ["ray/aws-gpu.yaml", "ray/gcp-gpu.yaml"])
def test_ray_cluster_launcher_yaml(name: str) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CONFIGS / name).read_text())
    validate_config(prepare_config(cfg))  # Ray's schema + node-type rules
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training workers on the head
    (gpu,) = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert gpu["resources"]["GPU"] == 8 and gpu["max_workers"] * 8 >= 32
    assert cfg["max_workers"] >= gpu["max_workers"]
    assert cfg["docker"]["image"] == RAY_IMAGE
    # this checkout on every node, installed; shared storage mounted and passed in
    assert cfg["file_mounts"] == {"/home/ray/distft": "."}
    assert "pip install --no-cache-dir -e /home/ray/distft" in cfg["setup_commands"]
    assert any(" /shared" in c for c in cfg["initialization_commands"])
    assert "--volume=/shared:/shared" in cfg["docker"]["run_options"]
    if cfg["provider"]["type"] == "aws":
        assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"
    else:
        assert cfg["provider"]["type"] == "gcp"
        (acc,) = gpu["node_config"]["guestAccelerators"]
        assert acc["acceleratorCount"] == gpu["resources"]["GPU"]
        assert gpu["node_config"]["scheduling"] == [{"onHostMaintenance": "TERMINATE"}]
    # the usage line submits the 70B example to this cluster's shared storage
    usage = (CONFIGS / name).read_text()
    assert "launch/ray/submit.sh --address http://127.0.0.1:8265" in usage
    assert "checkpoint.output_dir=/shared/" in usage


# ------------------------------------------------------------------------------ KubeRay


def kuberay() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((CONFIGS / "kuberay" / "raycluster.yaml").read_text()))
    docs += list(yaml.safe_load_all((CONFIGS / "kuberay" / "rayjob.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def pod_resources(group: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, str]]:
    (container,) = group["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    return container["image"], container["resources"]["limits"], mounts


def test_kuberay_cluster_job_and_image_fit_together() -> None:
    docs = kuberay()
    cluster, job, pvc = docs["RayCluster"], docs["RayJob"], docs["PersistentVolumeClaim"]
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    head_image, _, head_mounts = pod_resources(spec["headGroupSpec"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = spec["workerGroupSpecs"]
    image, limits, mounts = pod_resources(workers)
    assert image == head_image
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    # shared storage: one ReadWriteMany claim at /shared in every pod; /dev/shm in RAM
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod_mounts, group in ((head_mounts, spec["headGroupSpec"]), (mounts, workers)):
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claim = volumes[pod_mounts["/shared"]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]
    worker_volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert worker_volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    # the job targets this cluster and runs a valid distft command from the image's checkout
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    cd, command = job["spec"]["entrypoint"].split(" && ")
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile(), re.M)
    assert workdir and cd == f"cd {workdir.group(1)}"
    cfg = run_config(command)
    assert cfg.cluster.address == "auto" and cfg.checkpoint.output_dir.startswith("/shared/")
    c = cfg.cluster
    assert c.num_workers * c.gpus_per_worker <= workers["replicas"] * gpus_per_pod
    assert (gpus_per_pod / c.gpus_per_worker) * c.cpus_per_worker <= float(limits["cpu"])


def dockerfile() -> str:
    return (CONFIGS / "kuberay" / "Dockerfile").read_text()


def test_dockerfile_builds_on_the_tested_ray_image_and_installs_this_checkout() -> None:
    text = dockerfile()
    assert re.search(rf"^FROM {re.escape(RAY_IMAGE)}$", text, re.M)
    copied = re.findall(r"^COPY --chown=ray:users (.+) \S+$", text, re.M)
    sources = {s for line in copied for s in line.split()}
    assert {"pyproject.toml", "distft", "examples", "launch"} <= sources
    assert all((REPO / s).exists() for s in sources), sources
    assert "RUN pip install --no-cache-dir -e ." in text


# -------------------------------------------------------------------------------- Slurm


def documented_env(script: Path) -> set[str]:
    """The DISTFT_* variables a launch script's header comment documents."""
    header = "".join(line for line in script.read_text().splitlines(True) if line[:1] == "#")
    return set(re.findall(r"\bDISTFT_\w+|\bDISTFT\b", header))


def test_sbatch_script_contract() -> None:
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)], check=False).returncode == 0
    assert re.search(r"^#SBATCH --signal=B:TERM@\d+$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)
    assert f"((rc == {preempt.EXIT_PREEMPTED} || " in text  # requeue on distft's preempt code
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "ray stop" not in text  # it stops every Ray of the user on the node
    body = "".join(line for line in text.splitlines(True) if line[:1] != "#")
    used = set(re.findall(r"\bDISTFT_\w+", body)) | ({"DISTFT"} if "${DISTFT:-" in body else set())
    assert used == documented_env(SBATCH), used ^ documented_env(SBATCH)


def test_slurm_profile_sets_only_documented_variables_and_its_command_is_valid() -> None:
    profile = CONFIGS / "slurm" / "profile_example.sh"
    assert subprocess.run(["bash", "-n", str(profile)], check=False).returncode == 0
    proc = subprocess.run(
        ["env", "-i", "bash", "-euc", f'source "{profile}"; env'],
        capture_output=True,
        text=True,
        check=True,
    )
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    distft_vars = {k for k in env if k.startswith("DISTFT")}
    assert distft_vars and distft_vars <= documented_env(SBATCH), distft_vars
    assert env["HF_HOME"].startswith("/shared/")
    # Run: DISTFT_SLURM_PROFILE=... sbatch --nodes=N --gpus-per-node=G ... SCRIPT CONFIG
    argv = shlex.split(profile.read_text().splitlines()[0].removeprefix("# Run: "))
    assert argv[0] == f"DISTFT_SLURM_PROFILE={profile.relative_to(REPO)}" and argv[1] == "sbatch"
    script = next(a for a in argv if a.endswith(".sbatch"))
    assert REPO / script == SBATCH
    opts = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--"))
    nodes, gpus = int(opts["nodes"]), int(opts["gpus-per-node"])
    config = argv[argv.index(script) + 1 :]
    # what distft.sbatch passes for a GPU allocation (before the user's overrides)
    implied = [f"cluster.num_workers={nodes * gpus}", "cluster.gpus_per_worker=1"]
    cfg = run_config(f"distft train {shlex.join(config)}", extra=implied)
    assert cfg.cluster.num_workers == load(REPO / config[0]).cluster.num_workers == 32


def test_ray_submit_script_contract() -> None:
    text = SUBMIT.read_text()
    assert subprocess.run(["bash", "-n", str(SUBMIT)], check=False).returncode == 0
    assert text.startswith("#!/usr/bin/env bash\n# Run: launch/ray/submit.sh ")
    assert 'train "$config" cluster.address=auto "$@"' in text
    assert '--working-dir "$root"' in text
    bad = subprocess.run(["bash", str(SUBMIT), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown option --bogus")
    missing = subprocess.run(["bash", str(SUBMIT), "no/such.yaml"], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr == "error: no/such.yaml: no such file\n"


# ----------------------------------------------------------- dashboard exposure and auth

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def dashboard_host(command: str) -> str:
    """The --dashboard-host of a `ray start --head` command line (unset: Ray's default,
    localhost)."""
    found = re.search(r"--dashboard-host[= ]\"?([^\s\"]+)", command)
    return found.group(1) if found else "localhost"


def token_auth_from_secret(env: list[dict[str, Any]]) -> bool:
    """A container env with Ray token auth on and the token read from a Secret."""
    by_name = {e["name"]: e for e in env}
    mode = by_name.get("RAY_AUTH_MODE", {}).get("value")
    token = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return mode == "token" and bool(token and token.get("name") and token.get("key"))


def head_starts() -> dict[str, list[str]]:
    """Every command line that starts a Ray head (`ray start --head`, or the sbatch's
    `ray_node ... --head`) in the shipped files, by file (shell continuations joined)."""
    found: dict[str, list[str]] = {}
    files = [p for p in (*CONFIGS.rglob("*"), *(REPO / "launch").rglob("*")) if p.is_file()]
    for path in files:
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        heads = [line for line in text.splitlines() if re.search(r"\s--head(\s|$)", line)]
        if heads:
            found[str(path.relative_to(REPO))] = heads
    return found


def test_no_shipped_dashboard_is_open_without_a_token() -> None:
    """The dashboard is Ray's job API: whoever reaches it runs code. Every shipped head
    binds it to loopback (reached over `ray dashboard` / an SSH tunnel) or turns Ray's
    token authentication on."""
    starts = head_starts()
    assert set(starts) == {
        "cluster_configs/ray/aws-gpu.yaml",
        "cluster_configs/ray/gcp-gpu.yaml",
        "launch/slurm/distft.sbatch",
    }, starts
    for name, commands in starts.items():
        for command in commands:
            assert dashboard_host(command) in LOOPBACK, f"{name}: {command}"
    sbatch = SBATCH.read_text()  # and Slurm has token auth on besides
    assert "export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}" in sbatch
    fresh_token = r"^export RAY_AUTH_TOKEN=\$\{RAY_AUTH_TOKEN:-\$\(od .*/dev/urandom"
    assert re.search(fresh_token, sbatch, re.M)

    # KubeRay: the head serves the submitter pod, so it listens on the pod network, with
    # token auth in every pod and in the submitter, the token from a Secret
    docs = kuberay()
    spec = docs["RayCluster"]["spec"]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    pods = [g["template"]["spec"] for g in groups]
    submitter = docs["RayJob"]["spec"].get("submitterPodTemplate", {}).get("spec")
    if host not in LOOPBACK:
        assert submitter is not None, "the RayJob submitter has no token"
        pods.append(submitter)
        for pod in pods:
            for container in pod["containers"]:
                assert token_auth_from_secret(container.get("env", [])), container["name"]
        assert not submitter["containers"][0].get("command")  # KubeRay supplies the submit
    header = (CONFIGS / "kuberay" / "raycluster.yaml").read_text()
    assert "kubectl create secret generic distft-ray-auth --from-literal=token=" in header

    # the embedded local Ray (`distft train` without cluster.address)
    from distft.config.sections import ClusterConfig

    assert ClusterConfig().dashboard_host in LOOPBACK
