"""configs/base.py holds every key; each data set's config has exactly its keys (config.data
aside); 'sass_base' is a config variant; old saved configs are read through config_migrate."""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import pytest

from configs import base
from configs import test as test_config
from sass_jax import config_check
from sass_jax.checkpoint import Checkpointer
from sass_jax.config_migrate import FALLBACKS, migrate
from sass_jax.data import get_preparer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
CONFIGS = sorted(
  p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_") and p.stem != "base"
)


def _keys(d: dict, prefix: str = "") -> set[str]:
  """Dotted paths of every leaf of a nested dict, ``config.data`` left out."""
  out = set()
  for k, v in d.items():
    path = f"{prefix}{k}"
    if path == "data":
      continue
    out |= _keys(v, path + ".") if isinstance(v, dict) else {path}
  return out


BASE_KEYS = _keys(base.get_config().to_dict())


def test_configs_directory_is_covered():
  assert {
    "movielens",
    "douban",
    "douban_sample",
    "amazon_sports_clothing",
    "mind",
    "kuairand",
    "aliccp",
    "aliccp_scale",
    "synthetic",
    "table_example",
    "pod_scale",
    "test",
  } <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["sass", "sass_base"])
def test_config_has_base_keys_and_locks(name, arg):
  cfg = importlib.import_module(f"configs.{name}").get_config(arg)
  keys = _keys(cfg.to_dict())
  assert keys == BASE_KEYS, (
    f"configs/{name}.py: missing {sorted(BASE_KEYS - keys)}, unknown {sorted(keys - BASE_KEYS)}"
  )
  assert get_preparer(cfg.data.name) is not None and cfg.data.name  # its own data block
  assert cfg.model.name == "sass"  # never 'sass_base'
  if arg == "sass_base":
    assert cfg.pretrain.num_steps == 0
  cfg.lock()  # as main.py loads it (lock_config=True)
  with pytest.raises(AttributeError):
    cfg.train.nan_polcy = "skip"
  with pytest.raises(AttributeError):
    cfg.data.no_such_key = 1
  cfg.train.nan_policy = "skip"  # known keys stay settable


def test_apply_model_arg():
  c = base.get_config()
  assert c.model.name == "sass" and c.pretrain.num_steps == 600
  assert base.apply_model_arg(c, "dssm_mixed") is c
  assert c.model.name == "dssm_mixed" and c.pretrain.num_steps == 600
  base.apply_model_arg(c, "sass_base")
  assert c.model.name == "sass" and c.pretrain.num_steps == 0
  b = base.get_config("sass_base")
  assert (b.model.name, b.pretrain.num_steps) == ("sass", 0)


def test_bench_block_in_base():
  b = base.get_config().bench
  assert b.steps == 20 and b.warmup == 3 and tuple(b.stages) == ("pretrain", "finetune")


def _old_saved_config() -> dict:
  """The config an older version saved: keys added since missing, model name 'sass_base'."""
  saved = json.loads(json.dumps(test_config.get_config("sass_base").to_dict()))
  saved["model"]["name"] = "sass_base"
  for block, key in (
    ("model", "scenario_compute"),
    ("model", "tower_widths"),
    ("model", "star_momentum"),
    ("train", "negatives"),
    ("train", "embedding_optimizer"),
    ("pretrain", "warmup_steps"),
    ("pretrain", "weight_decay"),
    ("eval", "corpus"),
    ("eval", "fallback"),
    ("mesh", "table_layout"),
  ):
    del saved[block][key]
  del saved["bench"], saved["recommend"]
  return saved


def test_migrate_fills_fallbacks_and_renames_sass_base():
  old = _old_saved_config()
  before = copy.deepcopy(old)
  new = migrate(old)
  assert old == before  # the input is not changed
  assert new["model"]["name"] == "sass" and new["pretrain"]["num_steps"] == 0
  assert new["model"]["scenario_compute"] == "grouped" and new["train"]["negatives"] == "all"
  assert new["model"]["tower_widths"] == (64,) and new["eval"]["corpus"] == "all"
  assert new["bench"]["steps"] == 20 and new["recommend"]["k"] == 10
  assert new["data"] == old["data"]
  # Every key of today's config is back; none is invented.
  assert _keys(new) == BASE_KEYS
  cfg = ml_collections.ConfigDict(new)
  cfg.data.dir = str(DATA)
  config_check.validate(cfg)  # a valid config again
  # Saved values are kept, not replaced by fallbacks.
  kept = _old_saved_config()
  kept["model"]["name"], kept["pretrain"]["num_steps"] = "sass_base", 7
  kept["train"]["logq_strength"] = 0.5
  got = migrate(kept)
  assert (got["pretrain"]["num_steps"], got["train"]["logq_strength"]) == (7, 0.5)
  with pytest.raises(TypeError, match="saved config"):
    migrate(["not", "a", "dict"])


def test_fallbacks_are_base_keys():
  assert set(FALLBACKS) <= BASE_KEYS


def test_checkpoint_with_an_old_saved_config_validates(tmp_path):
  cfg = test_config.get_config("sass_base")
  cfg.data.dir = str(DATA)
  state = {"params": {"w": jnp.ones((2, 3))}, "step": jnp.int32(5)}
  with Checkpointer(tmp_path / "checkpoints" / "finetune") as ck:
    ck.save(5, state, metadata={"stage": "finetune", "config": _old_saved_config()})
  config_check.validate(cfg, workdir=tmp_path)  # same model: migrated keys compare equal
  cfg.model.tower_widths = (32,)
  with pytest.raises(ValueError, match=re.escape("config.model.tower_widths: (64,) -> (32,)")):
    config_check.validate(cfg, workdir=tmp_path)
