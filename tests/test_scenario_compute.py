"""config.model.scenario_compute='grouped' (each row's own scenario's arithmetic only) against
the earlier 'onehot' formulation, and config.train.negatives='same_scenario'.

For SASS and every baseline: same parameters from init, the same vectors in every layout and
the same losses and gradients (fine-tuning, both pre-training readings) within 1e-5, on
random inputs; the grouped matmul and logits against explicit references; fewer XLA flops.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sass_jax.model import grouped, registry
from sass_jax.model.towers import SASS
from sass_jax.train import inbatch, losses, steps

TOL = 1e-5
K = 3
B = 48


def _batch(make_features, batch=B, seed=0, scenarios=(0, 1, 2)):
  rng = np.random.default_rng(seed)
  user, item = make_features(batch, seed)
  sc = rng.choice(np.asarray(scenarios, np.int32), batch).astype(np.int32)
  views = np.stack([rng.permutation(K)[:2] for _ in range(batch)]).astype(np.int32)
  return jax.tree.map(
    jnp.asarray,
    {
      "user": user,
      "item": item,
      "scenario": sc,
      "user_index": user["user_id"],
      "item_index": item["movie_id"],
      "item_logq": np.log(rng.uniform(0.01, 0.2, batch)).astype(np.float32),
      "user_views": views,
      "item_views": views[:, ::-1].copy(),
    },
  )


def _models(name, cfg):
  cls = registry.get(name).model
  return (
    cls(dataclasses.replace(cfg, scenario_compute="grouped")),
    cls(dataclasses.replace(cfg, scenario_compute="onehot")),
  )


def _max_diff(a, b):
  """Largest |a - b| over the leaves of two trees, divided by max(1, max |b| over the tree):
  float32 gradients of this model reach ~80 (bias gradients summed over the batch), and a
  gradient that is a sum of such terms carries their rounding, not its own size's."""
  xs = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  ys = [np.asarray(y, np.float64) for y in jax.tree.leaves(b)]
  assert [x.shape for x in xs] == [y.shape for y in ys]
  diff = max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(xs, ys))
  return diff / max(1.0, max(float(np.max(np.abs(y), initial=0.0)) for y in ys))


# ---------------------------------------------------------------------------------------------
# the grouped matmul


@pytest.mark.parametrize(
  "n,k,tile,blocks",
  [(1, 1, None, None), (37, 5, None, None), (200, 3, 8, None), (64, 4, 16, None), (96, 3, 8, 4)],
)
def test_grouped_matmul_equals_per_row_kernel(n, k, tile, blocks):
  key = jax.random.key(n)
  sc = jax.random.randint(key, (n,), 0, k)
  if n > 10:
    sc = jnp.where(sc == k - 1, 0, sc)  # one scenario absent: an empty group
  x = jax.random.normal(jax.random.key(1), (n, 7))
  w = jax.random.normal(jax.random.key(2), (k, 7, 5))
  g = grouped.make_groups(sc, k, tile, blocks)
  ref = lambda x, w: jnp.einsum("bi,bio->bo", x, w[sc])
  np.testing.assert_allclose(grouped.grouped_matmul(x, w, g), ref(x, w), atol=TOL)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  got = jax.grad(loss(lambda x, w: grouped.grouped_matmul(x, w, g)), (0, 1))(x, w)
  want = jax.grad(loss(ref), (0, 1))(x, w)
  assert _max_diff(got, want) < TOL
  # the layout, per block of n / S contiguous rows: every row in a slot of a tile of its own
  # scenario, at most (n / S + k (T-1)) // T tiles
  s, t = g.blocks, g.tile
  assert s == (blocks or 1)
  m = n // s
  for b in range(s):
    slots = np.asarray(g.dest[b])
    assert len(set(slots.tolist())) == m
    np.testing.assert_array_equal(np.asarray(g.src[b])[slots], np.arange(m))
    np.testing.assert_array_equal(
      np.asarray(g.tile_group[b])[slots // t], np.asarray(sc)[b * m : (b + 1) * m]
    )
  assert g.tile_group.shape[-1] == (m + k * (t - 1)) // t


@pytest.mark.parametrize(
  "n,k,want",
  # the measured best tiles (BENCHMARKS.md, "tile size"): N = 1024 at K = 3 / 8 / 16 / 32 and
  # N = 4096 at K = 3; then the clamps (8 for tiny batches, 256 for large ones)
  [
    (1024, 3, 128),
    (1024, 8, 64),
    (1024, 16, 64),
    (1024, 32, 32),
    (4096, 3, 256),
    (64, 3, 16),
    (64, 4, 16),
    (64, 2, 32),
    (8, 3, 8),
    (1 << 20, 1, 256),
  ],
)
def test_tile_size_follows_sqrt_rows_per_scenario(n, k, want):
  """T = the power of two <= min(sqrt(64 N / K), N / K) in [8, 256]: the old rule (<= N / (8 K)
  in [8, 128]) gave T = 8 at N = 1024, K = 32 (160 tiles, each gathering its kernel for 8
  rows): 1.4x slower there. The N / K bound keeps small batches' padding at most N rows."""
  t = grouped.tile_size(n, k)
  assert t == want
  assert t & (t - 1) == 0


def test_batch_blocks_context_sets_the_blocks_and_falls_back_when_they_do_not_divide():
  sc = jnp.arange(24) % 3
  with grouped.batch_blocks(4):
    assert grouped.make_groups(sc, 3).blocks == 4
    assert grouped.make_groups(sc[:22], 3).blocks == 1  # 22 rows: not 4 equal blocks
  assert grouped.make_groups(sc, 3).blocks == 1
  with pytest.raises(ValueError, match="do not split into 5 blocks"):
    grouped.make_groups(sc, 3, blocks=5)


def test_scenario_logits_grouped_equals_onehot_and_loop():
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.normal(size=(50, 6)), jnp.float32)
  items = jnp.asarray(rng.normal(size=(50, 4, 6)), jnp.float32)
  sc = jnp.asarray(rng.integers(0, 4, 50), jnp.int32)
  want = np.einsum("bd,jbd->bj", np.asarray(u), np.asarray(items)[:, np.asarray(sc)])
  for compute in ("grouped", "onehot"):
    np.testing.assert_allclose(losses.scenario_logits(u, items, sc, compute), want, atol=TOL)
  f = lambda c: jax.grad(
    lambda u, i: jnp.sum(jnp.tanh(losses.scenario_logits(u, i, sc, c))), (0, 1)
  )(u, items)
  assert _max_diff(f("grouped"), f("onehot")) < TOL
  with pytest.raises(ValueError, match="scenario_compute"):
    losses.scenario_logits(u, items, sc, "ragged")


