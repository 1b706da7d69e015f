"""Row-sparse embedding updates (sass_jax/train/sparse.py) against NumPy references and the
dense path: lazy Adam and row-wise Adagrad on the touched rows, untouched rows unchanged,
the non-table params as in the dense step, the masked dense reference, checkpoint resume."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sass_jax.schema import FieldSpec
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.train import sparse, steps

USER = (FieldSpec("user_id", 40), FieldSpec("gender", 3))
ITEM = (FieldSpec("movie_id", 30), FieldSpec("genres", 9, multi_hot=3), FieldSpec("year", 6))
B, K, TAU, ALPHA = 8, 3, 0.2, 1.0


def _model():
  return SASS(
    ModelConfig(
      user_specs=USER,
      item_specs=ITEM,
      num_scenarios=K,
      embed_dim=4,
      scenario_dim=4,
      widths=(8, 6),
      out_dim=5,
      bias_hidden=4,
    )
  )


def _stage_cfg(lr=3e-2, wd=0.01):
  c = ml_collections.ConfigDict()
  c.learning_rate, c.warmup_steps, c.weight_decay = lr, 0, wd
  c.tau, c.pairs = TAU, "scenario_views"
  return c


def _batch(seed: int, stream: str = "finetune") -> dict:
  r = np.random.default_rng(seed)
  user = {
    "user_id": r.integers(0, 40, B, dtype=np.int32),
    "gender": r.integers(0, 3, B, dtype=np.int32),
  }
  genres = r.integers(0, 9, (B, 3), dtype=np.int32)
  mask = r.random((B, 3)) < 0.7
  mask[:, 0] = True
  item = {
    "movie_id": r.integers(0, 30, B, dtype=np.int32),
    "genres": genres,
    "genres_mask": mask,
    "year": r.integers(0, 6, B, dtype=np.int32),
  }
  b = {
    "user": user,
    "item": item,
    "scenario": r.integers(0, K, B, dtype=np.int32),
    "user_index": user["user_id"].copy(),
    "item_index": item["movie_id"].copy(),
  }
  if stream == "finetune":
    b["item_logq"] = np.log(r.uniform(0.01, 0.1, B)).astype(np.float32)
  else:
    a = r.integers(0, K, B)
    b["user_views"] = np.stack([a, (a + r.integers(1, K, B)) % K], 1).astype(np.int32)
    a = r.integers(0, K, B)
    b["item_views"] = np.stack([a, (a + r.integers(1, K, B)) % K], 1).astype(np.int32)
  return jax.tree.map(jnp.asarray, b)


@functools.lru_cache(maxsize=None)
def _setup(kind, stream="finetune", masked=False, num_steps=50, wd=0.01):
  """(model, tx, opts, initial state, jitted step), built once per argument set (the step is
  not donating, so tests can reuse the state)."""
  model = _model()
  scfg = _stage_cfg(wd=wd)
  tx = steps.make_optimizer(scfg, num_steps)
  opts = sparse.SparseOptions(
    kind, steps.make_schedule(scfg, num_steps), weight_decay=wd, masked=masked
  )
  init = sparse.make_init_fn(model, tx, opts, _batch(0, stream), seed=3)
  state = jax.jit(lambda: nn.meta.unbox(init()))()
  if stream == "finetune":
    step = sparse.make_finetune_step(model, tx, opts, TAU, ALPHA)
  else:
    step = sparse.make_pretrain_step(model, tx, opts, TAU, "scenario_views")
  return model, tx, opts, state, jax.jit(step)


def _dense_grad(model, stream):
  """Jitted gradient of the unchanged model's loss w.r.t. all params (dense tables)."""
  if stream == "finetune":
    f = lambda p, b, rng: steps.finetune_loss(model, p, b, rng, TAU, ALPHA)[0]
  else:
    f = lambda p, b, rng: steps.pretrain_loss(model, p, b, rng, TAU, "scenario_views")[0]
  return jax.jit(jax.grad(f))


