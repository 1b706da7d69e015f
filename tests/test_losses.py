"""Tests for sass_jax.train.losses and the loss wiring / steps of sass_jax.train.steps (docs/design.md §2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import log_loss

from configs import test as test_config
from sass_jax.schema import FieldSpec
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.train import losses, steps

K = 3


# ----------------------------------------------------------------------------------------------
# NumPy references (float64)


def _logsumexp(x):
  m = x.max()
  return m + np.log(np.exp(x - m).sum())


def _np_ce_diag(logits, ids=None):
  """Mean over rows b of -log softmax(row b)[b]; columns j != b with ids[j] == ids[b] dropped.

  ids: None, one id array, or a tuple of id arrays (a column is dropped when any matches).
  """
  B = logits.shape[0]
  ids = ids if ids is None or isinstance(ids, tuple) else (ids,)
  out = []
  for b in range(B):
    keep = [j for j in range(B) if j == b or ids is None or all(x[j] != x[b] for x in ids)]
    out.append(_logsumexp(logits[b, keep]) - logits[b, b])
  return float(np.mean(out))


def np_info_nce(a, b, ids, tau, mask=True):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  logits = a @ b.T / tau
  ids = ids if mask else None
  return 0.5 * (_np_ce_diag(logits, ids) + _np_ce_diag(logits.T, ids))


def np_sampled_softmax(logits, item_ids, logq, tau, alpha, mask=True):
  z = np.asarray(logits, np.float64) / tau - alpha * np.asarray(logq, np.float64)[None, :]
  return _np_ce_diag(z, item_ids if mask else None)


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# info_nce


def test_info_nce_matches_numpy_with_duplicate_id():
  rng = np.random.default_rng(0)
  B, D, tau = 8, 6, 0.2
  a, b = _unit(rng, (B, D)), _unit(rng, (B, D))
  ids = np.array([3, 7, 1, 3, 9, 2, 7, 5], np.int32)  # rows 0/3 and 1/6 are the same entity
  got = float(losses.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.asarray(ids), tau))
  ref = np_info_nce(a, b, ids, tau)
  unmasked = np_info_nce(a, b, ids, tau, mask=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert abs(ref - unmasked) > 1e-3  # the duplicate mask matters on this input
  assert abs(got - unmasked) > 1e-3


def test_info_nce_distinct_ids_equals_log_softmax_ce():
  rng = np.random.default_rng(1)
  B, D, tau = 10, 5, 0.5
  a, b = _unit(rng, (B, D)), _unit(rng, (B, D))
  got = float(losses.info_nce(jnp.asarray(a), jnp.asarray(b), jnp.arange(B), tau))
  logits = a.astype(np.float64) @ b.astype(np.float64).T / tau

  def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  labels = np.arange(B)
  ref = 0.5 * (
    log_loss(labels, softmax(logits), labels=labels)
    + log_loss(labels, softmax(logits.T), labels=labels)
  )
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # and a hand value: perfectly aligned views with orthogonal rows -> known CE
  eye = np.eye(4, dtype=np.float32)
  v = float(losses.info_nce(jnp.asarray(eye), jnp.asarray(eye), jnp.arange(4), 1.0))
  np.testing.assert_allclose(v, -np.log(np.e / (np.e + 3)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# sampled_softmax_logq and scenario_logits


@pytest.mark.parametrize("alpha", [0.5, 0.0])
def test_sampled_softmax_logq_matches_numpy_and_masks_duplicate_positive(alpha):
  rng = np.random.default_rng(2)
  B, tau = 7, 0.1
  item_ids = np.array([10, 11, 12, 10, 13, 14, 15], np.int32)  # item 10 is row 0's and row 3's
  items = _unit(rng, (B, 4))
  items[3] = items[0]  # the same item has the same vector
  users = _unit(rng, (B, 4)) * 0.3 + items
  logits = (users @ items.T).astype(np.float32)
  logq = np.log(rng.dirichlet(np.ones(B))).astype(np.float32)
  got = float(
    losses.sampled_softmax_logq(
      jnp.asarray(logits), jnp.asarray(item_ids), jnp.asarray(logq), tau, alpha
    )
  )
  ref = np_sampled_softmax(logits, item_ids, logq, tau, alpha)
  unmasked = np_sampled_softmax(logits, item_ids, logq, tau, alpha, mask=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  assert abs(got - unmasked) > 1e-3


def test_sampled_softmax_logq_strength_changes_loss():
  rng = np.random.default_rng(3)
  B, tau = 6, 0.2
  logits = rng.uniform(-1, 1, (B, B)).astype(np.float32)
  ids = np.arange(B, dtype=np.int32)
  logq = np.log(np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05], np.float32))
  l0 = float(losses.sampled_softmax_logq(logits, ids, logq, tau, 0.0))
  l1 = float(losses.sampled_softmax_logq(logits, ids, logq, tau, 1.0))
  np.testing.assert_allclose(l0, np_sampled_softmax(logits, ids, logq, tau, 0.0), rtol=1e-5)
  np.testing.assert_allclose(l1, np_sampled_softmax(logits, ids, logq, tau, 1.0), rtol=1e-5)
  assert abs(l0 - l1) > 1e-3
  # a constant logq (uniform sampling) is a no-op: softmax is shift-invariant
  flat = np.full(B, np.log(1 / B), np.float32)
  np.testing.assert_allclose(
    float(losses.sampled_softmax_logq(logits, ids, flat, tau, 1.0)), l0, rtol=1e-5
  )


def test_scenario_logits_equals_explicit_loop():
  rng = np.random.default_rng(4)
  B, D = 6, 5
  u = rng.normal(size=(B, D)).astype(np.float32)
  items = rng.normal(size=(B, K, D)).astype(np.float32)
  sc = np.array([0, 2, 1, 1, 0, 2], np.int32)
  got = np.asarray(losses.scenario_logits(jnp.asarray(u), jnp.asarray(items), jnp.asarray(sc)))
  ref = np.array([[u[b] @ items[j, sc[b]] for j in range(B)] for b in range(B)])
  assert got.shape == (B, B)
  np.testing.assert_allclose(got, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# pretrain_loss / finetune_loss wiring on a tiny model


def _random_params(model, seed, *init_args):
  """Init-shaped params with random values (eval_shape: avoids compiling the initialisers)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *init_args))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _hand_batch(tiny_features, B=6):
  user, item = tiny_features(B, seed=7)
  # row 3 repeats row 0's user, row 4 repeats row 1's item (same features and index)
  for k in user:
    user[k][3] = user[k][0]
  for k in item:
    item[k][4] = item[k][1]
  rng = np.random.default_rng(8)
  return {
    "user": user,
    "item": item,
    "scenario": np.array([0, 1, 2, 2, 1, 0], np.int32),
    "user_index": np.array([0, 1, 2, 0, 4, 5], np.int32),
    "item_index": np.array([10, 11, 12, 13, 11, 15], np.int32),
    "user_views": np.array([[0, 1], [2, 0], [1, 2], [1, 0], [0, 2], [2, 1]], np.int32),
    "item_views": np.array([[1, 2], [0, 1], [2, 0], [0, 2], [1, 0], [2, 1]], np.int32),
    "item_logq": np.log(rng.dirichlet(np.ones(B))).astype(np.float32),
  }


