"""Multi-process start-up: ``jax.distributed.initialize()`` when the environment asks for it
(docs/design.md §6, "Multi-host").

:func:`maybe_initialize` must run before any other JAX call (``jax.devices()``, the first array,
the first ``jit``): afterwards the JAX backend is fixed and a process would only ever see its
own devices. ``sass_jax.main`` calls it first thing in ``main()``.

How the decision is made, first match wins:

1. ``SASS_DISTRIBUTED=0`` in the environment: never initialise (one process on its own).
2. Explicit: ``--coordinator_address / --num_processes / --process_id`` (arguments), else the
   environment variables ``JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID``.
   ``num_processes == 1`` is a single process (no-op). Values left unset are auto-detected by
   JAX's cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
3. SLURM: ``SLURM_JOB_ID`` and ``SLURM_PROCID`` are set and the job step has more than one
   task (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``) -- i.e. the script was started by
   ``srun`` with several tasks. ``jax.distributed.initialize()`` without arguments then reads
   the coordinator (first node of ``SLURM_STEP_NODELIST``), process count and id from SLURM.
4. Cloud TPU / GKE multi-host: ``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` lists more
   than one host, or ``MEGASCALE_COORDINATOR_ADDRESS`` is set: ``initialize()`` without
   arguments (JAX reads the TPU metadata).
5. ``SASS_DISTRIBUTED=1``: ``initialize()`` without arguments in any other environment JAX can
   detect (a Cloud TPU VM pod slice, whose worker list lives in the metadata server rather than
   the environment -- ``launch/tpu/train_pod.sh`` sets it; Kubernetes with the ``kubernetes``
   package installed).
6. Otherwise: a single process, nothing to do.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax

log = logging.getLogger("sass_jax")

_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on", "auto")


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
  for name in names:
    value = env.get(name)
    if value not in (None, ""):
      try:
        return int(str(value).split("(")[0])  # SLURM writes e.g. "4(x2)" for some counts
      except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
  return None


def _hosts(value: str | None) -> int:
  return len([h for h in (value or "").split(",") if h.strip()])


def detect(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  env: Mapping[str, str] | None = None,
) -> str | None:
  """Which kind of multi-process start-up the arguments and environment ask for.

  Returns 'explicit', 'slurm', 'tpu', 'cluster' (``SASS_DISTRIBUTED=1``) or None (a single
  process; also for ``num_processes == 1`` and ``SASS_DISTRIBUTED=0``). Pure: reads ``env``
  (default ``os.environ``) and calls no JAX function.

  Raises ValueError for a ``SASS_DISTRIBUTED`` value other than 0/1 (or false/true, ...) or a
  non-integer count in the environment.
  """
  env = os.environ if env is None else env
  switch = str(env.get("SASS_DISTRIBUTED", "")).strip().lower()
  if switch and switch not in _OFF + _ON:
    raise ValueError(
      f"SASS_DISTRIBUTED={env['SASS_DISTRIBUTED']!r}; expected 0 (never "
      "initialise jax.distributed) or 1 (always, with JAX's cluster detection)"
    )
  if switch in _OFF:
    return None
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  count = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
  pid = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
  if address is not None or count is not None or pid is not None:
    return None if count == 1 else "explicit"
  if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
    tasks = _int_env(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if tasks is not None and tasks > 1:
      return "slurm"
  if max(
    _hosts(env.get("TPU_WORKER_HOSTNAMES")), _hosts(env.get("TPU_PROCESS_ADDRESSES"))
  ) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  if switch in _ON:
    return "cluster"
  return None


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
  env: Mapping[str, str] | None = None,
) -> str | None:
  """Call ``jax.distributed.initialize`` if :func:`detect` finds a multi-process run.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service (``--coordinator_address``).
    num_processes: total number of processes (``--num_processes``).
    process_id: this process's rank in [0, num_processes) (``--process_id``).
    local_device_ids: restrict this process to these local accelerators (default: all visible).
    env: environment to read (default ``os.environ``).

  Returns the kind of start-up ('explicit', 'slurm', 'tpu', 'cluster') or None when this is a
  single process and nothing was done. Calling it again after a successful initialisation is a
  no-op returning 'already'. Must run before any other JAX call.

  Raises ValueError for inconsistent values (``process_id`` outside ``[0, num_processes)``, a
  bad ``SASS_DISTRIBUTED``) and whatever ``jax.distributed.initialize`` raises (e.g.
  RuntimeError when JAX was already used in this process, or a timeout reaching the
  coordinator).
  """
  if jax.distributed.is_initialized():
    return "already"
  env = os.environ if env is None else env
  kind = detect(coordinator_address, num_processes, process_id, env)
  if kind is None:
    return None
  kwargs = {}
  if kind == "explicit":
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
    if count is not None and count < 1:
      raise ValueError(f"--num_processes={count}; expected >= 1")
    if pid is not None and count is not None and not 0 <= pid < count:
      raise ValueError(f"--process_id={pid} is outside [0, --num_processes={count})")
    kwargs = {"coordinator_address": address, "num_processes": count, "process_id": pid}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  log.info(
    "jax.distributed.initialize (%s%s)",
    kind,
    "".join(f", {k}={v}" for k, v in kwargs.items() if v is not None),
  )
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    if kind == "explicit":
      raise
    raise ValueError(
      f"a multi-process run was detected ({kind}) but JAX could not find its "
      f"parameters: {e}. Pass --coordinator_address/--num_processes/--process_id, "
      "or set SASS_DISTRIBUTED=0 for a single process"
    ) from e
  log.info(
    "process %d of %d: %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return kind


def is_primary() -> bool:
  """True on the process that writes logs, metrics and other single-copy files (index 0)."""
  return jax.process_index() == 0