def _np_rowwise(kind, p, st, g, touched, lr, count, wd, opts):
  """NumPy reference: the row-wise rule applied to rows ``touched`` only (float64)."""
  p, g = p.astype(np.float64), g.astype(np.float64)
  p_new, st_new = p.copy(), {k: v.astype(np.float64).copy() for k, v in st.items()}
  r = touched
  if kind == "lazy_adam":
    t = count + 1
    m = opts.b1 * st["m"][r] + (1 - opts.b1) * g[r]
    v = opts.b2 * st["v"][r] + (1 - opts.b2) * g[r] ** 2
    upd = (m / (1 - opts.b1**t)) / (np.sqrt(v / (1 - opts.b2**t)) + opts.eps) + wd * p[r]
    st_new["m"][r], st_new["v"][r] = m, v
  else:
    acc = st["acc"][r] + (g[r] ** 2).mean(-1)
    upd = g[r] / (np.sqrt(acc)[:, None] + opts.adagrad_eps) + wd * p[r]
    st_new["acc"][r] = acc
  p_new[r] = p[r] - lr * upd
  return p_new, st_new


@pytest.mark.parametrize(
  "kind,stream", [("lazy_adam", "finetune"), ("rowwise_adagrad", "pretrain")]
)
def test_sparse_update_matches_numpy_reference(kind, stream):
  model, _, opts, state, step = _setup(kind, stream)
  grad = _dense_grad(model, stream)
  tables = sparse.find_tables(model, state.params)
  assert {t.path for t in tables} == {("user_tower", "embed", f.name) for f in USER} | {
    ("item_tower", "embed", f.name) for f in ITEM
  }
  for i in range(3):
    batch = _batch(10 + i, stream)
    before = jax.device_get(state)
    grads = jax.device_get(grad(state.params, batch, state.rng))
    state, m = step(state, batch)
    after = jax.device_get(state)
    assert int(after.opt_state["count"]) == i + 1
    lr = float(opts.learning_rate(i))
    n_touched = 0
    for t in tables:
      get = lambda tree: tree[t.path[0]][t.path[1]][t.path[2]]
      ids = np.asarray(batch[t.side][t.field]).reshape(-1)
      touched = np.unique(ids)
      untouched = np.setdiff1d(np.arange(t.rows), touched)
      n_touched += len(touched)
      p_ref, st_ref = _np_rowwise(
        kind,
        get(before.params),
        get(before.opt_state["tables"]),
        get(grads),
        touched,
        lr,
        i,
        0.01,
        opts,
      )
      np.testing.assert_allclose(
        get(after.params)[touched], p_ref[touched], rtol=2e-5, atol=2e-6, err_msg=str(t.path)
      )
      np.testing.assert_array_equal(get(after.params)[untouched], get(before.params)[untouched])
      for k, v in get(after.opt_state["tables"]).items():
        np.testing.assert_allclose(v[touched], st_ref[k][touched], rtol=2e-5, atol=1e-9)
        np.testing.assert_array_equal(v[untouched], get(before.opt_state["tables"])[k][untouched])
      # The rows really moved (the learning rate is not zero).
      assert np.abs(get(after.params)[touched] - get(before.params)[touched]).max() > 1e-4
    assert int(m["touched_rows"]) == n_touched
    np.testing.assert_allclose(float(m["grad_norm"]), float(steps._norm(grads)), rtol=1e-5)