# ---------------------------------------------------------------------------------------------
# every model: grouped == onehot


MODEL_VARIANTS = [(n, {}) for n in registry.names()] + [
  ("sass", {"gate_style": "gru"}),
  ("sass", {"gate_style": "none"}),
  ("sass", {"gate_per_scenario": True}),
  ("sass", {"bias_mode": "concat", "layer_norm": True}),
  ("ple", {"widths": (8,)}),
  ("ple", {"widths": (8, 6, 4)}),
  ("dssm_single", {"separate_embeddings": False}),
]


@pytest.mark.parametrize("name,kw", MODEL_VARIANTS, ids=[f"{n}{kw}" for n, kw in MODEL_VARIANTS])
def test_grouped_equals_onehot(tiny_cfg, tiny_features, name, kw):
  mg, mo = _models(name, tiny_cfg(**kw))
  b = _batch(tiny_features)
  vg = mg.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  vo = mo.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  # identical parameters (names, shapes, values): checkpoints of either load into the other
  assert jax.tree.structure(vg) == jax.tree.structure(vo)
  assert _max_diff(vg, vo) == 0.0
  variables = vo
  for method, feats in (("encode_user", b["user"]), ("encode_item", b["item"])):
    for sc in (b["scenario"], None):
      a = mg.apply(variables, feats, sc, method=method)
      o = mo.apply(variables, feats, sc, method=method)
      assert a.shape == o.shape
      assert _max_diff(a, o) < TOL, (method, sc is None)
  params, ms = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  rng = jax.random.key_data(jax.random.key(3))
  cases = {
    "finetune": lambda m, p: steps.finetune_loss(m, p, b, rng, 0.2, 1.0, ms),
    "finetune_same": lambda m, p: steps.finetune_loss(m, p, b, rng, 0.2, 1.0, ms, "same_scenario"),
    "pretrain_views": lambda m, p: steps.pretrain_loss(m, p, b, rng, 0.1, "scenario_views", ms),
    "pretrain_user_item": lambda m, p: steps.pretrain_loss(m, p, b, rng, 0.1, "user_item", ms),
  }
  for case, f in cases.items():
    (lg, (_, msg)), gg = jax.value_and_grad(lambda p: f(mg, p), has_aux=True)(params)
    (lo, (_, mso)), go = jax.value_and_grad(lambda p: f(mo, p), has_aux=True)(params)
    assert abs(float(lg) - float(lo)) < TOL, case
    assert _max_diff(gg, go) < TOL, case
    if ms:  # STAR's running statistics are updated the same way
      assert _max_diff(msg, mso) < TOL, case


BF16_VARIANTS = [(n, {}) for n in registry.names()] + [("ple", {"widths": (8,)})]


