#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (several hosts): copy this working tree to every worker,
# install it there, and start `python -m sass_jax.main` on all workers at once (docs/design.md §6).
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a [PROJECT=my-project] \
#     launch/tpu/train_pod.sh CONFIG --workdir /mnt/shared/runs/exp1 [--mode train] [--config.x=y ...]
#
# e.g. TPU_NAME=pod ZONE=us-central2-b launch/tpu/train_pod.sh configs/movielens.py \
#        --workdir /mnt/shared/runs/ml --config.mesh.model=4 --config.mesh.shard_min_rows=100000
#
# CONFIG and every further argument reach `python -m sass_jax.main` unchanged on every worker
# (shell-quoted for the remote shell). Environment:
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT optional (default: gcloud's project).
#   REMOTE_DIR       where the code goes on each worker (default: sass_jax, in the home dir).
#   REMOTE_PYTHON    interpreter that creates the workers' .venv (default python3; must be
#                    Python >= 3.11, e.g. python3.11 on older TPU VM images).
#   SKIP_INSTALL=1   only run (the code and .venv are already on the workers).
#   DETACH=1         start the run under nohup (output in REMOTE_DIR/train.log on each worker)
#                    and return; otherwise the run is tied to this ssh session.
#
# How the processes find each other: every worker runs one process with SASS_DISTRIBUTED=1, so
# sass_jax.distributed calls jax.distributed.initialize() without arguments and JAX reads the
# worker list, this worker's id and the coordinator (worker 0) from the TPU metadata server.
# Each process drives its host's TPU chips; jax.devices() is every chip of the slice.
#
# Expects:
# - WORKDIR on a filesystem mounted at the same path on every worker (e.g. a Filestore NFS
#   share): process 0 prepares WORKDIR/data and the others read it; every process writes its
#   shards of each orbax checkpoint; only process 0 writes *_log.jsonl, metrics.json, plots.
#   A plain gs:// path is not enough (the prepared store and logs are ordinary files).
# - The raw data (config.data.dir) readable by worker 0 -- simplest on the same share.
# - Batch sizes divisible by the mesh's data axis (config.mesh.data=-1: all chips not on the
#   model axis). Embedding tables with >= config.mesh.shard_min_rows rows are row-split over
#   config.mesh.model chips.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG [--workdir DIR] [main.py flags...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to the TPU VM zone}"
config=$1; shift
cd "$(dirname "$0")/../.."
remote=${REMOTE_DIR:-sass_jax}
gc=(--zone "$ZONE")
if [ -n "${PROJECT:-}" ]; then gc+=(--project "$PROJECT"); fi
on_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gc[@]}" --command "$1"; }

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # 1. The working tree (without .venv, runs, .git) to every worker.
  tmpdir=$(mktemp -d -t sass_jax_src.XXXXXX)
  tar --exclude=./.venv --exclude=./runs --exclude=./.git -czf "$tmpdir/src.tgz" .
  gcloud compute tpus tpu-vm scp "$tmpdir/src.tgz" "$TPU_NAME:/tmp/sass_jax_src.tgz" --worker=all "${gc[@]}"
  rm -rf "$tmpdir"
  # 2. Install: ./.venv with sass_jax, then the TPU build of the same jax version.
  on_all "set -e; mkdir -p $(printf %q "$remote") && cd $(printf %q "$remote") \
    && tar -xzf /tmp/sass_jax_src.tgz && PYTHON=$(printf %q "${REMOTE_PYTHON:-python3}") launch/setup_venv.sh \
    && .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
fi

# 3. Run on every worker at once.
run="cd $(printf %q "$remote") && SASS_DISTRIBUTED=1 PYTHONUNBUFFERED=1 .venv/bin/python -m sass_jax.main --config $(printf %q "$config")"
for a in "$@"; do run+=" $(printf %q "$a")"; done
if [ "${DETACH:-0}" = 1 ]; then
  on_all "nohup bash -c $(printf %q "$run") > $(printf %q "$remote")/train.log 2>&1 < /dev/null &"
  echo "started on all workers of $TPU_NAME; output in ~/$remote/train.log on each worker"
else
  on_all "$run"
fi
