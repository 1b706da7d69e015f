"""The row-blocked in-batch softmax (sass_jax/train/inbatch.py) against the dense losses and a
NumPy oracle: same loss and gradients on random inputs (every masking and layout the training
losses use, tiles that leave padded slots), no [B, B] array anywhere in the traced gradient,
bfloat16 products accumulated in float32, the mesh fallback, and the training steps with
either form (SASS and a baseline, both stages)."""

from __future__ import annotations

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from sass_jax.model import grouped, registry
from sass_jax.train import inbatch, losses, steps

B, K, D = 150, 3, 8
TAU, ALPHA = 0.2, 1.5


def _inputs(seed=0, b=B, k=K, d=D, id_range=40):
  r = np.random.default_rng(seed)
  return dict(
    u=jnp.asarray(r.normal(size=(b, d)), jnp.float32),
    ia=jnp.asarray(r.normal(size=(b, k, d)), jnp.float32),
    sc=jnp.asarray(r.integers(0, k, b), jnp.int32),
    ids=jnp.asarray(r.integers(0, id_range, b), jnp.int32),
    uid=jnp.asarray(r.integers(0, id_range + 20, b), jnp.int32),
    lq=jnp.asarray(np.log(r.uniform(1e-3, 0.1, b)), jnp.float32),
  )


def _close(got, want, tol=1e-5):
  (lg, gg), (lw, gw) = got, want
  np.testing.assert_allclose(float(lg), float(lw), rtol=tol)
  for a, w in zip(gg, gw):
    scale = max(1e-6, float(jnp.max(jnp.abs(w))))
    assert float(jnp.max(jnp.abs(a - w))) / scale < tol


@pytest.mark.parametrize("tile", [None, 8, 64, 256])
def test_scenario_keys_equal_the_dense_sampled_softmax(tile):
  """negatives='all': row b scores every item in its own scenario, logQ bias, repeats of the
  positive item masked; loss and gradients as the dense form's, for tiles that leave padded
  slots (8, 64) and one larger than the batch (256)."""
  x = _inputs()

  def dense(u, ia):
    logits = losses.scenario_logits(u, ia, x["sc"])
    return losses.sampled_softmax_logq(logits, x["ids"], x["lq"], TAU, ALPHA)

  def blocked(u, ia):
    return inbatch.softmax_ce(
      u, ia, TAU, bias=-ALPHA * x["lq"], scenario=x["sc"], dup_ids=(x["ids"],), tile=tile
    )

  f = lambda fn: jax.jit(jax.value_and_grad(fn, (0, 1)))(x["u"], x["ia"])
  _close(f(blocked), f(dense))


def test_same_group_equals_the_dense_same_scenario_loss():
  x = _inputs(1)
  i = x["ia"][:, 0]
  dense = lambda u, i: losses.sampled_softmax_logq(
    u @ i.T, x["ids"], x["lq"], TAU, ALPHA, scenario=x["sc"]
  )
  blocked = lambda u, i: inbatch.softmax_ce(
    u, i, TAU, bias=-ALPHA * x["lq"], dup_ids=(x["ids"],), same_group=x["sc"], tile=32
  )
  f = lambda fn: jax.value_and_grad(fn, (0, 1))(x["u"], i)
  _close(f(blocked), f(dense))


@pytest.mark.parametrize("ids", ["user", "user_item"])
def test_info_nce_equals_the_dense_symmetric_loss(ids):
  """Both directions of the symmetric InfoNCE, masking by one id or by (user, item) ids."""
  x = _inputs(2)
  a, b = x["u"], x["ia"][:, 1]
  key = x["uid"] if ids == "user" else (x["uid"], x["ids"])
  f = lambda fn: jax.value_and_grad(fn, (0, 1))(a, b)
  _close(
    f(lambda a, b: inbatch.info_nce(a, b, key, TAU, min_rows=0)),
    f(lambda a, b: losses.info_nce(a, b, key, TAU)),
  )


