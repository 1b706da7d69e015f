"""sass_jax.config_check.validate: every inconsistent value is rejected before any work, with a
message naming the field and what to set (docs/design.md §6)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from configs import test as test_config
from sass_jax import config_check
from sass_jax.checkpoint import Checkpointer
from sass_jax.model import registry
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"


def _cfg(arg="sass"):
  c = test_config.get_config(arg)
  c.data.dir = str(DATA)
  return c


def _set(cfg, path, value):
  node = cfg
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value


# (dotted field, value, exact problem line)
_N = jax.device_count()  # a data axis of _N + 2 never fits the devices there are
CASES = [
  (
    "train.num_steps",
    0,
    "config.train.num_steps=0: fine-tuning needs at least 1 step; set "
    "config.train.num_steps > 0 (or use --mode pretrain to pre-train only)",
  ),
  (
    "pretrain.num_steps",
    -5,
    "config.pretrain.num_steps=-5: expected an int >= 0 (0 = no pre-training)",
  ),
  (
    "train.learning_rate",
    -1e-3,
    "config.train.learning_rate=-0.001: expected a finite value > 0, e.g. 1e-3",
  ),
  (
    "pretrain.learning_rate",
    0.0,
    "config.pretrain.learning_rate=0.0: expected a finite value > 0, e.g. 1e-3",
  ),
  ("model.tau", 0.0, "config.model.tau=0.0: the score temperature must be > 0, e.g. 0.05"),
  ("pretrain.tau", -0.1, "config.pretrain.tau=-0.1: the InfoNCE temperature must be > 0, e.g. 0.1"),
  (
    "data.split",
    (0.8, 0.1, 0.2),
    "config.data.split=(0.8, 0.1, 0.2) sums to 1.1: the train / "
    "valid / test fractions must sum to 1, e.g. (0.8, 0.1, 0.1)",
  ),
  (
    "data.split",
    (0.9, 0.1),
    "config.data.split=(0.9, 0.1): expected 3 non-negative fractions "
    "(train, valid, test), e.g. (0.8, 0.1, 0.1)",
  ),
  ("eval.split", "train", "config.eval.split='train': expected one of ('valid', 'test')"),
  ("eval.mask", "none", "config.eval.mask='none': expected one of ('train', 'train_valid')"),
  ("eval.corpus", "domain", "config.eval.corpus='domain': expected one of ('all', 'scenario')"),
  (
    "eval.ks",
    (20, 0, 100),
    "config.eval.ks=(20, 0, 100): expected a non-empty tuple of positive ints, e.g. (20, 50, 100)",
  ),
  (
    "mesh.data",
    0,
    "config.mesh.data=0: expected a positive int or -1 (= all devices the other axis leaves)",
  ),
  (
    "mesh.model",
    -1,
    "config.mesh.data=-1 and config.mesh.model=-1: at most one axis can be "
    "-1; set the other to a device count",
  ),
  (
    "mesh.data",
    _N + 2,
    f"mesh data={_N + 2} x model=1 = {_N + 2} devices, but {_N} are "
    "available; set config.mesh.data / model (-1 = the rest)",
  ),
  (
    "checkpoint.every_steps",
    0,
    "config.checkpoint.every_steps=0: expected an int >= 1 (a "
    "checkpoint is also written at the last step)",
  ),
  (
    "checkpoint.max_to_keep",
    0,
    "config.checkpoint.max_to_keep=0: expected an int >= 1 (keep "
    "at least the latest checkpoint) or None (keep all)",
  ),
  (
    "model.name",
    "sas",
    f"config.model.name='sas' is not a known model; expected one of {sorted(registry.names())}",
  ),
  (
    "model.dropout",
    1.0,
    "config.model.dropout=1.0: expected a rate in [0, 1), e.g. 0.1 (0 = none)",
  ),
  ("model.widths", (32, 0), "config.model.widths=(32, 0): expected positive ints, e.g. (256, 128)"),
  (
    "model.gate_style",
    "lstm",
    "config.model.gate_style='lstm': expected one of ('gated_sum', 'gru', 'none')",
  ),
  (
    "train.nan_policy",
    "ignore",
    "config.train.nan_policy='ignore': expected one of ('raise', 'skip')",
  ),
  ("train.log_every", 0, "config.train.log_every=0: expected an int >= 1"),
  ("data.name", "movielenz", "config.data.name='movielenz'; expected one of"),
  (
    "data.duplicates",
    "drop",
    "config.data.duplicates='drop': expected one of ('error', 'first', 'last', 'max', 'keep')",
  ),
  # found by a fresh-user check: a bad on_error surfaced only when the data were read, alone
  # and without the 'invalid config:' of the other checks
  (
    "data.on_error",
    "maybe",
    "config.data.on_error='maybe': expected one of ('strict', 'skip')",
  ),
  (
    "compile.embedding_optimizers",
    ("dense", "adamz"),
    "config.compile.embedding_optimizers=('dense', 'adamz'): expected a subset of",
  ),
]


@pytest.mark.parametrize("path,value,message", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_invalid_value_is_rejected_with_its_message(path, value, message):
  cfg = _cfg()
  _set(cfg, path, value)
  with pytest.raises(ValueError, match=r"invalid config:( |\n(.*\n)*  - )" + re.escape(message)):
    config_check.validate(cfg)


def test_shipped_configs_are_valid():
  names = [
    p.stem
    for p in (REPO / "configs").glob("*.py")
    if not p.stem.startswith("_") and p.stem != "base"
  ]  # base: no data set
  assert {"movielens", "test"} <= set(names)
  for name in names:
    mod = importlib.import_module(f"configs.{name}")
    config_check.validate(mod.get_config())  # raises on a problem


def test_every_problem_is_listed():
  cfg = _cfg()
  cfg.train.learning_rate = -1.0
  cfg.model.tau = -1.0
  cfg.eval.split = "dev"
  with pytest.raises(ValueError) as ei:
    config_check.validate(cfg)
  lines = str(ei.value).splitlines()
  assert lines[0] == "invalid config:" and len(lines) == 4
  assert [l.split("=")[0] for l in lines[1:]] == [
    "  - config.model.tau",
    "  - config.train.learning_rate",
    "  - config.eval.split",
  ]


def test_finetune_steps_only_matter_when_finetuning():
  cfg = _cfg()
  cfg.train.num_steps = 0
  config_check.validate(cfg, stages=("pretrain",))  # pre-training only: fine
  with pytest.raises(ValueError, match=r"config\.train\.num_steps=0"):
    config_check.validate(cfg, stages=("finetune",))


def test_batch_not_divisible_by_data_axis():
  cfg = _cfg()
  cfg.train.batch_size = 100
  part = SimpleNamespace(data_size=8)
  with pytest.raises(
    ValueError,
    match=re.escape(
      "config.train.batch_size=100 is not divisible by the mesh's data axis (8 devices); set it "
      "to a multiple of 8, e.g. 104"
    ),
  ):
    config_check.validate(cfg, partitioner=part)
  cfg.train.batch_size = 96
  cfg.pretrain.batch_size = 60
  with pytest.raises(ValueError, match=re.escape("config.pretrain.batch_size=60 is not")):
    config_check.validate(cfg, partitioner=part)
  cfg.pretrain.num_steps = 0  # pre-training off: its batch size no longer matters
  config_check.validate(cfg, partitioner=part)


def _fake_data(k=3, items=3312):
  return SimpleNamespace(
    num_scenarios=k, scenario_names=[f"s{i}" for i in range(k)], num_items=items
  )


def test_scenario_count_of_data_and_config_must_agree():
  cfg = _cfg()
  config_check.validate(cfg, data=_fake_data(3))
  cfg.data.num_scenarios = 4  # a data setting that states K (configs/synthetic.py)
  with pytest.raises(
    ValueError,
    match=re.escape(
      "config.data.num_scenarios=4 but the prepared data has 3 scenarios (s0, s1, s2); set "
      "config.data.num_scenarios=3 or prepare the data again (--mode prepare)"
    ),
  ):
    config_check.validate(cfg, data=_fake_data(3))


def test_pretraining_needs_two_scenarios_and_ks_fit_the_items():
  cfg = _cfg()
  with pytest.raises(
    ValueError,
    match=re.escape(
      "config.pretrain.num_steps=20: pre-training contrasts scenarios and needs at least 2, but "
      "the data has 1; set config.pretrain.num_steps=0"
    ),
  ):
    config_check.validate(cfg, data=_fake_data(1))
  config_check.validate(cfg, data=_fake_data(1), stages=("finetune",))
  with pytest.raises(
    ValueError,
    match=re.escape(
      "config.eval.ks=(20, 50, 100): [50, 100] exceed the 40 items of the data; use values <= 40"
    ),
  ):
    config_check.validate(cfg, data=_fake_data(3, items=40))


def _save_checkpoint(workdir, stage, cfg):
  state = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.int32(5)}
  with Checkpointer(Path(workdir) / "checkpoints" / stage) as ck:
    ck.save(5, state, metadata={"stage": stage, "config": cfg.to_dict()})


def test_checkpoint_of_a_different_model_shape_is_rejected(tmp_path):
  saved = _cfg()
  _save_checkpoint(tmp_path, "finetune", saved)
  cfg = _cfg()
  cfg.model.tau = 0.7  # not a shape: resuming with another temperature is fine
  cfg.model.dropout = 0.2
  cfg.train.learning_rate = 1e-2
  config_check.validate(cfg, workdir=tmp_path)
  cfg.model.embed_dim = 4
  cfg.model.widths = (32, 32)
  with pytest.raises(ValueError) as ei:
    config_check.validate(cfg, workdir=tmp_path)
  assert (
    f"{tmp_path}/checkpoints/finetune holds a checkpoint (step 5) of a different model or "
    "data: config.model.embed_dim: 8 -> 4; config.model.widths: (32, 16) -> (32, 32). Set "
    "these back to the saved values to resume or evaluate it, or use a new --workdir"
  ) in str(ei.value)
  cfg = _cfg("sass_base")  # same model class as 'sass': same parameters
  config_check.validate(cfg, workdir=tmp_path)
  cfg.model.name = "dssm_mixed"
  with pytest.raises(ValueError, match=re.escape("config.model.name: 'sass' -> 'dssm_mixed'")):
    config_check.validate(cfg, workdir=tmp_path)
  cfg = _cfg()
  cfg.data.min_count = 5  # changes the vocabularies
  with pytest.raises(ValueError, match=re.escape("config.data.min_count: 1 -> 5")):
    config_check.validate(cfg, workdir=tmp_path)


def test_train_validates_before_preparing(tmp_path):
  cfg = _cfg()
  cfg.train.learning_rate = -1.0
  with pytest.raises(ValueError, match=r"config\.train\.learning_rate=-1\.0"):
    loop.train(cfg, tmp_path / "wd")
  assert not (tmp_path / "wd" / "data").exists()


def _cli(tmp_path, *args):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(tmp_path),
      "--mode",
      "train",
      *args,
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO), SASS_DISTRIBUTED="0"),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_rejects_unknown_key_and_invalid_value(tmp_path):
  r = _cli(tmp_path, "--config.train.nan_polcy=skip")
  assert r.returncode != 0 and "nan_polcy" in r.stderr
  r = _cli(tmp_path, "--config.checkpoint.every_steps=-2", "--config.eval.mask=all")
  assert r.returncode != 0
  assert "config.checkpoint.every_steps=-2: expected an int >= 1" in r.stderr
  assert "config.eval.mask='all': expected one of ('train', 'train_valid')" in r.stderr
  assert not (tmp_path / "data").exists()  # rejected before any work
