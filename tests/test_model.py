"""Tests for sass_jax.model (docs/design.md §1): embeddings, ML-SAT layers, SASS towers, config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from sass_jax.model import registry
from sass_jax.model.embedding import FieldEmbedder
from sass_jax.model.mlsat import MLSATLayer, ScenarioDense
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.schema import FieldSpec

K = 3
NP_ACT = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _random_params(module, seed, *init_args):
  """Parameters of ``module`` with the init's shapes and random normal values.

  Uses ``jax.eval_shape`` (no compilation of the initialisers, which is slow on CPU) and fills
  every leaf, zero-initialised biases included, with N(0, 0.5^2) values from NumPy.
  """
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *init_args))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _init_sass(cfg, user, item, seed=0):
  model = SASS(cfg)
  sc = np.zeros(len(user["user_id"]), np.int32)
  return model, _random_params(model, seed, user, item, sc)


# ----------------------------------------------------------------------------------------------
# SASS towers


@pytest.mark.parametrize("bias_mode,factor", [("add", 1), ("concat", 2)])
def test_tower_shapes_and_unit_norm(tiny_cfg, tiny_features, bias_mode, factor):
  cfg = tiny_cfg(bias_mode=bias_mode)
  B, D = 7, cfg.out_dim * factor
  user, item = tiny_features(B)
  model, params = _init_sass(cfg, user, item)
  sc = jnp.asarray([0, 1, 2, 0, 1, 2, 1], jnp.int32)
  for method, feats in ((SASS.encode_user, user), (SASS.encode_item, item)):
    sel = np.asarray(model.apply(params, feats, sc, method=method))
    allk = np.asarray(model.apply(params, feats, None, method=method))
    assert sel.shape == (B, D)
    assert allk.shape == (B, K, D)
    assert sel.dtype == np.float32 and allk.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sel, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(allk, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
  "gate_style,gate_per_scenario,bias_mode",
  [
    ("gated_sum", False, "add"),
    ("gated_sum", True, "concat"),
    ("gru", True, "add"),
    ("none", False, "concat"),
  ],
)
def test_all_scenarios_slice_equals_selected(
  tiny_cfg, tiny_features, gate_style, gate_per_scenario, bias_mode
):
  cfg = tiny_cfg(
    gate_style=gate_style, gate_per_scenario=gate_per_scenario, bias_mode=bias_mode, layer_norm=True
  )
  B = 6
  user, item = tiny_features(B, seed=1)
  model, params = _init_sass(cfg, user, item, seed=3)
  for method, feats in ((SASS.encode_user, user), (SASS.encode_item, item)):
    allk = np.asarray(model.apply(params, feats, None, method=method))
    for k in range(K):
      sel = np.asarray(model.apply(params, feats, jnp.full((B,), k, jnp.int32), method=method))
      np.testing.assert_allclose(allk[:, k], sel, atol=1e-6, rtol=0)
    # a mixed-scenario batch picks each row's own slice
    mixed = jnp.asarray([2, 0, 1, 1, 0, 2], jnp.int32)
    sel = np.asarray(model.apply(params, feats, mixed, method=method))
    np.testing.assert_allclose(allk[np.arange(B), np.asarray(mixed)], sel, atol=1e-6, rtol=0)


def test_different_scenarios_give_different_vectors(tiny_cfg, tiny_features):
  cfg = tiny_cfg()
  B = 5
  user, item = tiny_features(B, seed=2)
  model, params = _init_sass(cfg, user, item, seed=5)
  for method, feats in ((SASS.encode_user, user), (SASS.encode_item, item)):
    v0 = np.asarray(model.apply(params, feats, jnp.zeros(B, jnp.int32), method=method))
    v1 = np.asarray(model.apply(params, feats, jnp.ones(B, jnp.int32), method=method))
    v2 = np.asarray(model.apply(params, feats, jnp.full((B,), 2, jnp.int32), method=method))
    for a, b in ((v0, v1), (v0, v2), (v1, v2)):
      assert np.all(np.linalg.norm(a - b, axis=-1) > 1e-3)


def test_user_and_item_towers_have_separate_weights(tiny_cfg, tiny_features):
  cfg = tiny_cfg()
  B = 4
  user, item = tiny_features(B)
  model, params = _init_sass(cfg, user, item)
  p = params["params"]
  assert set(p) == {"scenario_embedding", "user_tower", "item_tower"}
  assert p["scenario_embedding"].shape == (K, cfg.scenario_dim)
  assert set(p["user_tower"]["embed"]) == {"user_id", "gender"}
  assert set(p["item_tower"]["embed"]) == {"movie_id", "genres", "year"}
  # the same ML-SAT structure on both sides
  assert p["user_tower"]["mlsat_1"]["scenario"]["kernel"].shape == (K, 8, 6)
  assert p["item_tower"]["mlsat_1"]["scenario"]["kernel"].shape == (K, 8, 6)
  # ... but separate weights: changing the user tower moves user vectors only
  sc = np.array([0, 1, 2, 1], np.int32)
  u0 = np.asarray(model.apply(params, user, sc, method=SASS.encode_user))
  i0 = np.asarray(model.apply(params, item, sc, method=SASS.encode_item))
  changed = jax.tree.map(lambda x: x, params)
  changed["params"]["user_tower"]["out"]["kernel"] = p["user_tower"]["out"]["kernel"] + 1.0
  u1 = np.asarray(model.apply(changed, user, sc, method=SASS.encode_user))
  i1 = np.asarray(model.apply(changed, item, sc, method=SASS.encode_item))
  np.testing.assert_array_equal(i1, i0)
  assert np.all(np.linalg.norm(u1 - u0, axis=-1) > 1e-3)


# ----------------------------------------------------------------------------------------------
# ML-SAT layer with hand-set parameters


def _layer_setup(gate_style, act="tanh", gate_per_scenario=False, seed=0):
  B, d_in, d_h, d_s, f = 6, 5, 7, 3, 4
  rng = np.random.default_rng(seed)
  g_in = rng.normal(size=(B, d_in)).astype(np.float32)
  h_in = rng.normal(size=(B, d_h)).astype(np.float32)
  z = rng.normal(size=(B, d_s)).astype(np.float32)
  sc = np.array([0, 1, 2, 2, 1, 0])
  onehot = np.eye(K, dtype=np.float32)[sc]
  layer = MLSATLayer(f, K, act=act, gate_style=gate_style, gate_per_scenario=gate_per_scenario)
  params = _random_params(layer, seed + 100, g_in, h_in, z, onehot)
  return layer, params, (g_in, h_in, z, sc, onehot)


def _np_paths(p, g_in, h_in, sc, act):
  a = NP_ACT[act]
  g = a(g_in @ p["global"]["kernel"] + p["global"]["bias"])
  s = a(np.einsum("bi,bio->bo", h_in, p["scenario"]["kernel"][sc]) + p["scenario"]["bias"][sc])
  return g, s


def _np_gate(p, name, x, sc):
  w, b = p[name]["kernel"], p[name]["bias"]
  if w.ndim == 3:  # per-scenario gate
    return _sigmoid(np.einsum("bi,bio->bo", x, w[sc]) + b[sc])
  return _sigmoid(x @ w + b)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_gated_sum_update_gate_open_gives_scenario_path(act):
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("gated_sum", act)
  p = params["params"]
  p["update_gate"]["kernel"] = np.zeros_like(p["update_gate"]["kernel"])
  p["update_gate"]["bias"] = np.full_like(p["update_gate"]["bias"], 1e4)
  g_out, h_out = layer.apply(params, g_in, h_in, z, onehot)
  g, s = _np_paths(p, g_in, h_in, sc, act)
  np.testing.assert_allclose(np.asarray(g_out), g, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h_out), s, atol=1e-5)
  a = _np_gate(p, "adaptive_gate", np.concatenate([g, s, z], -1), sc)
  assert not np.allclose(s, a * g, atol=1e-3)  # the two limits are distinguishable


@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("gate_per_scenario", [False, True])
def test_gated_sum_update_gate_closed_gives_adaptive_transfer(act, gate_per_scenario):
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("gated_sum", act, gate_per_scenario)
  p = params["params"]
  p["update_gate"]["kernel"] = np.zeros_like(p["update_gate"]["kernel"])
  p["update_gate"]["bias"] = np.full_like(p["update_gate"]["bias"], -1e4)
  g_out, h_out = layer.apply(params, g_in, h_in, z, onehot)
  g, s = _np_paths(p, g_in, h_in, sc, act)
  a = _np_gate(p, "adaptive_gate", np.concatenate([g, s, z], -1), sc)
  np.testing.assert_allclose(np.asarray(g_out), g, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h_out), a * g, atol=1e-5)
  assert not np.allclose(a * g, s, atol=1e-3)


def test_gated_sum_full_formula():
  """With random (non-saturated) gates h = u*s + (1-u)*c, c = a*g, u = sig([c; s; z] W_u + b_u)."""
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("gated_sum", "tanh", seed=4)
  p = params["params"]
  _, h_out = layer.apply(params, g_in, h_in, z, onehot)
  g, s = _np_paths(p, g_in, h_in, sc, "tanh")
  a = _np_gate(p, "adaptive_gate", np.concatenate([g, s, z], -1), sc)
  c = a * g
  u = _np_gate(p, "update_gate", np.concatenate([c, s, z], -1), sc)
  np.testing.assert_allclose(np.asarray(h_out), u * s + (1 - u) * c, atol=1e-5)


def test_gate_style_none_is_sum_of_paths():
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("none", "tanh")
  p = params["params"]
  assert "adaptive_gate" not in p and "update_gate" not in p
  g_out, h_out = layer.apply(params, g_in, h_in, z, onehot)
  g, s = _np_paths(p, g_in, h_in, sc, "tanh")
  np.testing.assert_allclose(np.asarray(g_out), g, atol=1e-5)
  np.testing.assert_allclose(np.asarray(h_out), g + s, atol=1e-5)


def test_gru_update_gate_closed_gives_scenario_path():
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("gru", "tanh")
  p = params["params"]
  p["update_gate"]["kernel"] = np.zeros_like(p["update_gate"]["kernel"])
  p["update_gate"]["bias"] = np.full_like(p["update_gate"]["bias"], -1e4)
  _, h_out = layer.apply(params, g_in, h_in, z, onehot)
  _, s = _np_paths(p, g_in, h_in, sc, "tanh")
  np.testing.assert_allclose(np.asarray(h_out), s, atol=1e-5)


def test_gru_update_gate_open_gives_candidate():
  layer, params, (g_in, h_in, z, sc, onehot) = _layer_setup("gru", "tanh", seed=2)
  p = params["params"]
  p["update_gate"]["kernel"] = np.zeros_like(p["update_gate"]["kernel"])
  p["update_gate"]["bias"] = np.full_like(p["update_gate"]["bias"], 1e4)
  _, h_out = layer.apply(params, g_in, h_in, z, onehot)
  g, s = _np_paths(p, g_in, h_in, sc, "tanh")
  a = _np_gate(p, "adaptive_gate", np.concatenate([g, s, z], -1), sc)
  c = np.tanh(np.concatenate([a * g, s], -1) @ p["candidate"]["kernel"] + p["candidate"]["bias"])
  np.testing.assert_allclose(np.asarray(h_out), c, atol=1e-5)
  assert not np.allclose(c, s, atol=1e-3)


def test_bad_gate_style_raises():
  x = np.ones((2, 3), np.float32)
  layer = MLSATLayer(4, K, gate_style="lstm")
  with pytest.raises(ValueError, match="config.model.gate_style='lstm'"):
    layer.init(jax.random.key(0), x, x, x, np.eye(K, dtype=np.float32)[[0, 1]])


def test_gate_per_scenario_kernels_have_scenario_axis():
  f, d_s = 4, 3
  layer, params, _ = _layer_setup("gated_sum", gate_per_scenario=True)
  p = params["params"]
  assert p["adaptive_gate"]["kernel"].shape == (K, 2 * f + d_s, f)
  assert p["update_gate"]["kernel"].shape == (K, 2 * f + d_s, f)
  assert p["adaptive_gate"]["bias"].shape == (K, f)
  _, shared, _ = _layer_setup("gated_sum", gate_per_scenario=False)
  assert shared["params"]["adaptive_gate"]["kernel"].shape == (2 * f + d_s, f)
  assert shared["params"]["update_gate"]["kernel"].shape == (2 * f + d_s, f)


# ----------------------------------------------------------------------------------------------
# ScenarioDense and FieldEmbedder


def test_scenario_dense_stacked_weights_selected_and_all():
  B, d_in, d_out = 6, 5, 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, d_in)).astype(np.float32)
  sc = np.array([0, 2, 1, 1, 2, 0])
  onehot = np.eye(K, dtype=np.float32)[sc]
  layer = ScenarioDense(d_out, K)
  params = _random_params(layer, 1, x, onehot)
  assert params["params"]["kernel"].shape == (K, d_in, d_out)
  assert params["params"]["bias"].shape == (K, d_out)
  w, b = params["params"]["kernel"], params["params"]["bias"]
  out = np.asarray(layer.apply(params, x, onehot))
  expect = np.stack([x[i] @ w[sc[i]] + b[sc[i]] for i in range(B)])
  np.testing.assert_allclose(out, expect, atol=1e-5)
  # all-scenarios layout: slice k uses W[k], b[k]
  xa = rng.normal(size=(B, K, d_in)).astype(np.float32)
  out_all = np.asarray(layer.apply(params, xa, None))
  expect_all = np.stack([xa[:, k] @ w[k] + b[k] for k in range(K)], 1)
  np.testing.assert_allclose(out_all, expect_all, atol=1e-5)
  with pytest.raises(ValueError, match="all-scenarios layout"):
    layer.apply(params, x, None)


def test_field_embedder_multi_hot_mean_pools_over_mask():
  specs = (FieldSpec("a", 5), FieldSpec("g", 7, multi_hot=3))
  emb = FieldEmbedder(specs, dim=4, pad_to=8)
  feats = {
    "a": np.array([1, 4, 0, 2], np.int32),
    "g": np.array([[1, 2, 3], [6, 5, 0], [3, 3, 3], [2, 1, 4]], np.int32),
    "g_mask": np.array(
      [[True, True, True], [True, True, False], [True, False, False], [False, False, False]]
    ),
  }
  params = _random_params(emb, 0, feats)
  ta, tg = params["params"]["a"], params["params"]["g"]
  assert ta.shape == (8, 4) and tg.shape == (8, 4)  # rows padded to a multiple of pad_to
  out = np.asarray(emb.apply(params, feats))
  assert out.shape == (4, 8)
  np.testing.assert_allclose(out[:, :4], ta[feats["a"]], atol=1e-6)
  expect = np.stack([tg[[1, 2, 3]].mean(0), tg[[6, 5]].mean(0), tg[3], np.zeros(4)])
  np.testing.assert_allclose(out[:, 4:], expect, atol=1e-6)
  with pytest.raises(KeyError, match="'g'"):
    emb.apply(params, {"a": feats["a"]})


# ----------------------------------------------------------------------------------------------
# ModelConfig.from_config (shared settings) and registry.build (the name, SASS's own settings)


def _specs():
  return (FieldSpec("user_id", 10),), (FieldSpec("movie_id", 12),)


def test_from_config_copies_values():
  mc = test_config.get_config().model
  u, i = _specs()
  cfg = ModelConfig.from_config(mc, u, i, 3)
  assert cfg.widths == (32, 16) and cfg.out_dim == 16 and cfg.embed_dim == 8
  assert cfg.num_scenarios == 3 and cfg.user_specs == u and cfg.item_specs == i
  assert cfg.tau == mc.tau == 0.2 and cfg.gate_style == "gated_sum" and cfg.bias_mode == "add"
  assert (
    ModelConfig(u, i, 3).tau == 0.05
  )  # the documented default (docs/design.md) when no config sets it
  hash(cfg)  # static config must be hashable (used as a jit-static closure)


@pytest.mark.parametrize(
  "key,value",
  [("name", "dssm"), ("bias_mode", "mul"), ("activation", "swish"), ("compute_dtype", "float16")],
)
def test_build_rejects_bad_values(key, value):
  mc = test_config.get_config().model
  mc[key] = value
  u, i = _specs()
  with pytest.raises(ValueError, match=f"config.model.{key}={value!r}"):
    registry.build(mc, u, i, 3)
  if key in ("activation", "compute_dtype"):  # shared settings: checked for every model
    with pytest.raises(ValueError, match=f"config.model.{key}={value!r}"):
      ModelConfig.from_config(mc, u, i, 3)


def test_from_config_rejects_zero_scenarios():
  u, i = _specs()
  with pytest.raises(ValueError, match="0 scenarios"):
    ModelConfig.from_config(test_config.get_config().model, u, i, 0)


def test_build_rejects_bad_gate_style():
  mc = test_config.get_config().model
  mc.gate_style = "lstm"
  u, i = _specs()
  assert SASS.config_problems(mc) == [
    "config.model.gate_style='lstm': expected one of ('gated_sum', 'gru', 'none')"
  ]
  with pytest.raises(ValueError, match="config.model.gate_style"):
    registry.build(mc, u, i, 3)
