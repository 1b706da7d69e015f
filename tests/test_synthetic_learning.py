"""SASS learns planted scenario-specific structure that one shared tower cannot (docs/design.md §3, §4)."""

import numpy as np
import pytest

from configs import synthetic
from configs import test as test_config
from sass_jax.train import loop


def _cfg(model_name):
  c = synthetic.get_config("sass_base")
  c.model = test_config.get_config("sass_base").model
  c.model.name = "sass" if model_name == "sass_base" else model_name  # SASS-Base: no stage 1
  c.model.tau = 0.2
  c.data.num_rows, c.data.num_users, c.data.num_items = 50_000, 2_000, 1_000
  c.train.num_steps, c.train.batch_size, c.train.warmup_steps = 300, 256, 20
  c.checkpoint.every_steps = 10_000
  return c


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return {
    name: loop.train(_cfg(name), tmp_path_factory.mktemp(name), show_progress=False)
    for name in ("sass_base", "dssm_mixed")
  }


def test_shared_tower_has_one_vector_for_all_scenarios(tmp_path):
  cfg = _cfg("dssm_mixed")
  data = loop.prepare(cfg, tmp_path)
  model = loop.build_model(cfg, data)
  feats = loop.example_batch(data)
  params = model.init(
    __import__("jax").random.key(0), feats["user"], feats["item"], feats["scenario"]
  )
  v = np.asarray(model.apply(params, feats["item"], None, method="encode_item"))
  assert v.shape == (2, data.num_scenarios, cfg.model.out_dim)
  np.testing.assert_array_equal(v[:, 0], v[:, 1])


def test_sass_beats_shared_tower_in_every_scenario(results):
  sass, shared = results["sass_base"], results["dssm_mixed"]
  for name in sass["scenarios"]:
    assert sass["scenarios"][name]["recall@50"] > shared["scenarios"][name]["recall@50"], name
  assert sass["overall"]["recall@50"] >= 1.1 * shared["overall"]["recall@50"], (
    sass["overall"],
    shared["overall"],
  )