RNG = np.asarray(jax.random.key_data(jax.random.key(0)))


def test_pretrain_loss_scenario_views_wiring(tiny_cfg, tiny_features):
  model = SASS(tiny_cfg())
  batch = _hand_batch(tiny_features)
  params = _random_params(model, 0, batch["user"], batch["item"], batch["scenario"])["params"]
  tau = 0.1
  loss, (aux, _) = steps.pretrain_loss(model, params, batch, RNG, tau, "scenario_views")
  u_all = np.asarray(model.apply({"params": params}, batch["user"], None, method=SASS.encode_user))
  i_all = np.asarray(model.apply({"params": params}, batch["item"], None, method=SASS.encode_item))
  B = len(batch["scenario"])
  uv = [np.stack([u_all[b, batch["user_views"][b, v]] for b in range(B)]) for v in (0, 1)]
  iv = [np.stack([i_all[b, batch["item_views"][b, v]] for b in range(B)]) for v in (0, 1)]
  ref_u = np_info_nce(uv[0], uv[1], batch["user_index"], tau)
  ref_i = np_info_nce(iv[0], iv[1], batch["item_index"], tau)
  np.testing.assert_allclose(float(aux["user_loss"]), ref_u, rtol=1e-5)
  np.testing.assert_allclose(float(aux["item_loss"]), ref_i, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ref_u + ref_i, rtol=1e-5)
  # swapping user views and item views must change the value (the view indices are used)
  swapped = dict(batch, user_views=batch["item_views"], item_views=batch["user_views"])
  l2, _ = steps.pretrain_loss(model, params, swapped, RNG, tau, "scenario_views")
  assert abs(float(l2) - float(loss)) > 1e-4