@pytest.mark.parametrize("name,kw", BF16_VARIANTS, ids=[f"{n}{kw}" for n, kw in BF16_VARIANTS])
def test_bfloat16_every_model_and_layout_runs_and_agrees(tiny_cfg, tiny_features, name, kw):
  """compute_dtype='bfloat16', both layouts, every loss: forward and gradients run (XLA:CPU has
  no bfloat16 x bfloat16 -> float32 kernel for some operand layouts; ``sass_jax.model.mixed``
  brings each product to one it has) and agree between the layouts within bfloat16 rounding."""
  mg, mo = _models(name, tiny_cfg(compute_dtype="bfloat16", **kw))
  b = _batch(tiny_features)
  v = mo.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  params, ms = v["params"], {k: x for k, x in v.items() if k != "params"}
  rng = jax.random.key_data(jax.random.key(3))
  cases = {
    "finetune": lambda m, p: steps.finetune_loss(m, p, b, rng, 0.2, 1.0, ms),
    "pretrain_views": lambda m, p: steps.pretrain_loss(m, p, b, rng, 0.1, "scenario_views", ms),
  }
  for case, f in cases.items():
    (lg, gg), (lo, go) = (
      jax.jit(jax.value_and_grad(lambda p: f(m, p)[0]))(params) for m in (mg, mo)
    )
    for g in (gg, go):
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g)), case
    assert abs(float(lg) - float(lo)) <= 0.02 * abs(float(lo)), (case, lg, lo)


def test_sass_views_equal_all_scenarios_slices(tiny_cfg, tiny_features):
  model = SASS(tiny_cfg())
  b = _batch(tiny_features)
  v = model.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  for method, feats, views in (
    ("encode_user", b["user"], b["user_views"]),
    ("encode_item", b["item"], b["item_views"]),
  ):
    got = model.apply(v, feats, views, method=method)  # [B, 2, D]
    allk = model.apply(v, feats, None, method=method)  # [B, K, D]
    assert got.shape == (B, 2, allk.shape[-1])
    np.testing.assert_allclose(got, np.take_along_axis(allk, views[:, :, None], 1), atol=TOL)
  onehot = SASS(tiny_cfg(scenario_compute="onehot"))
  with pytest.raises(ValueError, match="scenario_compute='grouped'"):
    onehot.apply(v, b["user"], b["user_views"], method="encode_user")


def test_grouped_bfloat16_close_to_onehot(tiny_cfg, tiny_features):
  mg, mo = _models("sass", tiny_cfg(compute_dtype="bfloat16"))
  b = _batch(tiny_features)
  v = mo.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  rng = jax.random.key_data(jax.random.key(3))
  for m in (mg, mo):
    assert m.apply(v, b["user"], b["scenario"], method="encode_user").dtype == jnp.float32
  f = lambda m: jax.value_and_grad(lambda p: steps.finetune_loss(m, p, b, rng, 0.2, 1.0)[0])(
    v["params"]
  )
  (lg, gg), (lo, go) = f(mg), f(mo)
  assert abs(float(lg) - float(lo)) < 0.01 * abs(float(lo))
  a, o = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (gg, go))
  assert np.dot(a, o) / (np.linalg.norm(a) * np.linalg.norm(o)) > 0.99


# ---------------------------------------------------------------------------------------------
# negatives='same_scenario'


def test_same_scenario_negatives_reference(tiny_cfg, tiny_features):
  """The loss equals a NumPy reference: row b's softmax over the batch's items of its scenario
  (each in that scenario), repeats of its positive item masked."""
  model = SASS(tiny_cfg())
  b = _batch(tiny_features, seed=1)
  v = model.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  rng = jax.random.key_data(jax.random.key(3))
  tau, alpha = 0.2, 0.7
  loss, _ = steps.finetune_loss(model, v["params"], b, rng, tau, alpha, None, "same_scenario")
  u = np.asarray(model.apply(v, b["user"], b["scenario"], method="encode_user"), np.float64)
  i = np.asarray(model.apply(v, b["item"], b["scenario"], method="encode_item"), np.float64)
  sc, ids, logq = (np.asarray(b[k]) for k in ("scenario", "item_index", "item_logq"))
  ce = []
  for r in range(B):
    cols = [j for j in range(B) if sc[j] == sc[r] and (j == r or ids[j] != ids[r])]
    z = np.array([u[r] @ i[j] / tau - alpha * logq[j] for j in cols])
    ce.append(np.log(np.exp(z).sum()) - z[cols.index(r)])
  np.testing.assert_allclose(float(loss), np.mean(ce), rtol=1e-5)
  with pytest.raises(ValueError, match="negatives"):
    steps.make_finetune_step(model, None, tau, alpha, negatives="other")


