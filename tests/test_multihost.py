"""Multi-process runs (docs/design.md §6, "Multi-host"): start-up detection, per-process data
slices, and two real local processes (launch/multiprocess_local.sh) that must train exactly like
one process with the same 8 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from sass_jax import distributed
from sass_jax.partition import Partitioner

REPO = Path(__file__).resolve().parents[1]


# -- start-up detection (pure) ----------------------------------------------------------------
@pytest.mark.parametrize(
  "env, args, expected",
  [
    ({}, {}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, {}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, {}, "slurm"),
    # srun step with one task inside an allocation of 8: a single process.
    (
      {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"},
      {},
      None,
    ),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, {}, None),  # batch script itself, no srun
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, {}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, {}, "tpu"),
    ({"SASS_DISTRIBUTED": "1"}, {}, "cluster"),
    (
      {"SASS_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"},
      {},
      None,
    ),
    ({}, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, "explicit"),
    ({}, {"coordinator_address": "h:1", "num_processes": 1, "process_id": 0}, None),
    (
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
      {},
      "explicit",
    ),
    # explicit flags win over SLURM detection
    (
      {"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"},
      {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0},
      "explicit",
    ),
  ],
)
def test_detect(env, args, expected):
  assert distributed.detect(env=env, **args) == expected


def test_detect_and_initialize_errors():
  with pytest.raises(ValueError, match="SASS_DISTRIBUTED"):
    distributed.detect(env={"SASS_DISTRIBUTED": "maybe"})
  with pytest.raises(ValueError, match="SLURM_NTASKS"):
    distributed.detect(env={"SLURM_JOB_ID": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "x"})
  with pytest.raises(ValueError, match="process_id=2"):
    distributed.maybe_initialize("127.0.0.1:1", 2, 2, env={})
  # A single process: nothing is initialised.
  assert distributed.maybe_initialize(env={}) is None
  assert distributed.maybe_initialize("127.0.0.1:1", 1, 0, env={}) is None
  assert not jax.distributed.is_initialized()


# -- which rows of the global batch a process feeds ---------------------------------------------
def _fake_partitioner(shape, processes, process_of=None):
  """A Partitioner over fake devices: device j belongs to process j * processes // size."""
  size = int(np.prod(shape))
  process_of = process_of or (lambda j: j * processes // size)
  devs = np.array(
    [SimpleNamespace(id=j, process_index=process_of(j)) for j in range(size)], dtype=object
  ).reshape(shape)
  part = Partitioner.__new__(Partitioner)
  part.mesh = SimpleNamespace(
    devices=devs, axis_names=("data", "model"), shape={"data": shape[0], "model": shape[1]}
  )
  return part


@pytest.mark.parametrize(
  "shape, processes, expected",
  [
    ((2, 4), 2, (0, 2)),  # one data row per process
    ((8, 1), 2, (0, 2)),  # four data rows per process
    ((4, 2), 2, (0, 2)),
    ((8, 1), 4, (0, 4)),
    ((1, 8), 2, (0, 1)),  # data=1: the model axis spans processes; both feed the whole batch
    ((2, 4), 1, (0, 1)),
  ],
)
def test_data_shard(shape, processes, expected):
  assert jax.process_index() == 0
  assert _fake_partitioner(shape, processes).data_shard() == expected


def test_data_shard_rejects_interleaved_layout():
  # Process 0 owns data rows {0, 2}, process 1 rows {1, 3}: no contiguous slice exists.
  part = _fake_partitioner((4, 2), 2, process_of=lambda j: (j // 2) % 2)
  with pytest.raises(ValueError, match="aligned contiguous block"):
    part.data_shard()


# -- two real processes vs one process ----------------------------------------------------------
OVERRIDES = [
  "--mode",
  "finetune",
  "--config.pretrain.num_steps=0",
  "--config.train.num_steps=10",
  "--config.train.log_every=1",
  "--config.checkpoint.every_steps=5",
  "--config.checkpoint.max_to_keep=3",
  "--config.mesh.data=2",
  "--config.mesh.model=4",
  "--config.mesh.shard_min_rows=0",
]


def _env(**kw):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", SASS_PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  env.update(kw)
  return env


def _log(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "finetune_log.jsonl").read_text().splitlines()]


def test_launcher_fails_when_processes_fail(tmp_path):
  r = subprocess.run(
    [
      "launch/multiprocess_local.sh",
      "2",
      "configs/test.py",
      "--workdir",
      str(tmp_path / "wd"),
      "--config.no_such_key=1",
    ],
    cwd=REPO,
    env=_env(MP_LOG_DIR=str(tmp_path / "logs")),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert r.returncode != 0
  assert "exited with status" in r.stderr
  assert "no_such_key" in (tmp_path / "logs" / "process_1.log").read_text()


def test_two_processes_match_one_process(tmp_path):
  mp_wd, sp_wd = tmp_path / "two_processes", tmp_path / "one_process"
  mp = subprocess.run(
    ["launch/multiprocess_local.sh", "2", "configs/test.py", "--workdir", str(mp_wd), *OVERRIDES],
    cwd=REPO,
    env=_env(DEVICES_PER_PROCESS="4", MP_LOG_DIR=str(tmp_path / "logs")),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert mp.returncode == 0, mp.stdout[-3000:] + mp.stderr[-5000:]
  for i in (0, 1):
    text = (tmp_path / "logs" / f"process_{i}.log").read_text()
    assert f"[process {i}/2]" in text and "finetune: finished 10 steps" in text, text[-3000:]
  sp = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(sp_wd),
      *OVERRIDES,
    ],
    cwd=REPO,
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert sp.returncode == 0, sp.stdout[-3000:] + sp.stderr[-5000:]

  # Only process 0 wrote the log: one line per step, not two.
  mp_log, sp_log = _log(mp_wd), _log(sp_wd)
  assert [r["step"] for r in mp_log] == list(range(1, 11))
  assert [r["step"] for r in sp_log] == list(range(1, 11))
  mp_loss, sp_loss = [r["loss"] for r in mp_log], [r["loss"] for r in sp_log]
  np.testing.assert_allclose(mp_loss, sp_loss, rtol=1e-5, atol=1e-5)
  assert len(set(np.round(sp_loss, 4))) > 5  # a real curve, not a constant

  # Both checkpoints are complete and hold the same parameters.
  from configs import test as test_config
  from sass_jax.checkpoint import Checkpointer
  from sass_jax.train import loop

  for wd in (mp_wd, sp_wd):
    with Checkpointer(wd / "checkpoints" / "finetune") as ck:
      assert ck.all_steps() == [5, 10]
    assert not list((wd / "checkpoints" / "finetune").glob("*tmp*"))
  cfg = test_config.get_config()
  cfg.pretrain.num_steps, cfg.train.num_steps = 0, 10
  cfg.mesh.data, cfg.mesh.model = 1, 1
  data = loop.prepare(cfg, mp_wd)
  model = loop.build_model(cfg, data)
  part = Partitioner(cfg.mesh, devices=jax.devices()[:1])
  v_mp = loop.restore_variables(cfg, mp_wd, "finetune", model, part, data)
  v_sp = loop.restore_variables(cfg, sp_wd, "finetune", model, part, data)
  leaves_mp, leaves_sp = jax.tree.leaves(v_mp), jax.tree.leaves(v_sp)
  assert len(leaves_mp) == len(leaves_sp) > 0
  for a, b in zip(leaves_mp, leaves_sp):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