def test_pretrain_loss_user_item_wiring(tiny_cfg, tiny_features):
  model = SASS(tiny_cfg())
  batch = _hand_batch(tiny_features)
  params = _random_params(model, 1, batch["user"], batch["item"], batch["scenario"])["params"]
  tau = 0.2
  loss, (aux, _) = steps.pretrain_loss(model, params, batch, RNG, tau, "user_item")
  u = np.asarray(
    model.apply({"params": params}, batch["user"], batch["scenario"], method=SASS.encode_user)
  )
  i = np.asarray(
    model.apply({"params": params}, batch["item"], batch["scenario"], method=SASS.encode_item)
  )
  # row 3 repeats row 0's user: column 3 is masked in row 0 and vice versa (both directions),
  # like row 4 / row 1 that share an item
  ref = np_info_nce(u, i, (batch["user_index"], batch["item_index"]), tau)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  items_only = np_info_nce(u, i, batch["item_index"], tau)
  assert abs(ref - items_only) > 1e-4  # the repeated user's mask matters on this batch
  assert float(aux["item_loss"]) == 0.0


def test_info_nce_masks_repeated_user_of_user_item_pairs():
  """Hand-made batch: rows 0 and 2 are the same user with different items. In the
  item-to-user direction, column 2 of row 0 (user 0's other row) must not be a negative."""
  u = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)  # rows 0, 2: the same user
  i = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  uid, iid = np.array([5, 6, 5], np.int32), np.array([1, 2, 3], np.int32)
  tau = 0.5
  got = float(
    losses.info_nce(jnp.asarray(u), jnp.asarray(i), (jnp.asarray(uid), jnp.asarray(iid)), tau)
  )
  lg = u @ i.T / tau
  # user->item: row 0 drops column 2, row 2 drops column 0; item->user (transpose) the same
  ce = lambda row, keep, t: _logsumexp(row[keep]) - row[t]
  u2i = [ce(lg[0], [0, 1], 0), ce(lg[1], [0, 1, 2], 1), ce(lg[2], [1, 2], 2)]
  i2u = [ce(lg.T[0], [0, 1], 0), ce(lg.T[1], [0, 1, 2], 1), ce(lg.T[2], [1, 2], 2)]
  np.testing.assert_allclose(got, 0.5 * (np.mean(u2i) + np.mean(i2u)), rtol=1e-5)
  # without the user mask the item-to-user row 0 would count user 0's other row (logit equal
  # to the positive's) as a negative
  assert (
    abs(got - float(losses.info_nce(jnp.asarray(u), jnp.asarray(i), jnp.asarray(iid), tau))) > 1e-3
  )


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_finetune_loss_wiring(tiny_cfg, tiny_features, alpha):
  model = SASS(tiny_cfg())
  batch = _hand_batch(tiny_features)
  params = _random_params(model, 2, batch["user"], batch["item"], batch["scenario"])["params"]
  tau = 0.05
  loss, _ = steps.finetune_loss(model, params, batch, RNG, tau, alpha)
  u = np.asarray(
    model.apply({"params": params}, batch["user"], batch["scenario"], method=SASS.encode_user)
  )
  i_all = np.asarray(model.apply({"params": params}, batch["item"], None, method=SASS.encode_item))
  B = len(batch["scenario"])
  sc = batch["scenario"]
  # negatives of row b: every item j scored by its vector in *row b's* scenario
  logits = np.array([[u[b] @ i_all[j, sc[b]] for j in range(B)] for b in range(B)])
  ref = np_sampled_softmax(logits, batch["item_index"], batch["item_logq"], tau, alpha)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  # taking item j in its own scenario instead would be a different number
  own = np.array([[u[b] @ i_all[j, sc[j]] for j in range(B)] for b in range(B)])
  wrong = np_sampled_softmax(own, batch["item_index"], batch["item_logq"], tau, alpha)
  assert abs(wrong - ref) > 1e-3


