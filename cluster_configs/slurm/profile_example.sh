# Run: DISTFT_SLURM_PROFILE=cluster_configs/slurm/profile_example.sh sbatch --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 launch/slurm/distft.sbatch examples/llama3_70b_full_zero3_32gpu.yaml
#
# A site profile for launch/slurm/distft.sbatch: a bash file that the batch script sources
# on the first node before it starts Ray. Everything exported here reaches the Ray nodes
# (srun exports the batch environment), hence every training worker. Copy it, adapt it to
# your site, and pass its path in DISTFT_SLURM_PROFILE. Only assignments here, so that
# `bash -n` and the tests can read it; put `module load` / venv activation lines where
# marked.
#
# Preemption: distft.sbatch asks for `--signal=B:TERM@180` and `--requeue`. If your site
# preempts with PreemptMode=REQUEUE, ask the admins for `PreemptParameters=send_user_signal`
# and a GraceTime of at least 180 s, so that preemption sends that SIGTERM to the batch
# script only (not to the Ray processes) and distft can commit its checkpoint.

# --- software: uncomment / adapt (module names are site specific)
# module load cuda/12.4 nccl/2.21
# source /shared/venvs/distft/bin/activate

# --- where distft, python and ray come from (defaults: whatever is first on PATH)
export DISTFT=distft
export DISTFT_PYTHON=python
export DISTFT_RAY=ray

# --- Ray on the allocation: ports on the head node, temp dirs on node-local disk
export DISTFT_RAY_PORT=6379
export DISTFT_RAY_DASHBOARD_PORT=8265
export DISTFT_RAY_CLIENT_PORT=10001
export DISTFT_RAY_TMPDIR=/tmp
export DISTFT_RAY_JOIN_TIMEOUT=300

# --- networks: the interfaces that carry NCCL (GPU) and gloo (CPU) traffic
export NCCL_SOCKET_IFNAME=ib0
export GLOO_SOCKET_IFNAME=ib0
export NCCL_IB_DISABLE=0

# --- shared storage: model/tokenizer cache on the parallel file system, no hub calls
export HF_HOME=/shared/hf_cache
export HF_HUB_OFFLINE=1
