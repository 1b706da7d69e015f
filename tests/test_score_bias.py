"""SASS's score biases (``config.model.score_bias``; docs/design.md §1, "score biases"): the
appended dimensions give <r_u', r_i'> / tau = <r_u, r_i> / tau + b_u + c_i in every layout
and compute mode, start as a no-op, are trained by the labelled BCE, and only SASS accepts
them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sass_jax.model import registry
from sass_jax.model.towers import SASS
from sass_jax.train import losses, steps

TAU = 0.2


def _params(model, user, item, scen):
  return nn.meta.unbox(model.init(jax.random.key(0), user, item, jnp.asarray(scen))["params"])


def _batch(user, item, scen) -> dict:
  ids = {"user_index": user["user_id"], "item_index": item["movie_id"]}
  return {"user": user, "item": item, "scenario": scen, **ids}


@pytest.mark.parametrize("compute", ["grouped", "onehot"])
def test_vectors_gain_the_two_bias_dimensions(tiny_cfg, tiny_features, compute):
  user, item = tiny_features(7, seed=1)
  scen = np.array([0, 1, 2, 2, 0, 1, 1], np.int32)
  plain = SASS(tiny_cfg(tau=TAU, scenario_compute=compute))
  model = SASS(tiny_cfg(tau=TAU, scenario_compute=compute, score_bias=True))
  p = _params(model, user, item, scen)
  # the plain model's parameters are the biased one's without the two score_bias layers
  p0 = jax.tree.map(lambda x: x, p)
  for side in ("user_tower", "item_tower"):
    assert p0[side].pop("score_bias")["kernel"].shape == (6, 1)
  assert jax.tree.structure(p0) == jax.tree.structure(_params(plain, user, item, scen))
  # random bias weights, so b and c are not zero
  r = np.random.default_rng(0)
  for side in ("user_tower", "item_tower"):
    p[side]["score_bias"] = {
      "kernel": jnp.asarray(r.normal(size=(6, 1)), jnp.float32),
      "bias": jnp.asarray(r.normal(size=(1,)), jnp.float32),
    }
  u = np.asarray(model.apply({"params": p}, user, scen, method="encode_user"))
  i = np.asarray(model.apply({"params": p}, item, scen, method="encode_item"))
  u0 = np.asarray(plain.apply({"params": p0}, user, scen, method="encode_user"))
  i0 = np.asarray(plain.apply({"params": p0}, item, scen, method="encode_item"))
  assert u.shape == (7, 7) and u0.shape == (7, 5)
  np.testing.assert_allclose(u[:, :5], u0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(i[:, :5], i0, rtol=1e-6, atol=1e-6)
  sq = np.sqrt(TAU)
  np.testing.assert_allclose(u[:, 6], sq, rtol=1e-6)  # user: [sqrt(tau) b_u, sqrt(tau)]
  np.testing.assert_allclose(i[:, 5], sq, rtol=1e-6)  # item: [sqrt(tau), sqrt(tau) c_i]
  b, c = u[:, 5] / sq, i[:, 6] / sq
  assert np.std(b) > 1e-3 and np.std(c) > 1e-3
  score = (u * i).sum(-1) / TAU
  np.testing.assert_allclose(score, (u0 * i0).sum(-1) / TAU + b + c, rtol=1e-5, atol=1e-5)
  # the all-scenarios layout holds the same vectors at each row's scenario
  ua = np.asarray(model.apply({"params": p}, user, None, method="encode_user"))
  ia = np.asarray(model.apply({"params": p}, item, None, method="encode_item"))
  assert ua.shape == (7, 3, 7)
  np.testing.assert_allclose(ua[np.arange(7), scen], u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ia[np.arange(7), scen], i, rtol=1e-5, atol=1e-6)


def test_biases_start_at_zero_and_the_bce_trains_them(tiny_cfg, tiny_features):
  model = SASS(tiny_cfg(tau=TAU, score_bias=True))
  user, item = tiny_features(8, seed=2)
  scen = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  p = _params(model, user, item, scen)
  u = model.apply({"params": p}, user, scen, method="encode_user")
  i = model.apply({"params": p}, item, scen, method="encode_item")
  np.testing.assert_array_equal(np.asarray(u[:, 5]), 0.0)  # b_u = 0 at initialisation
  np.testing.assert_array_equal(np.asarray(i[:, 6]), 0.0)  # c_i = 0
  lab = {"user": user, "item": item, "scenario": scen, "label": np.ones(8, np.float32)}

  def bce(params):
    uu = model.apply({"params": params}, lab["user"], lab["scenario"], method="encode_user")
    ii = model.apply({"params": params}, lab["item"], lab["scenario"], method="encode_item")
    return losses.labelled_bce(uu, ii, jnp.asarray(lab["label"]), TAU)

  g = jax.grad(bce)(p)
  for side in ("user_tower", "item_tower"):
    # all labels 1: raising either bias lowers the loss, so its bias gradient is negative
    assert float(g[side]["score_bias"]["bias"][0]) < -1e-3
  # the in-batch softmax ignores b_u (a constant per row) but not c_i
  batch = {**_batch(user, item, scen), "item_logq": np.zeros(8, np.float32)}
  rng = jax.random.key_data(jax.random.key(1))
  gs = jax.grad(lambda q: steps.finetune_loss(model, q, batch, rng, TAU, 0.0)[0])(p)
  assert abs(float(gs["user_tower"]["score_bias"]["bias"][0])) < 1e-6
  assert np.abs(np.asarray(gs["item_tower"]["score_bias"]["kernel"])).max() > 1e-6


def test_only_sass_accepts_score_bias():
  cfg = ml_collections.ConfigDict({"name": "star", "score_bias": True})
  problems = registry.config_problems(cfg)
  assert any("config.model.score_bias" in p for p in problems), problems
  cfg.score_bias = False
  assert not any("score_bias" in p for p in registry.config_problems(cfg))


@pytest.mark.parametrize("compute", ["grouped", "onehot"])
def test_scenario_view_pretraining_compares_unit_vectors_only(tiny_cfg, tiny_features, compute):
  """Two views of one user are compared without the appended bias dimensions: the loss equals
  the plain model's (the old code added tau * b_1 * b_2 + tau to every user-user score)."""
  user, item = tiny_features(6, seed=4)
  scen = np.array([0, 1, 2, 0, 1, 2], np.int32)
  plain = SASS(tiny_cfg(tau=TAU, scenario_compute=compute))
  model = SASS(tiny_cfg(tau=TAU, scenario_compute=compute, score_bias=True))
  p = _params(model, user, item, scen)
  p0 = jax.tree.map(lambda x: x, p)
  r = np.random.default_rng(1)
  for side in ("user_tower", "item_tower"):
    p0[side].pop("score_bias")
    p[side]["score_bias"] = {
      "kernel": jnp.asarray(100 * r.normal(size=(6, 1)), jnp.float32),
      "bias": jnp.asarray(r.normal(size=(1,)), jnp.float32),
    }
  batch = {
    **_batch(user, item, scen),
    "user_views": np.array([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1]], np.int32),
    "item_views": np.array([[1, 0], [2, 1], [0, 2], [2, 0], [0, 1], [1, 2]], np.int32),
  }
  rng = jax.random.key_data(jax.random.key(2))
  got = steps.pretrain_loss(model, p, batch, rng, TAU, "scenario_views")[0]
  want = steps.pretrain_loss(plain, p0, batch, rng, TAU, "scenario_views")[0]
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
