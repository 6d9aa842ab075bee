#!/usr/bin/env bash
# Run: launch/ray/submit.sh [--address http://HEAD:8265] [--no-wait] [--no-validate] CONFIG.yaml [k=v ...]
#
# Submits `distft train CONFIG cluster.address=auto [overrides]` to an existing Ray
# cluster as a Ray job. This checkout (minus .venv, .git, runs/ and caches) is the job's
# working_dir: Ray uploads it, and the job driver and every training worker import distft
# from it, so the cluster runs exactly the code you submitted. The nodes need distft's
# dependencies installed (torch, deepspeed, transformers, ...); see cluster_configs/.
#
# Paths: CONFIG may be a file in this checkout (it travels with the working dir) or an
# absolute path on storage that the head node sees. Data files and checkpoint.output_dir
# must be absolute paths on storage that every node mounts at the same path; distft
# checks the output dir when the workers start.
#
# --address defaults to $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, then
# http://127.0.0.1:8265 (the dashboard of a head on this machine). With token auth
# (RAY_AUTH_MODE=token) the token comes from RAY_AUTH_TOKEN or ~/.ray/auth_token.
# DISTFT_PYTHON: the python on the head node that has distft's dependencies (default: python).
# Exit status: that of the job (0 succeeded, 1 failed); with --no-wait, 0 once submitted.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
address=${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}
submit_args=()
validate=1
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --address) address=$2; shift 2 ;;
    --address=*) address=${1#*=}; shift ;;
    --no-wait) submit_args+=(--no-wait); shift ;;
    --submission-id) submit_args+=(--submission-id "$2"); shift 2 ;;
    --no-validate) validate=0; shift ;;
    *) echo "error: unknown option $1 (allowed: --address, --no-wait, --submission-id, --no-validate)" >&2
       exit 2 ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--address URL] [--no-wait] CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
config=$1; shift
if [[ ! -f $config ]]; then
  echo "error: $config: no such file" >&2
  exit 2
fi
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
case $config in
  "$root"/*) config=${config#"$root"/} ;;  # inside the checkout: relative to the working dir
esac

# Check the config here, before anything is uploaded (the checks of `distft train`), when
# distft is installed on this machine; --no-validate skips it (e.g. data only the cluster sees).
py=${DISTFT_PYTHON:-python}
if [[ $validate == 1 ]] && command -v distft >/dev/null 2>&1; then
  (cd "$root" && distft validate "$config" cluster.address=auto "$@" >/dev/null)
fi

excludes='[".git", ".venv", "runs", ".cache", "wandb", "bench", "__pycache__", "*.egg-info",
  ".pytest_cache", ".ruff_cache", ".mypy_cache"]'
exec ray job submit \
  --address "$address" \
  --working-dir "$root" \
  --runtime-env-json "{\"excludes\": $excludes}" \
  "${submit_args[@]}" \
  -- "$py" -c 'import sys; from distft.cli import main; sys.argv[0] = "distft"; main()' \
  train "$config" cluster.address=auto "$@"