def test_make_pretrain_step_rejects_unknown_pairs(tiny_cfg):
  with pytest.raises(ValueError, match="config.pretrain.pairs='both'"):
    steps.make_pretrain_step(SASS(tiny_cfg()), None, 0.1, pairs="both")


# ----------------------------------------------------------------------------------------------
# the jitted steps reduce the loss on a fixed batch


def _step_setup(features):
  cfg = test_config.get_config()
  user_specs = (FieldSpec("user_id", 10), FieldSpec("gender", 3))
  item_specs = (
    FieldSpec("movie_id", 12),
    FieldSpec("genres", 5, multi_hot=3),
    FieldSpec("year", 4),
  )
  mcfg = ModelConfig.from_config(cfg.model, user_specs, item_specs, K)
  model = SASS(mcfg)
  B = 16
  user, item = features(B, seed=9)
  rng = np.random.default_rng(10)
  batch = {
    "user": user,
    "item": item,
    "scenario": rng.integers(0, K, B).astype(np.int32),
    "user_index": user["user_id"].copy(),
    "item_index": item["movie_id"].copy(),
    "user_views": np.stack([np.arange(B) % K, (np.arange(B) + 1) % K], 1).astype(np.int32),
    "item_views": np.stack([(np.arange(B) + 2) % K, np.arange(B) % K], 1).astype(np.int32),
    "item_logq": np.full(B, np.log(1 / 12), np.float32),
  }
  return cfg, model, batch


@pytest.fixture(scope="module")
def step_env():
  """configs/test.py model, a fixed batch and one initial state (init compiled once: slow)."""

  def features(B, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, 3)) < 0.7
    mask[:, 0] = True
    user = {
      "user_id": np.arange(B, dtype=np.int32) % 10,
      "gender": rng.integers(0, 3, B).astype(np.int32),
    }
    item = {
      "movie_id": np.arange(B, dtype=np.int32) % 12,
      "genres": rng.integers(0, 5, (B, 3)).astype(np.int32),
      "genres_mask": mask,
      "year": rng.integers(0, 4, B).astype(np.int32),
    }
    return user, item

  cfg, model, batch = _step_setup(features)
  n = 20
  tx = steps.make_optimizer(cfg.train, n)
  state = jax.jit(steps.make_init_fn(model, tx, batch, seed=0))()
  return cfg, model, batch, state, n


def _run(step, state, batch, n):
  """n steps, then the loss at the final params (one more step's reported loss)."""
  step = jax.jit(step)
  metrics = []
  for _ in range(n + 1):
    new_state, m = step(state, batch)
    metrics.append(jax.tree.map(float, m))
    if len(metrics) <= n:
      state = new_state
  return state, metrics


def test_finetune_step_reduces_loss(step_env):
  cfg, model, batch, state, n = step_env
  tx = steps.make_optimizer(cfg.train, n)
  tau, alpha = cfg.model.tau, cfg.train.logq_strength
  state, metrics = _run(steps.make_finetune_step(model, tx, tau, alpha), state, batch, n)
  before, after = metrics[0]["loss"], metrics[n]["loss"]
  assert int(state.step) == n
  assert metrics[0]["grad_norm"] > 0
  assert np.isfinite([m["loss"] for m in metrics]).all()
  assert after < before - 0.05 * abs(before), (before, after)


def test_pretrain_step_reduces_loss(step_env):
  cfg, model, batch, state, n = step_env
  tx = steps.make_optimizer(cfg.pretrain, n)
  state = state.replace(opt_state=tx.init(state.params))
  tau = cfg.pretrain.tau
  state, metrics = _run(steps.make_pretrain_step(model, tx, tau), state, batch, n)
  before, after = metrics[0]["loss"], metrics[n]["loss"]
  assert int(state.step) == n
  np.testing.assert_allclose(
    metrics[0]["loss"], metrics[0]["user_loss"] + metrics[0]["item_loss"], rtol=1e-5
  )
  assert metrics[n]["user_loss"] < metrics[0]["user_loss"]
  assert metrics[n]["item_loss"] < metrics[0]["item_loss"]
  assert after < before - 0.05 * abs(before), (before, after)