def test_small_float32_info_nce_is_the_dense_form():
  """Below INFO_NCE_MIN_ROWS a float32 InfoNCE traces the dense form (a [B, B] array); bfloat16
  products, or min_rows=0, take the blocked one."""
  x = _inputs(2)
  a, b, key = x["u"], x["ia"][:, 1], (x["uid"], x["ids"])
  assert B < inbatch.INFO_NCE_MIN_ROWS
  shapes = lambda **kw: _shapes(
    jax.make_jaxpr(jax.grad(lambda a: inbatch.info_nce(a, b, key, TAU, **kw)))(a).jaxpr
  )
  assert (B, B) in shapes()
  assert (B, B) not in shapes(min_rows=0) and (B, B) not in shapes(dtype="bfloat16")


def test_numpy_oracle_and_a_fully_masked_row():
  """A hand-made batch: row 0's item is every other row's item too, so its every negative is
  masked and its loss is 0; the rest against an explicit float64 loop."""
  x = _inputs(3, b=12, k=2, d=4)
  ids = np.arange(12, dtype=np.int32)
  ids[[0, 3, 7]] = 5
  ids = np.where(np.arange(12) == 0, 5, ids)
  sc = np.asarray(x["sc"])
  u, ia, lq = (np.asarray(x[k], np.float64) for k in ("u", "ia", "lq"))
  got = inbatch.softmax_ce(
    x["u"],
    x["ia"],
    TAU,
    bias=-ALPHA * x["lq"],
    scenario=x["sc"],
    dup_ids=(jnp.asarray(ids),),
    tile=8,
  )
  ce = []
  for r in range(12):
    cols = [j for j in range(12) if j == r or ids[j] != ids[r]]
    z = np.array([u[r] @ ia[j, sc[r]] / TAU - ALPHA * lq[j] for j in cols])
    ce.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[cols.index(r)])
  np.testing.assert_allclose(float(got), np.mean(ce), rtol=1e-5)
  # one-row softmax: a row whose every other column is masked contributes exactly 0
  only = inbatch.softmax_ce(x["u"][:3], x["ia"][:3, 0], TAU, dup_ids=(jnp.zeros(3, jnp.int32),))
  assert float(only) == 0.0


def _shapes(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    for v in list(eqn.outvars) + [v for v in eqn.invars if hasattr(v, "aval")]:
      out.add(tuple(getattr(v.aval, "shape", ())))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes(sub)
  return out


def test_no_batch_by_batch_array_in_the_gradient():
  """Neither the forward nor the backward pass of the blocked loss holds a [B, B] array (the
  dense form does; the check fails for it)."""
  x = _inputs(4)
  blocked = lambda u, ia: inbatch.softmax_ce(
    u, ia, TAU, bias=-ALPHA * x["lq"], scenario=x["sc"], dup_ids=(x["ids"],), tile=16
  )
  dense = lambda u, ia: losses.sampled_softmax_logq(
    losses.scenario_logits(u, ia, x["sc"]), x["ids"], x["lq"], TAU, ALPHA
  )
  shapes = lambda fn: _shapes(jax.make_jaxpr(jax.value_and_grad(fn, (0, 1)))(x["u"], x["ia"]).jaxpr)
  assert (B, B) in shapes(dense)
  assert not any(s[-2:] == (B, B) for s in shapes(blocked) if len(s) >= 2)
  assert (16, B) in shapes(blocked)  # the tile


def test_bfloat16_products_accumulate_in_float32():
  """dtype='bfloat16': every product in the scan takes bfloat16 operands and returns float32;
  the loss and gradients stay within bfloat16 rounding of the float32 ones."""
  x = _inputs(5)
  fn = lambda dt: (
    lambda u, ia: inbatch.softmax_ce(
      u, ia, TAU, bias=-ALPHA * x["lq"], scenario=x["sc"], dup_ids=(x["ids"],), dtype=dt
    )
  )
  jaxpr = jax.make_jaxpr(jax.value_and_grad(fn("bfloat16"), (0, 1)))(x["u"], x["ia"]).jaxpr

  def dots(j):
    for eqn in j.eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from dots(sub)

  found = list(dots(jaxpr))
  assert len(found) == 3
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2
    assert eqn.outvars[0].aval.dtype == jnp.float32
  (l16, g16) = jax.value_and_grad(fn("bfloat16"), (0, 1))(x["u"], x["ia"])
  (l32, g32) = jax.value_and_grad(fn("float32"), (0, 1))(x["u"], x["ia"])
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)
  for a, b in zip(g16, g32):
    a, b = np.ravel(a), np.ravel(b)
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_keys_without_scenario_and_bad_settings_raise():
  x = _inputs(6)
  with pytest.raises(ValueError, match="scenario"):
    inbatch.softmax_ce(x["u"], x["ia"], TAU)
  with pytest.raises(ValueError, match="do not match"):
    inbatch.softmax_ce(x["u"], x["ia"][:-1, 0], TAU)
  with pytest.raises(ValueError, match="inbatch_softmax='tiled'"):
    inbatch.blocked_here("tiled")


