#!/usr/bin/env bash
# N JAX processes on this machine, talking to each other through jax.distributed on 127.0.0.1
# (docs/design.md §6): the multi-host code path -- per-process data shards, global arrays,
# cross-process collectives (gloo on CPU), checkpoints written by every process -- without a
# cluster.
#
#   launch/multiprocess_local.sh N CONFIG [--workdir DIR] [--mode M] [--config.x=y ...]
#
# e.g. launch/multiprocess_local.sh 2 configs/test.py --workdir runs/mp --mode train \
#        --config.mesh.data=2 --config.mesh.model=4
#
# CONFIG and every further argument are passed unchanged to `python -m sass_jax.main`, plus
# --coordinator_address/--num_processes/--process_id for each process. Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 4): each process runs with
#                        JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=M,
#                        so the global mesh has N*M devices.
#   COORDINATOR_PORT     port of process 0's coordinator (default: a free port).
#   MP_LOG_DIR           where process i's output goes (process_i.log; default a temp dir).
#                        Process 0 also prints to this terminal.
#   SASS_PYTHON          interpreter (default: ./.venv/bin/python, created by setup_venv.sh).
# Waits for all processes; if one fails the others are stopped and the script exits with the
# failing process's status (and prints the tail of its log).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG [main.py flags...]" >&2
  exit 2
fi
n=$1; config=$2; shift 2
case "$n" in ''|*[!0-9]*|0) echo "$0: NUM_PROCESSES must be a positive integer, got '$n'" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
if [ -z "${SASS_PYTHON:-}" ]; then
  launch/setup_venv.sh
  SASS_PYTHON=.venv/bin/python
fi
m=${DEVICES_PER_PROCESS:-4}
port=${COORDINATOR_PORT:-$("$SASS_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
logdir=${MP_LOG_DIR:-$(mktemp -d -t sass_mp.XXXXXX)}
mkdir -p "$logdir"
echo "multiprocess_local: $n processes x $m CPU devices, coordinator 127.0.0.1:$port, logs in $logdir" >&2

pids=()
for ((i = 0; i < n; i++)); do
  log="$logdir/process_$i.log"
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=$m"
       "$SASS_PYTHON" -m sass_jax.main --config "$config" "$@"
       --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$i")
  if [ "$i" -eq 0 ]; then
    "${cmd[@]}" > >(tee "$log") 2>&1 &
  else
    "${cmd[@]}" > "$log" 2>&1 &
  fi
  pids+=($!)
done

stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

# Wait for every process; on the first failure stop the rest (they would block in collectives).
# (bash >= 5.1 for `wait -n -p`.)
status=0
live=("${pids[@]}")
while [ "${#live[@]}" -gt 0 ]; do
  set +e
  wait -n -p done_pid "${live[@]}"
  rc=$?
  set -e
  rest=()
  for p in "${live[@]}"; do [ "$p" = "$done_pid" ] || rest+=("$p"); done
  live=("${rest[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    failed=?
    for ((i = 0; i < n; i++)); do [ "${pids[$i]}" = "$done_pid" ] && failed=$i; done
    echo "multiprocess_local: process $failed exited with status $rc; stopping the others" >&2
    [ "$failed" != "?" ] && tail -n 40 "$logdir/process_$failed.log" >&2
    stop_all
  fi
done
[ "$status" -eq 0 ] && echo "multiprocess_local: all $n processes finished" >&2
exit "$status"
