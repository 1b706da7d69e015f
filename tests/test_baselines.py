"""Tests for the multi-scenario baselines (docs/design.md §3): every model name behind the SASS
two-tower interface on the real MovieLens sample, STAR's partitioned normalisation against NumPy,
DSSM-S independence, config validation and the CLI end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import test as test_config
from sass_jax import config_check
from sass_jax.data import pipeline
from sass_jax.model import registry
from sass_jax.model.baselines import STAR, DSSMSingle
from sass_jax.model.embedding import padded_rows
from sass_jax.model.towers import ModelConfig
from sass_jax.partition import Partitioner
from sass_jax.train import loop, steps

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
K = 3
EPS = 1e-5


def _cfg(name):
  c = test_config.get_config(name)
  c.model.name = name
  c.data.dir = str(DATA)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One prepared copy of the MovieLens sample for the whole module: (data, data dir)."""
  wd = tmp_path_factory.mktemp("baselines")
  data = loop.prepare(_cfg("star"), wd)
  return data, wd / "data"


@pytest.fixture(scope="module")
def batches(prepared):
  """3 fine-tuning batches of 64 rows (the same for every model)."""
  data, _ = prepared
  it = pipeline.make_iterator(data, "finetune", 64, 0, 3, threads=1)
  return [next(it) for _ in range(3)]


def _init_state(name, data, num_steps=20, lr=None):
  cfg = _cfg(name)
  if lr is not None:
    cfg.train.learning_rate = lr
  model = loop.build_model(cfg, data)
  tx = steps.make_optimizer(cfg.train, num_steps)
  state = nn.meta.unbox(steps.make_init_fn(model, tx, loop.example_batch(data), 0)())
  return cfg, model, tx, state


@pytest.mark.parametrize("name", registry.names())
def test_layouts_shapes_and_finite_loss(prepared, batches, name):
  data, _ = prepared
  cfg, model, tx, state = _init_state(name, data)
  b = batches[0]
  B, D = len(b["scenario"]), cfg.model.out_dim
  sc = jnp.asarray(b["scenario"])
  assert len(np.unique(b["scenario"])) == K  # a mixed-scenario batch
  for method, feats in (("encode_user", b["user"]), ("encode_item", b["item"])):
    enc = lambda f, s, m=method: np.asarray(model.apply(state.variables, f, s, method=m))
    sel, allk = enc(feats, sc), enc(feats, None)
    assert sel.shape == (B, D) and allk.shape == (B, K, D)
    assert sel.dtype == np.float32 and allk.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(allk, axis=-1), 1.0, atol=1e-5)
    # the selected layout is row b's slice scenario[b] of the all-scenarios layout
    np.testing.assert_allclose(sel, allk[np.arange(B), b["scenario"]], atol=1e-6, rtol=0)
    for k in range(K):
      one = enc(feats, jnp.full((B,), k, jnp.int32))
      np.testing.assert_allclose(one, allk[:, k], atol=1e-6, rtol=0)
    gap = np.linalg.norm(allk[:, 0] - allk[:, 1], axis=-1)
    if name == "dssm_mixed":
      assert np.all(gap == 0.0)
    else:  # scenario-aware on both sides: each scenario has its own user and item vectors
      assert np.all(gap > 1e-4), (method, gap.min())
  loss, _ = steps.finetune_loss(
    model,
    state.params,
    jax.tree.map(jnp.asarray, b),
    state.rng,
    cfg.model.tau,
    1.0,
    state.model_state,
  )
  assert np.isfinite(float(loss)) and float(loss) > 0


@pytest.mark.parametrize("name", registry.names())
def test_finetune_loss_decreases(prepared, batches, name):
  data, _ = prepared
  cfg, model, tx, state = _init_state(name, data, lr=3e-3)
  step = jax.jit(steps.make_finetune_step(model, tx, cfg.model.tau, 1.0))
  stats0 = jax.tree.map(np.asarray, state.model_state)
  losses = []
  # three fixed batches in turn: the first and the last three steps see the same batches
  for i in range(20):
    state, m = step(state, jax.tree.map(jnp.asarray, batches[i % 3]))
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  if name == "star":  # every step updated the running statistics of both towers
    for tower in ("user_tower", "item_tower"):
      for s in ("mean", "var"):
        before = stats0["batch_stats"][tower]["pn"][s]
        after = np.asarray(state.model_state["batch_stats"][tower]["pn"][s])
        assert np.all(np.abs(after - before).max(-1) > 1e-4), (tower, s)
  else:
    assert state.model_state == {}


