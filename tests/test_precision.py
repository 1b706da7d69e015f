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

from sass_jax.schema import FieldSpec
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