def _step_flops(model, b, negatives="all"):
  # counted with the dense softmax: XLA counts the row-blocked form's loop body once
  model = inbatch.dense_twin(model)
  rng = jax.random.key_data(jax.random.key(3))
  v = model.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  f = jax.jit(
    jax.grad(lambda p: steps.finetune_loss(model, p, b, rng, 0.2, 1.0, None, negatives)[0])
  )
  return float(f.lower(v["params"]).compile().cost_analysis()["flops"])


def test_grouped_does_less_arithmetic(tiny_cfg, tiny_features):
  """XLA's flop count of the fine-tune gradient: grouped < onehot (K = 8), and with
  same-scenario negatives the cost hardly grows from K = 3 to K = 32."""
  cfg = tiny_cfg(num_scenarios=8, widths=(64, 32), out_dim=32)
  b = _batch(tiny_features, batch=256, scenarios=range(8))
  mg, mo = _models("sass", cfg)
  assert _step_flops(mg, b) < 0.7 * _step_flops(mo, b)
  per_k = {}
  for k in (3, 32):
    m = SASS(dataclasses.replace(cfg, num_scenarios=k))
    per_k[k] = _step_flops(m, _batch(tiny_features, batch=256, scenarios=range(k)), "same_scenario")
  assert per_k[32] < 1.5 * per_k[3]


def test_config_validation_rejects_unknown_settings():
  from configs import test as test_config
  from sass_jax import config_check

  c = test_config.get_config()
  assert c.model.scenario_compute == "grouped" and c.train.negatives == "all"
  c.model.scenario_compute = "ragged"
  c.train.negatives = "some"
  with pytest.raises(ValueError) as e:
    config_check.validate(c)
  assert "config.model.scenario_compute='ragged'" in str(e.value)
  assert "config.train.negatives='some'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# the PyTorch reference mirrors both formulations


def test_torch_reference_grouped_equals_onehot_and_jax(tiny_cfg, tiny_features):
  pytest.importorskip("torch")
  from sass_jax.bench import torch_reference as tr

  cfg = tiny_cfg()
  model = SASS(cfg)
  b = _batch(tiny_features, seed=2)
  v = model.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  params = jax.device_get(nn.meta.unbox(v["params"]))
  tb = tr.to_torch(jax.device_get(b))
  rng = jax.random.key_data(jax.random.key(3))
  cases = {
    "finetune_all": (
      lambda m: tr.finetune_loss(m, tb, 0.2, 1.0),
      steps.finetune_loss(model, v["params"], b, rng, 0.2, 1.0)[0],
    ),
    "finetune_same": (
      lambda m: tr.finetune_loss(m, tb, 0.2, 1.0, "same_scenario"),
      steps.finetune_loss(model, v["params"], b, rng, 0.2, 1.0, None, "same_scenario")[0],
    ),
    "pretrain_views": (
      lambda m: tr.pretrain_loss(m, tb, 0.1, "scenario_views"),
      steps.pretrain_loss(model, v["params"], b, rng, 0.1, "scenario_views")[0],
    ),
  }
  models = {}
  for compute in ("grouped", "onehot"):
    m = tr.TorchSASS.from_model_config(dataclasses.replace(cfg, scenario_compute=compute))
    m.load_flax_params(params)
    models[compute] = m
  assert models["grouped"].compute == "grouped"
  for case, (f, want) in cases.items():
    grads = {}
    for compute, m in models.items():
      m.zero_grad(set_to_none=True)
      loss = f(m)
      loss.backward()
      np.testing.assert_allclose(float(loss.detach()), float(want), rtol=1e-5, err_msg=case)
      grads[compute] = [
        p.grad.detach().numpy().copy()
        if p.grad is not None
        else np.zeros(tuple(p.shape), np.float32)
        for p in m.parameters()
      ]
    assert _max_diff(grads["grouped"], grads["onehot"]) < TOL, case


def test_torch_reference_tables_have_the_jax_row_counts(tiny_cfg, tiny_features):
  """A table of at least 65,536 rows is padded further (model/embedding.py ``padded_rows``);
  the reference's tables must have exactly the JAX tables' rows or ``load_flax_params`` fails
  (it did for the Ali-CCP-scale benchmark: 290,168 vs 290,816 user-id rows)."""
  pytest.importorskip("torch")
  from sass_jax.bench import torch_reference as tr

  big = dataclasses.replace(tiny_cfg().user_specs[0], vocab_size=70_001)
  cfg = tiny_cfg(user_specs=(big,) + tuple(tiny_cfg().user_specs[1:]))
  b = _batch(tiny_features)
  shapes = jax.eval_shape(
    lambda: SASS(cfg).init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  )
  jax_rows = nn.meta.unbox(shapes["params"])["user_tower"]["embed"][big.name].shape[0]
  assert jax_rows > 70_001  # padded beyond vocab_pad_to
  m = tr.TorchSASS.from_model_config(cfg)
  assert tuple(m.user_tower.embed[big.name].shape) == (jax_rows, cfg.embed_dim)