def test_a_batch_split_over_the_data_axis_takes_the_dense_form():
  assert inbatch.blocked_here("blocked") and not inbatch.blocked_here("dense")
  with grouped.batch_blocks(4):
    assert not inbatch.blocked_here("blocked")
  with grouped.batch_blocks(1):
    assert inbatch.blocked_here("blocked")


# ---------------------------------------------------------------------------------------------
# the training steps with either form


@pytest.mark.parametrize("name", ["sass", "mmoe"])
@pytest.mark.parametrize(
  "stage,reading",
  [
    ("finetune", "all"),
    ("finetune", "same_scenario"),
    ("pretrain", "scenario_views"),
    ("pretrain", "user_item"),
  ],
)
def test_steps_blocked_equal_dense(name, stage, reading, tiny_cfg, tiny_features, monkeypatch):
  from tests.test_scenario_compute import _batch, _max_diff

  monkeypatch.setattr(inbatch, "INFO_NCE_MIN_ROWS", 0)  # the blocked InfoNCE at this small B

  cls = registry.get(name).model
  cfg = tiny_cfg()
  mb = cls(dataclasses.replace(cfg, inbatch_softmax="blocked"))
  md = cls(dataclasses.replace(cfg, inbatch_softmax="dense"))
  assert inbatch.dense_twin(mb).cfg == md.cfg and inbatch.dense_twin(md) is md
  b = _batch(tiny_features, batch=64, seed=7)
  v = md.init(jax.random.key(0), b["user"], b["item"], b["scenario"])
  rng = jax.random.key_data(jax.random.key(3))
  ms = {k: x for k, x in v.items() if k != "params"}

  def loss(m):
    if stage == "finetune":
      return lambda p: steps.finetune_loss(m, p, b, rng, TAU, ALPHA, ms, reading)[0]
    return lambda p: steps.pretrain_loss(m, p, b, rng, TAU, reading, ms)[0]

  (lb, gb), (ld, gd) = (jax.jit(jax.value_and_grad(loss(m)))(v["params"]) for m in (mb, md))
  np.testing.assert_allclose(float(lb), float(ld), rtol=1e-5)
  assert _max_diff(gb, gd) < 1e-5


def test_softmax_benchmark_runs_every_variant(tmp_path):
  from sass_jax.bench import softmax

  out = tmp_path / "softmax.json"
  softmax.main(["--batch_size", "64", "--calls", "1", "--rounds", "1", "--out", str(out)])
  res = __import__("json").loads(out.read_text())
  assert len(res["ms"]) == 6 and all(len(v) == 1 and v[0] > 0 for v in res["ms"].values())
