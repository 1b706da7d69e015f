#!/usr/bin/env bash
# One-process run on this machine (CPU, or the local GPU/TPU that jax sees).
#   launch/local.sh [--config configs/movielens.py] [--workdir runs/movielens] [--mode train] [--config.x=y ...]
# Arguments are passed through unchanged to `python -m sass_jax.main`; the defaults below apply
# only when the flag is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup_venv.sh
# The test extra installs libtpu (for the TPU compile tests); on a machine with no TPU and no
# NVIDIA GPU it would log a TPU-initialisation error at every start, so pick the CPU outright.
if [[ -z "${JAX_PLATFORMS:-}" ]] && ! compgen -G "/dev/accel*" >/dev/null \
  && ! compgen -G "/dev/vfio/*" >/dev/null && ! command -v nvidia-smi >/dev/null; then
  export JAX_PLATFORMS=cpu
fi
args=("$@")
have() { for a in "${args[@]:-}"; do case "$a" in "$1"|"$1"=*) return 0;; esac; done; return 1; }
have --config || args+=(--config configs/movielens.py)
have --workdir || args+=(--workdir runs/movielens)
exec .venv/bin/python -m sass_jax.main "${args[@]}"
