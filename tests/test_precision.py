"""Mixed precision (config.model.compute_dtype='bfloat16'): the towers compute in bfloat16 while
parameters, optimiser state and losses stay float32; losses and gradients agree with float32.

Stated tolerances: for the same params and batch, |loss_bf16 - loss_fp32| <= 1% of
loss_fp32 (fine-tune and scenario-view pre-training) and the gradients' cosine similarity >= 0.95
(measured on CPU: losses within 0.2%, cosine 0.977-0.999); after 10 AdamW steps from the same
init the two runs' losses still agree within 5%.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sass_jax.schema import FieldSpec
from sass_jax.model import mixed
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.train import steps

LOSS_RTOL, GRAD_COS, TRAIN_RTOL = 0.01, 0.95, 0.05
USER = (FieldSpec("user_id", 200), FieldSpec("age", 8))
ITEM = (FieldSpec("item_id", 150), FieldSpec("genres", 20, multi_hot=4))
B, K = 128, 3


def _models():
  cfg = ModelConfig(
    user_specs=USER,
    item_specs=ITEM,
    num_scenarios=K,
    embed_dim=16,
    scenario_dim=16,
    widths=(64, 32),
    out_dim=32,
    bias_hidden=16,
  )
  return SASS(cfg), SASS(dataclasses.replace(cfg, compute_dtype="bfloat16"))


def _batch(seed):
  r = np.random.default_rng(seed)
  mask = r.random((B, 4)) < 0.6
  mask[:, 0] = True
  a, c = r.integers(0, K, B), r.integers(0, K, B)
  b = {
    "user": {"user_id": r.integers(0, 200, B), "age": r.integers(0, 8, B)},
    "item": {
      "item_id": r.integers(0, 150, B),
      "genres": r.integers(0, 20, (B, 4)),
      "genres_mask": mask,
    },
    "scenario": r.integers(0, K, B),
    "item_logq": np.log(r.uniform(0.001, 0.05, B)),
    "user_views": np.stack([a, (a + r.integers(1, K, B)) % K], 1),
    "item_views": np.stack([c, (c + r.integers(1, K, B)) % K], 1),
  }
  b["user_index"], b["item_index"] = b["user"]["user_id"], b["item"]["item_id"]
  cast = lambda x: jnp.asarray(
    x, jnp.float32 if x.dtype.kind == "f" else (bool if x.dtype == bool else jnp.int32)
  )
  return jax.tree.map(cast, b)


def _init(model, tx):
  init = steps.make_init_fn(model, tx, _batch(0), seed=0)
  return jax.jit(lambda: nn.meta.unbox(init()))()


def _losses(model, params, batch, rng):
  return {
    "finetune": lambda p: steps.finetune_loss(model, p, batch, rng, 0.2, 1.0)[0],
    "pretrain_views": lambda p: steps.pretrain_loss(model, p, batch, rng, 0.1, "scenario_views")[0],
  }


def _cos(a, b):
  fa = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]).astype(np.float64)
  fb = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)]).astype(np.float64)
  return float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))


def test_bf16_losses_and_gradients_agree_with_fp32():
  m32, m16 = _models()
  tx = steps.make_optimizer(
    ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0}), 10
  )
  state = _init(m32, tx)
  batch = _batch(1)
  l32, l16 = (
    _losses(m32, state.params, batch, state.rng),
    _losses(m16, state.params, batch, state.rng),
  )
  # The bfloat16 model really computes in bfloat16: its tower output differs from float32's
  # but is returned (L2-normalised) in float32.
  u32 = m32.apply({"params": state.params}, batch["user"], batch["scenario"], method="encode_user")
  u16 = m16.apply({"params": state.params}, batch["user"], batch["scenario"], method="encode_user")
  assert u16.dtype == jnp.float32 and not np.array_equal(u16, u32)
  np.testing.assert_allclose(np.linalg.norm(u16, axis=-1), 1.0, rtol=1e-5)
  for name in l32:
    v32, g32 = jax.jit(jax.value_and_grad(l32[name]))(state.params)
    v16, g16 = jax.jit(jax.value_and_grad(l16[name]))(state.params)
    assert v16.dtype == jnp.float32, name
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16)), name
    assert float(v16) != float(v32), name
    assert abs(float(v16) - float(v32)) <= LOSS_RTOL * abs(float(v32)), (name, v16, v32)
    assert _cos(g16, g32) >= GRAD_COS, name


def test_bf16_training_tracks_fp32():
  """10 fine-tune steps each from the same init: float32 params and optimiser state in both,
  and the losses stay within TRAIN_RTOL."""
  m32, m16 = _models()
  tx = steps.make_optimizer(
    ml_collections.ConfigDict({"learning_rate": 3e-3, "warmup_steps": 0, "weight_decay": 0.0}), 10
  )
  s32, s16 = _init(m32, tx), _init(m16, tx)
  jax.tree.map(np.testing.assert_array_equal, s32.params, s16.params)
  f32 = jax.jit(steps.make_finetune_step(m32, tx, 0.2, 1.0))
  f16 = jax.jit(steps.make_finetune_step(m16, tx, 0.2, 1.0))
  first = last = None
  for i in range(10):
    b = _batch(10 + i)
    s32, a = f32(s32, b)
    s16, c = f16(s16, b)
    first = first or (float(a["loss"]), float(c["loss"]))
    last = (float(a["loss"]), float(c["loss"]))
  assert all(
    x.dtype == jnp.float32
    for x in jax.tree.leaves((s16.params, s16.opt_state))
    if jnp.issubdtype(x.dtype, jnp.floating)
  )
  assert last[0] < first[0] and last[1] < first[1]  # both learn
  assert abs(last[1] - last[0]) <= TRAIN_RTOL * last[0], last


# ---- the products: bfloat16 operands, float32 accumulation, in both passes ------------------


def test_mixed_einsum_accumulates_in_float32_in_both_passes():
  r = np.random.default_rng(0)
  a32 = jnp.asarray(r.standard_normal((3, 64, 48)), jnp.float32)
  b32 = jnp.asarray(r.standard_normal((3, 48, 32)), jnp.float32)
  w = jnp.asarray(r.standard_normal((3, 64, 32)), jnp.float32)
  spec = "kbi,kio->kbo"
  # float32 operands: exactly jnp.einsum
  np.testing.assert_array_equal(mixed.einsum(spec, a32, b32), jnp.einsum(spec, a32, b32))
  a, b = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
  y = mixed.einsum(spec, a, b)
  assert y.dtype == jnp.bfloat16
  want = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
  # gradients: bfloat16, within bfloat16 rounding of the float32 gradients of the same values
  f = lambda a, b: jnp.sum(mixed.einsum(spec, a, b).astype(jnp.float32) * w)
  ga, gb = jax.grad(f, (0, 1))(a, b)
  assert ga.dtype == gb.dtype == jnp.bfloat16
  f32 = lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * w)
  ra, rb = jax.grad(f32, (0, 1))(a.astype(jnp.float32), b.astype(jnp.float32))
  for got, ref in ((ga, ra), (gb, rb)):
    err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))
    assert err.max() <= 1e-2 * np.abs(np.asarray(ref)).max(), err.max()
  with pytest.raises(ValueError, match="every index of the first operand"):
    mixed.einsum("kbx,kio->kbo", a, b)
  with pytest.raises(ValueError, match="explicit two-operand spec"):
    mixed.einsum("kbi,kio", a, b)


def _dot_dtypes(jaxpr, out):
  """(lhs, rhs, result) dtypes of every dot_general in ``jaxpr`` and its sub-jaxprs."""
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      out.append(tuple(str(v.aval.dtype) for v in (*e.invars[:2], e.outvars[0])))
    for p in e.params.values():
      for q in p if isinstance(p, (list, tuple)) else [p]:
        if isinstance(q, jax.extend.core.ClosedJaxpr):
          _dot_dtypes(q.jaxpr, out)
        elif isinstance(q, jax.extend.core.Jaxpr):
          _dot_dtypes(q, out)
  return out


def test_bf16_model_multiplies_bf16_operands_with_float32_accumulation():
  """Every product of the bfloat16 towers, forward and backward, takes two bfloat16 operands
  and accumulates in float32 (``sass_jax.model.mixed``). Before, they returned bfloat16, which
  XLA:CPU ran 10x slower than float32-accumulated products on a CPU with AMX."""
  m32, m16 = _models()
  tx = steps.make_optimizer(
    ml_collections.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0}), 10
  )
  state = _init(m32, tx)
  for name, f in _losses(m16, state.params, _batch(1), state.rng).items():
    dots = _dot_dtypes(jax.make_jaxpr(jax.grad(f))(state.params).jaxpr, [])
    with_bf16 = [d for d in dots if "bfloat16" in d]
    assert len(with_bf16) >= 50, (name, len(with_bf16))
    assert all(d == ("bfloat16", "bfloat16", "float32") for d in with_bf16), (name, set(with_bf16))


SPECS = [  # every form the models use, and more; shapes with a 1 among them
  ("bk,bki->bi", (8, 3), (8, 3, 5)),
  ("bi,kio->bko", (8, 4), (3, 4, 5)),
  ("kbi,kio->kbo", (3, 8, 4), (3, 4, 5)),
  ("bi,io->bo", (8, 4), (4, 5)),
  ("bki,kio->bko", (8, 3, 4), (3, 4, 5)),
  ("stri,stio->stro", (1, 2, 8, 4), (1, 2, 4, 5)),
  ("be,bew->bw", (8, 3), (8, 3, 5)),
  ("bke,bew->bkw", (8, 3, 2), (8, 2, 5)),
  ("bi,keio->bkeo", (8, 4), (3, 2, 4, 5)),
  ("bki,keio->bkeo", (8, 3, 4), (3, 2, 4, 5)),
  ("abz,aby->yz", (2, 8, 5), (2, 8, 4)),
  ("bo,bi->oi", (1, 4), (1, 5)),
  ("kbi,kio->kbo", (1, 8, 4), (1, 4, 1)),
]


@pytest.mark.parametrize("spec,s1,s2", SPECS)
def test_mixed_einsum_runs_every_form_eagerly_and_jitted(spec, s1, s2):
  """XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for some operand layouts (a plain
  ``jnp.einsum('bki,kio->bko', ..., preferred_element_type=float32)`` fails at run time);
  ``mixed.einsum`` brings those to a form it has, in the forward and both gradients."""
  r = np.random.default_rng(0)
  a = jnp.asarray(r.standard_normal(s1), jnp.bfloat16)
  b = jnp.asarray(r.standard_normal(s2), jnp.bfloat16)
  want = jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
  f = lambda a, b: jnp.sum(mixed.einsum(spec, a, b).astype(jnp.float32) ** 2)
  y = mixed.einsum(spec, a, b)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05, rtol=0.02)
  for grad in (jax.grad(f, (0, 1)), jax.jit(jax.grad(f, (0, 1)))):
    ga, gb = jax.block_until_ready(grad(a, b))
    assert ga.shape == a.shape and gb.shape == b.shape
    assert np.isfinite(np.asarray(ga, np.float32)).all()


@pytest.mark.parametrize("layer", ["dense", "scenario_major", "split_block"])
def test_bfloat16_bias_gradients_are_float32_sums(layer):
  """A bfloat16 layer's bias gradient is the float32 sum of its bfloat16 cotangent over the
  rows, also with a block shared by the rows (``Dense`` of parts): XLA:CPU summed a bfloat16
  bias gradient in bfloat16 (a tree of reduce-windows, slow, and off by up to about 1% over
  12,288 rows)."""
  from sass_jax.model import mlsat

  r = np.random.default_rng(0)
  K, B, d_in, d_out = 3, 4096, 16, 8
  x = jnp.asarray(r.standard_normal((K, B, d_in)), jnp.float32)
  z = jnp.asarray(r.standard_normal((K, 1, 4)), jnp.float32)  # a block shared by the B rows
  ct = jnp.asarray(r.standard_normal((K, B, d_out)) * 10, jnp.bfloat16)
  if layer == "dense":
    mod, args = mlsat._dense(d_out, jnp.bfloat16, "layer"), (x,)
  elif layer == "scenario_major":
    mod, args = mlsat.ScenarioDense(d_out, K, jnp.bfloat16, scenario_major=True), (x, None)
  else:
    mod, args = mlsat.Dense(d_out, jnp.bfloat16), ([(x, None), (z, None)],)
  params = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), *args))["params"]
  loss = lambda p: jnp.sum(mod.apply({"params": p}, *args).astype(jnp.float32) * ct)
  g = jax.jit(jax.grad(loss))(params)
  c = np.asarray(ct, np.float64)
  want = c.sum(1) if layer == "scenario_major" else c.sum((0, 1))
  np.testing.assert_allclose(np.asarray(g["bias"]), want, rtol=1e-5, atol=1e-3)
