"""Runs that survive crashes, preemption and bad numbers (docs/design.md §6: checkpoints).

Every run here is the same fine-tuning command (tiny config, 40 steps, a checkpoint every 4,
dropout on so the saved rng matters) in different workdirs; an interrupted and resumed run must
end with bitwise the final state of an uninterrupted one. The subprocesses share a persistent
JAX compilation cache (only to save time: a cached executable is the same program).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from sass_jax.checkpoint import Checkpointer
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
NUM_STEPS, EVERY = 40, 4
ARGS = [
  "--config",
  "configs/test.py:sass_base",
  "--mode",
  "finetune",
  f"--config.data.dir={DATA}",
  f"--config.train.num_steps={NUM_STEPS}",
  f"--config.checkpoint.every_steps={EVERY}",
  "--config.train.log_every=2",
  "--config.model.dropout=0.1",
]


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "sass_jax.main", "--workdir", str(workdir), *ARGS, *extra]


def _run(workdir, env, *extra, check=True):
  r = subprocess.run(
    _cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  if check:
    assert r.returncode == 0, r.stderr[-4000:]
  return r


def _ckpt_dir(workdir):
  return Path(workdir) / "checkpoints" / "finetune"


def _steps_on_disk(workdir) -> list[int]:
  d = _ckpt_dir(workdir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _state(workdir, step=None) -> dict:
  """The raw saved TrainState tree (params, opt_state, step, rng, model_state) of a step, read
  with orbax as NumPy arrays (whatever devices saved it)."""
  step = step if step is not None else _steps_on_disk(workdir)[-1]
  path = _ckpt_dir(workdir) / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  args = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ckptr.metadata(path).item_metadata.tree
  )
  return ckptr.restore(path, restore_args=args)


def _assert_bitwise_equal(a: dict, b: dict):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  assert len(la) > 10
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def _losses(workdir) -> dict[int, float]:
  lines = (Path(workdir) / "finetune_log.jsonl").read_text().splitlines()
  return {json.loads(l)["step"]: json.loads(l)["loss"] for l in lines}


def _last_logged_step(workdir) -> int:
  p = Path(workdir) / "finetune_log.jsonl"
  if not p.exists():
    return 0
  steps = [json.loads(l)["step"] for l in p.read_text().splitlines() if l.endswith("}")]
  return max(steps, default=0)


def _start_and_wait(workdir, env, until_step: int) -> subprocess.Popen:
  """Start the command; return once it has logged a step >= until_step (still running)."""
  proc = subprocess.Popen(
    _cmd(workdir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.time() + 240
  while _last_logged_step(workdir) < until_step:
    assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-3000:]}"
    assert time.time() < deadline, "run too slow"
    time.sleep(0.01)
  return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
  """An uninterrupted run: workdir with the final checkpoint at NUM_STEPS."""
  wd = tmp_path_factory.mktemp("reference")
  _run(wd, env)
  assert _steps_on_disk(wd)[-1] == NUM_STEPS
  return wd


def test_sigkill_then_rerun_is_bitwise_exact(reference, env, tmp_path):
  target = random.Random().randint(EVERY + 1, NUM_STEPS - 8)  # after >= 1 checkpoint
  proc = _start_and_wait(tmp_path, env, target)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  killed_at = _steps_on_disk(tmp_path)
  assert killed_at and killed_at[-1] < NUM_STEPS, (target, killed_at)
  r = _run(tmp_path, env)
  assert f"resumed from step {killed_at[-1]}" in r.stderr
  _assert_bitwise_equal(_state(tmp_path), _state(reference))
  # The log of the resumed run has every step once, with the reference's losses.
  assert _losses(tmp_path) == _losses(reference), target


def test_sigterm_checkpoints_exits_zero_and_resumes(reference, env, tmp_path):
  proc = _start_and_wait(tmp_path, env, 2 * EVERY)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  stopped = _steps_on_disk(tmp_path)[-1]
  assert 2 * EVERY <= stopped < NUM_STEPS
  assert f"stopped by a preemption signal after step {stopped};" in err
  with Checkpointer(_ckpt_dir(tmp_path)) as ck:
    assert ck.latest_step() == stopped
  assert int(_state(tmp_path)["step"]) == stopped
  r = _run(tmp_path, env)
  assert f"resumed from step {stopped} " in r.stderr
  _assert_bitwise_equal(_state(tmp_path), _state(reference))


def test_unreadable_latest_checkpoint_falls_back(reference, env, tmp_path, caplog):
  wd = tmp_path / "wd"
  shutil.copytree(reference, wd)
  older, latest = _steps_on_disk(wd)[-2:]
  assert (older, latest) == (NUM_STEPS - EVERY, NUM_STEPS)
  # A save that "completed" but whose array data is gone (disk trouble after the rename).
  for f in (_ckpt_dir(wd) / str(latest) / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()
  cfg = test_config.get_config("sass_base")
  with caplog.at_level(logging.WARNING, logger="sass_jax"), Checkpointer(_ckpt_dir(wd)) as ck:
    assert ck.latest_step() == latest
    from sass_jax.data import store
    from sass_jax.partition import Partitioner
    from sass_jax.train import steps

    data = store.open_store(wd / "data")
    part = Partitioner(cfg.mesh)
    init = steps.make_init_fn(
      loop.build_model(cfg, data), steps.make_optimizer(cfg.train, 40), loop.example_batch(data), 0
    )
    abstract, _ = part.abstract_state(init)
    params = ck.restore_params(abstract.params)
    assert ck.unreadable_steps == [latest]
  assert f"checkpoint step {latest} in {_ckpt_dir(wd)} could not be restored" in caplog.text
  assert f"falling back to step {older}" in caplog.text
  _assert_bitwise_equal(jax.device_get(params), _state(reference, older)["params"])
  # Rerunning the command resumes from the older step, sets the unreadable one aside and
  # ends where the reference ended.
  r = _run(wd, env)
  assert f"resumed from step {older} " in r.stderr
  assert (_ckpt_dir(wd) / f"{latest}.unreadable").is_dir()
  _assert_bitwise_equal(_state(wd), _state(reference))


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(env, tmp_path):
  r = _run(tmp_path, env, "--config.train.debug_nan_at_step=7", check=False)
  assert r.returncode != 0
  assert "FloatingPointError: finetune step 7: non-finite loss (nan;" in r.stderr
  assert f"the last checkpoint (step {EVERY}) in {_ckpt_dir(tmp_path)}" in r.stderr
  assert _steps_on_disk(tmp_path) == [EVERY]
  st = _state(tmp_path)
  assert int(st["step"]) == EVERY
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(st["params"]))
  assert max(_losses(tmp_path)) == 6  # steps 2, 4, 6 logged; nothing at or after step 7


def _inprocess_cfg(**train):
  cfg = test_config.get_config("sass_base")
  cfg.data.dir = str(DATA)
  cfg.train.num_steps = 6
  cfg.train.log_every = 1
  cfg.checkpoint.every_steps = 1
  cfg.checkpoint.max_to_keep = None
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


def test_skip_policy_discards_the_bad_update(tmp_path):
  cfg = _inprocess_cfg(nan_policy="skip", debug_nan_at_step=3)
  loop.train(cfg, tmp_path, stages=("finetune",), evaluate=False, show_progress=False)
  logs = [json.loads(l) for l in (tmp_path / "finetune_log.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logs] == [1, 2, 3, 4, 5, 6]
  assert [m["skipped_steps"] for m in logs] == [0, 0, 1, 1, 1, 1]
  assert np.isnan(logs[2]["loss"]) and all(np.isfinite(m["loss"]) for m in logs if m["step"] != 3)
  s2, s3, s4 = (_state(tmp_path, s) for s in (2, 3, 4))
  _assert_bitwise_equal(s3["params"], s2["params"])  # step 3's update discarded
  _assert_bitwise_equal(s3["opt_state"], s2["opt_state"])
  assert int(s3["step"]) == 3 and not np.array_equal(np.asarray(s3["rng"]), np.asarray(s2["rng"]))
  assert not all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s3["params"]))
  )
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_state(tmp_path)["params"]))


def test_skip_policy_raises_after_max_consecutive_skips(tmp_path):
  # Without warm-up, lr 1e30 overflows the parameter norm at every update: every step skipped.
  cfg = _inprocess_cfg(nan_policy="skip", max_skips=3, learning_rate=1e30, warmup_steps=0)
  with pytest.raises(
    FloatingPointError, match=r"finetune step 3: 3 consecutive steps with a non-finite param_norm"
  ):
    loop.train(cfg, tmp_path, stages=("finetune",), evaluate=False, show_progress=False)
  # Skipped steps keep the initial (finite) parameters; steps 1 and 2 were saved with them.
  assert _steps_on_disk(tmp_path) == [1, 2]
  _assert_bitwise_equal(_state(tmp_path, 2)["params"], _state(tmp_path, 1)["params"])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_state(tmp_path)["params"]))


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(env, tmp_path):
  """Two JAX processes (jax.distributed on localhost, one CPU device each, mesh data=2): SIGTERM
  to process 1 only -> JAX's preemption service agrees on a step, both save it and exit 0."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  wd = tmp_path / "wd"
  env2 = {k: v for k, v in env.items() if k != "SASS_DISTRIBUTED"}
  env2["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "sass_jax.main",
        "--workdir",
        str(wd),
        *ARGS,
        "--config.mesh.data=2",
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        "2",
        "--process_id",
        str(i),
      ],
      cwd=REPO,
      env=env2,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    deadline = time.time() + 240
    while _last_logged_step(wd) < 2 * EVERY:
      assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
      assert time.time() < deadline, "run too slow"
      time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=180)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], errs[1][-3000:]
  stopped = _steps_on_disk(wd)[-1]
  assert 2 * EVERY <= stopped < NUM_STEPS
  for e in errs:
    assert f"stopped by a preemption signal after step {stopped};" in e
  assert int(_state(wd)["step"]) == stopped