@pytest.mark.parametrize("name", registry.names())
def test_logical_axes_shard_only_embedding_tables(prepared, name):
  """Every param carries logical axes; exactly the embedding tables have the 'vocab' axis, and
  with shard_min_rows=1 they are placed as ``Partitioner.table_axes`` says (split over the
  'model' axis when it has devices; replicated on a 1-device mesh), everything else
  (per-scenario, expert, batch_stats) replicated."""
  data, _ = prepared
  cfg = _cfg(name)
  cfg.mesh.shard_min_rows = 1
  cfg.mesh.table_layout = "model"  # tables split over 'model' only (not all devices)
  model = loop.build_model(cfg, data)
  tx = steps.make_optimizer(cfg.train, 10)
  part = Partitioner(cfg.mesh)
  abstract = jax.eval_shape(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
  boxed = jax.tree.leaves(abstract.params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
  logical = jax.tree_util.tree_flatten_with_path(
    nn.get_partition_spec(abstract.params), is_leaf=lambda x: isinstance(x, P)
  )[0]
  vocab = {jax.tree_util.keystr(p) for p, spec in logical if len(spec) and spec[0] == "vocab"}
  _, shardings = part.abstract_state(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
  flat = jax.tree_util.tree_flatten_with_path(shardings.params)[0]
  specs = {jax.tree_util.keystr(path): tuple(sh.spec) for path, sh in flat}
  shapes = {
    jax.tree_util.keystr(p): s.shape
    for p, s in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract.params))[0]
  }
  tables = {k for k in specs if "['embed']" in k}
  assert len(tables) == len(data.user_specs) + len(data.item_specs)
  assert tables == vocab
  for k, spec in specs.items():
    if k in tables:
      axes = part.table_axes(shapes[k][0])
      assert axes == (("model",) if part.mesh.size > 1 else ())
      assert spec[:1] in ((axes[0],) if axes else ((None,), ())), (k, spec)
      assert all(a is None for a in spec[1:]), (k, spec)
    else:
      assert all(a is None for a in spec), (k, spec)
  for sh in jax.tree.leaves(shardings.model_state):
    assert all(a is None for a in sh.spec)


# ----------------------------------------------------------------------------------------------
# STAR: partitioned normalisation against NumPy


def _random_variables(model, seed, *init_args):
  """Variables with the init's shapes, params filled with N(0, 0.5^2) (biases and the W_k of
  STAR included, so nothing is trivially 1 or 0); batch_stats keep their init."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *init_args))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"]
  )
  rest = {
    k: jax.tree.map(lambda s: np.zeros(s.shape, np.float32), v)
    for k, v in shapes.items()
    if k != "params"
  }
  return {"params": params, **rest}


def _star_user_numpy(p, z, user, scenario, mean, var, all_layout=False):
  """STAR user tower in NumPy. mean / var ``[K, d]`` are the statistics slice k is normalised
  with; scenario int [B] (selected) or ignored with all_layout (returns [B, K, D])."""
  relu = lambda x: np.maximum(x, 0.0)
  e = np.concatenate(
    [p["embed"]["user_id"][user["user_id"]], p["embed"]["gender"][user["gender"]]], -1
  )  # [B, 8]

  def tower(k_rows):
    pn = p["pn"]
    x = (
      (e - mean[k_rows]) / np.sqrt(var[k_rows] + EPS) * (pn["scale"] * pn["scenario_scale"][k_rows])
      + pn["bias"]
      + pn["scenario_bias"][k_rows]
    )
    for name, act in (("star_0", relu), ("star_1", relu), ("out", lambda v: v)):
      q = p[name]
      w = q["kernel"][None] * q["scenario_kernel"][k_rows]  # [B, din, dout]
      x = act(np.einsum("bi,bio->bo", x, w) + q["bias"] + q["scenario_bias"][k_rows])
    a = relu(
      np.concatenate([z[k_rows], e], -1) @ p["aux_hidden"]["kernel"] + p["aux_hidden"]["bias"]
    )
    x = x + a @ p["aux_out"]["kernel"] + p["aux_out"]["bias"]
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  if all_layout:
    return np.stack([tower(np.full(len(e), k)) for k in range(K)], 1)
  return tower(np.asarray(scenario))


@pytest.fixture
def star_setup(tiny_cfg, tiny_features):
  cfg = tiny_cfg(star_momentum=0.9)
  B = 8
  user, item = tiny_features(B, seed=4)
  model = STAR(cfg)
  v = _random_variables(model, 7, user, item, np.zeros(B, np.int32))
  return cfg, model, v, user, item


def test_star_eval_uses_each_scenarios_running_statistics(star_setup):
  cfg, model, v, user, _ = star_setup
  d = 2 * cfg.embed_dim
  rng = np.random.default_rng(11)
  mean = rng.normal(0, 0.3, (K, d)).astype(np.float32)
  var = rng.uniform(0.01, 0.5, (K, d)).astype(np.float32)
  v["batch_stats"]["user_tower"]["pn"] = {"mean": mean, "var": var}
  sc = np.array([0, 1, 2, 1, 0, 2, 2, 1], np.int32)
  p, z = v["params"]["user_tower"], v["params"]["scenario_embedding"]
  got = np.asarray(model.apply(v, user, jnp.asarray(sc), method="encode_user"))
  np.testing.assert_allclose(got, _star_user_numpy(p, z, user, sc, mean, var), atol=2e-5)
  got_all = np.asarray(model.apply(v, user, None, method="encode_user"))
  np.testing.assert_allclose(got_all, _star_user_numpy(p, z, user, sc, mean, var, True), atol=2e-5)
  # changing scenario 1's statistics moves scenario 1's vectors only
  v2 = jax.tree.map(lambda x: x, v)
  v2["batch_stats"]["user_tower"]["pn"] = {"mean": mean.copy(), "var": var.copy()}
  v2["batch_stats"]["user_tower"]["pn"]["mean"][1] += 1.0
  got2 = np.asarray(model.apply(v2, user, None, method="encode_user"))
  np.testing.assert_array_equal(got2[:, [0, 2]], got_all[:, [0, 2]])
  assert np.all(np.linalg.norm(got2[:, 1] - got_all[:, 1], axis=-1) > 1e-3)


def test_star_training_uses_batch_moments_per_scenario_and_updates_present_only(star_setup):
  cfg, model, v, user, _ = star_setup
  d, m = 2 * cfg.embed_dim, cfg.star_momentum
  rng = np.random.default_rng(12)
  old_mean = rng.normal(0, 0.3, (K, d)).astype(np.float32)
  old_var = rng.uniform(0.5, 2.0, (K, d)).astype(np.float32)
  v["batch_stats"]["user_tower"]["pn"] = {"mean": old_mean, "var": old_var}
  sc = np.array([0, 2, 2, 0, 0, 2, 2, 0], np.int32)  # scenario 1 absent
  p, z = v["params"]["user_tower"], v["params"]["scenario_embedding"]
  e = np.concatenate(
    [p["embed"]["user_id"][user["user_id"]], p["embed"]["gender"][user["gender"]]], -1
  )
  bmean, bvar = old_mean.copy(), old_var.copy()  # row k: scenario k's batch moments
  for k in (0, 2):
    bmean[k], bvar[k] = e[sc == k].mean(0), e[sc == k].var(0)
  out, new = model.apply(
    v, user, jnp.asarray(sc), True, method="encode_user", mutable=["batch_stats"]
  )
  np.testing.assert_allclose(
    np.asarray(out), _star_user_numpy(p, z, user, sc, bmean, bvar), atol=2e-5
  )
  pn = jax.tree.map(np.asarray, new["batch_stats"]["user_tower"]["pn"])
  np.testing.assert_array_equal(pn["mean"][1], old_mean[1])
  np.testing.assert_array_equal(pn["var"][1], old_var[1])
  for k in (0, 2):
    np.testing.assert_allclose(pn["mean"][k], m * old_mean[k] + (1 - m) * bmean[k], atol=1e-6)
    np.testing.assert_allclose(pn["var"][k], m * old_var[k] + (1 - m) * bvar[k], atol=1e-6)
  # the item tower's statistics are untouched by a user-tower call
  np.testing.assert_array_equal(
    np.asarray(new["batch_stats"]["item_tower"]["pn"]["mean"]),
    v["batch_stats"]["item_tower"]["pn"]["mean"],
  )
  # all-scenarios layout in training: every slice uses (and updates with) the whole batch's moments
  out, new = model.apply(v, user, None, True, method="encode_user", mutable=["batch_stats"])
  full_m = np.broadcast_to(e.mean(0), (K, d))
  full_v = np.broadcast_to(e.var(0), (K, d))
  np.testing.assert_allclose(
    np.asarray(out), _star_user_numpy(p, z, user, sc, full_m, full_v, True), atol=2e-5
  )
  pn = jax.tree.map(np.asarray, new["batch_stats"]["user_tower"]["pn"])
  np.testing.assert_allclose(pn["mean"], m * old_mean + (1 - m) * full_m, atol=1e-6)
  np.testing.assert_allclose(pn["var"], m * old_var + (1 - m) * full_v, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DSSM-S independence


@pytest.mark.parametrize("separate", [True, False])
def test_dssm_single_scenarios_are_independent(tiny_cfg, tiny_features, separate):
  cfg = tiny_cfg(separate_embeddings=separate)
  B = 6
  user, item = tiny_features(B, seed=5)
  model = DSSMSingle(cfg)
  v = _random_variables(model, 3, user, item, np.zeros(B, np.int32))
  for tower, specs in (("user_tower", cfg.user_specs), ("item_tower", cfg.item_specs)):
    tables = v["params"][tower]["embed"]
    for s in specs:
      rows = padded_rows(s.vocab_size, cfg.vocab_pad_to)
      assert tables[s.name].shape == ((K if separate else 1) * rows, cfg.embed_dim)
    assert v["params"][tower]["mlp"]["dense_0_kernel"].shape[0] == K
  # perturb scenario 1's slice of every per-scenario parameter (and its embedding rows)
  changed = jax.tree.map(np.copy, v)
  for tower, specs in (("user_tower", cfg.user_specs), ("item_tower", cfg.item_specs)):
    for leaf in changed["params"][tower]["mlp"].values():
      leaf[1] += 1.0
    if separate:
      for s in specs:
        rows = padded_rows(s.vocab_size, cfg.vocab_pad_to)
        changed["params"][tower]["embed"][s.name][rows : 2 * rows] += 1.0
  for method, feats in (("encode_user", user), ("encode_item", item)):
    before = np.asarray(model.apply(v, feats, None, method=method))
    after = np.asarray(model.apply(changed, feats, None, method=method))
    np.testing.assert_array_equal(after[:, [0, 2]], before[:, [0, 2]])
    assert np.all(np.linalg.norm(after[:, 1] - before[:, 1], axis=-1) > 1e-3)
    for k in (0, 2):
      sc = jnp.full((B,), k, jnp.int32)
      sel = np.asarray(model.apply(changed, feats, sc, method=method))
      # unchanged by scenario 1's parameters; the selected layout ('grouped' compute) equals the
      # all-scenarios slice up to float rounding
      np.testing.assert_array_equal(sel, np.asarray(model.apply(v, feats, sc, method=method)))
      np.testing.assert_allclose(sel, before[:, k], atol=1e-6)
  if separate:  # the embedding rows of scenario 1 alone also move only scenario 1
    only_emb = jax.tree.map(np.copy, v)
    rows = padded_rows(cfg.user_specs[0].vocab_size, cfg.vocab_pad_to)
    only_emb["params"]["user_tower"]["embed"]["user_id"][rows : 2 * rows] += 1.0
    before = np.asarray(model.apply(v, user, None, method="encode_user"))
    after = np.asarray(model.apply(only_emb, user, None, method="encode_user"))
    np.testing.assert_array_equal(after[:, [0, 2]], before[:, [0, 2]])
    assert np.all(np.linalg.norm(after[:, 1] - before[:, 1], axis=-1) > 1e-4)


# ----------------------------------------------------------------------------------------------
# config validation


# (model, key, value, message): each model checks its own settings (config_problems).
OWN_SETTINGS = [
  ("ple", "name", "mmoe2", "config.model.name='mmoe2' is not a known model"),
  ("mmoe", "num_experts", 0, "config.model.num_experts=0: expected an int >= 1"),
  ("ple", "num_experts", 0, "config.model.num_experts=0: expected an int >= 1"),
  ("ple", "num_scenario_experts", 0, "config.model.num_scenario_experts=0: expected an int"),
  ("star", "star_momentum", 1.0, "config.model.star_momentum=1.0: expected 0 <= m < 1"),
  ("shared_bottom", "tower_widths", (16, 0), "config.model.tower_widths=(16, 0): expected"),
  ("ple", "widths", (), "config.model.widths=(); ple needs at least one"),
  ("sass", "bias_mode", "mul", "config.model.bias_mode='mul': expected one of"),
]


@pytest.mark.parametrize("name,key,value,message", OWN_SETTINGS)
def test_config_validation(name, key, value, message):
  mc = ml_collections.ConfigDict(_cfg(name).model.to_dict())
  mc[key] = value
  assert message in "\n".join(registry.config_problems(mc))
  with pytest.raises(ValueError, match=re.escape(message)):
    registry.build(mc, (), (), K)
  # what config_check reports before any work, among the other problems
  cfg = _cfg(name)
  cfg.model[key] = value
  with pytest.raises(ValueError, match=r"invalid config:( |\n(.*\n)*  - )" + re.escape(message)):
    config_check.validate(cfg)


@pytest.mark.parametrize(
  "key,value,owners",
  [
    ("num_experts", 0, {"mmoe", "ple"}),
    ("num_scenario_experts", 0, {"ple"}),
    ("star_momentum", 1.0, {"star"}),
    ("tower_widths", (16, 0), {"shared_bottom", "mmoe", "ple"}),
    ("widths", (), {"ple"}),
    ("gate_style", "lstm", {"sass"}),
    ("bias_mode", "mul", {"sass"}),
  ],
)
def test_own_settings_belong_to_their_model(key, value, owners):
  """A setting is checked by the models that read it; the others ignore its value."""
  for name in registry.names():
    mc = ml_collections.ConfigDict(_cfg(name).model.to_dict())
    mc[key] = value
    assert bool(registry.config_problems(mc)) == (name in owners), name


def test_config_values_reach_model_config():
  mc = _cfg("ple").model
  mc.num_experts, mc.num_scenario_experts, mc.tower_widths = 5, 3, (12, 6)
  mc.separate_embeddings, mc.star_aux, mc.star_momentum = False, False, 0.5
  got = registry.build(mc, (), (), K).cfg
  assert (got.num_experts, got.num_scenario_experts, got.tower_widths) == (5, 3, (12, 6))
  assert (got.separate_embeddings, got.star_aux, got.star_momentum) == (False, False, 0.5)
  assert isinstance(got, ModelConfig)


# ----------------------------------------------------------------------------------------------
# CLI end to end


# One per kind of state: per-scenario table rows (dssm_single), expert stacks (mmoe; ple's are
# checked by test_logical_axes) and batch_stats through checkpoint, restore and evaluation
# (star); sass is covered by test_end_to_end.py. Each costs a compile of both stages (~30-50 s
# on a loaded CPU), so the other names are left to the in-process tests above.
CLI_MODELS = ("dssm_single", "mmoe", "star")


@pytest.mark.parametrize("name", CLI_MODELS)
def test_cli_train_end_to_end(prepared, tmp_path, name):
  _, data_dir = prepared
  (tmp_path / "data").symlink_to(data_dir)  # reuse the prepared sample
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      f"--config.model.name={name}",
      f"--config.data.dir={DATA}",
      "--workdir",
      str(tmp_path),
      "--mode",
      "train",
      "--config.train.num_steps=10",
      "--config.pretrain.num_steps=4",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / "metrics.json").read_text())
  assert m["model"] == name
  assert 0.0 < m["overall"]["auc"] < 1.0
  assert (tmp_path / "checkpoints" / "pretrain").is_dir()