def test_non_table_params_match_dense_step():
  """One step from the same init: the non-table params equal those of the dense AdamW step."""
  model, tx, _, state, step = _setup("lazy_adam")
  init_dense = steps.make_init_fn(model, tx, _batch(0), seed=3)
  dense_state = jax.jit(lambda: nn.meta.unbox(init_dense()))()
  tables = sparse.find_tables(model, state.params)
  rest0, _ = sparse.split_params(dense_state.params, tables)
  rest_s0, _ = sparse.split_params(state.params, tables)
  jax.tree.map(np.testing.assert_array_equal, rest0, rest_s0)
  batch = _batch(5)
  new_dense, md = jax.jit(steps.make_finetune_step(model, tx, TAU, ALPHA))(dense_state, batch)
  new_sparse, ms = step(state, batch)
  rest_d, _ = sparse.split_params(new_dense.params, tables)
  rest_s, _ = sparse.split_params(new_sparse.params, tables)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), rest_d, rest_s)
  assert not np.allclose(jax.tree.leaves(rest_d)[0], jax.tree.leaves(rest0)[0])
  np.testing.assert_allclose(float(ms["loss"]), float(md["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(ms["grad_norm"]), float(md["grad_norm"]), rtol=1e-5)


@pytest.mark.parametrize(
  "kind,stream", [("lazy_adam", "finetune"), ("rowwise_adagrad", "pretrain")]
)
def test_masked_dense_reference_equals_sparse(kind, stream):
  """The dense lazy-update reference (full gradient, touched-row mask) gives the same state."""
  _, _, _, state, step = _setup(kind, stream)
  _, _, _, _, ref_step = _setup(kind, stream, masked=True)
  s1, s2 = state, state
  for i in range(2):
    s1, m1 = step(s1, _batch(20 + i, stream))
    s2, m2 = ref_step(s2, _batch(20 + i, stream))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  jax.tree.map(close, jax.device_get(s1.params), jax.device_get(s2.params))
  jax.tree.map(close, jax.device_get(s1.opt_state), jax.device_get(s2.opt_state))
  assert int(m1["touched_rows"]) == int(m2["touched_rows"])
  np.testing.assert_allclose(float(m1["param_norm"]), float(m2["param_norm"]), rtol=1e-5)


def test_options_and_unsupported_models():
  c = ml_collections.ConfigDict({"embedding_optimizer": "dense"})
  assert sparse.options_from_config(c, _stage_cfg(), 10) is None
  c.embedding_optimizer = "sgd"
  with pytest.raises(ValueError, match="embedding_optimizer='sgd'"):
    sparse.options_from_config(c, _stage_cfg(), 10)
  c.embedding_optimizer = "lazy_adam"
  c.embedding_learning_rate = 0.3
  o = sparse.options_from_config(c, _stage_cfg(lr=0.1), 10)
  assert o.kind == "lazy_adam" and float(o.learning_rate(0)) == pytest.approx(0.3)
  # A table that is not addressed by the batch ids directly (K * R rows) is refused.
  model = _model()
  params = {
    "user_tower": {"embed": {"user_id": jnp.zeros((3 * 40, 4)), "gender": jnp.zeros((8, 4))}}
  }
  with pytest.raises(ValueError, match="user_tower/embed/user_id"):
    sparse.find_tables(model, params)


def test_train_stage_sparse_checkpoint_resume(tmp_path, ml_sample_dir):
  """loop.train_stage with lazy_adam: resumed from the step-4 checkpoint, the stage ends with
  the same params and optimiser state (tables' moments included) as the straight 6-step run."""
  import shutil

  from configs import test as test_cfg
  from sass_jax.partition import Partitioner
  from sass_jax.train import loop

  c = test_cfg.get_config("sass_base")
  c.data.dir = str(ml_sample_dir)
  c.train.embedding_optimizer = "lazy_adam"
  c.train.num_steps, c.train.warmup_steps, c.checkpoint.every_steps = 6, 0, 2
  data = loop.prepare(c, tmp_path / "a")
  model = loop.build_model(c, data)
  part = Partitioner(c.mesh)
  straight = loop.train_stage("finetune", c, data, model, part, tmp_path / "a", show_progress=False)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  ck = tmp_path / "b" / "checkpoints" / "finetune"
  assert sorted(p.name for p in ck.iterdir() if p.name.isdigit()) == ["4", "6"]
  shutil.rmtree(ck / "6")
  resumed = loop.train_stage("finetune", c, data, model, part, tmp_path / "b", show_progress=False)
  assert int(resumed.step) == 6 and int(resumed.opt_state["count"]) == 6
  assert set(resumed.opt_state) == {"dense", "tables", "count"}
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(straight.params), jax.device_get(resumed.params)
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(straight.opt_state),
    jax.device_get(resumed.opt_state),
  )
