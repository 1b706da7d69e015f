"""Training with the device-resident sampler (``config.train.resident_on_device``).

Both stages of SASS run from ``data.resident.ResidentSampler``; the checkpoint records the
sampler's position, so a run resumed from an earlier checkpoint ends bitwise equal to an
uninterrupted one; a checkpoint written by the other sampler is refused with a clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"


def _cfg(resident: bool = True):
  cfg = test_config.get_config("sass")
  cfg.data.dir = str(DATA)
  cfg.pretrain.num_steps = 6
  cfg.train.num_steps = 12
  cfg.train.log_every = 2
  cfg.checkpoint.every_steps = 6
  cfg.model.dropout = 0.1  # the saved rng matters too
  cfg.train.resident_on_device = resident
  return cfg


def _state(workdir: Path, stage: str, step: int) -> dict:
  path = workdir / "checkpoints" / stage / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  args = jax.tree.map(
    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), ckptr.metadata(path).item_metadata.tree
  )
  return ckptr.restore(path, restore_args=args)


def _data_state(workdir: Path, stage: str, step: int) -> dict:
  d = workdir / "checkpoints" / stage / str(step) / "data_state"
  return json.loads(next(p for p in d.iterdir() if p.is_file()).read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("resident_full")
  metrics = loop.train(_cfg(), wd, show_progress=False)
  return wd, metrics


def test_both_stages_train_from_the_resident_sampler(full_run):
  wd, metrics = full_run
  assert _data_state(wd, "pretrain", 6) == {"sampler": "resident", "next_index": 6}
  assert _data_state(wd, "finetune", 12) == {"sampler": "resident", "next_index": 12}
  losses = [json.loads(l)["loss"] for l in (wd / "finetune_log.jsonl").read_text().splitlines()]
  assert len(losses) == 6 and np.isfinite(losses).all()
  assert metrics["checkpoint_step"] == 12 and 0.0 <= metrics["overall"]["recall@50"] <= 1.0


def test_resumed_run_is_bitwise_equal(full_run, tmp_path):
  wd, _ = full_run
  resumed = tmp_path / "resumed"
  shutil.copytree(wd, resumed)
  shutil.rmtree(resumed / "checkpoints" / "finetune" / "12")  # as if killed after step 6
  loop.train(_cfg(), resumed, show_progress=False, evaluate=False)
  a, b = _state(wd, "finetune", 12), _state(resumed, "finetune", 12)
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb] and len(la) > 10
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  # Had the position not been restored, steps 7-12 would have reused batches 0-5.
  assert _data_state(resumed, "finetune", 12) == {"sampler": "resident", "next_index": 12}


def test_switching_sampler_on_resume_is_refused(full_run, tmp_path):
  wd, _ = full_run
  other = tmp_path / "other"
  shutil.copytree(wd, other)
  shutil.rmtree(other / "checkpoints" / "finetune" / "12")
  with pytest.raises(
    ValueError,
    match=r"step 6 was written with config.train.resident_on_device"
    r"=True.*--config.train.resident_on_device=True",
  ):
    loop.train(_cfg(resident=False), other, show_progress=False, evaluate=False)
