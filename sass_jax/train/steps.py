"""The train state and the two pure step functions (SPEC section 2).

``pretrain_step(state, batch) -> (state, metrics)`` and ``finetune_step(state, batch) ->
(state, metrics)`` are built by ``make_pretrain_step`` / ``make_finetune_step`` from the model
and optimiser (closed over, static) and compiled by ``Partitioner.compile_step`` with explicit
shardings and the state donated.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sass_jax.train import losses


class TrainState(flax.struct.PyTreeNode):
  """Plain pytree: step int32 [], params (nested dict of float32 arrays), opt_state (optax),
  rng uint32 [2] (raw key data, split every step for dropout)."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray


def make_optimizer(stage_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to 10% (optax).

  stage_cfg: ``config.pretrain`` or ``config.train`` (learning_rate, optional warmup_steps,
  weight_decay).
  """
  warmup = int(stage_cfg.get("warmup_steps", 0))
  warmup = min(warmup, max(num_steps - 1, 0))
  sched = optax.warmup_cosine_decay_schedule(
      0.0 if warmup else stage_cfg.learning_rate, stage_cfg.learning_rate, warmup,
      max(num_steps, warmup + 1), end_value=0.1 * stage_cfg.learning_rate)
  return optax.adamw(sched, weight_decay=float(stage_cfg.get("weight_decay", 0.0)))


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, dummy: dict, seed: int,
                 params: Any | None = None) -> Callable[[], TrainState]:
  """A no-argument function building the initial state with *boxed* params (logical axes).

  dummy: a batch-shaped example {'user': features, 'item': features, 'scenario': int32 [B]}.
  params: start from these (unboxed) params instead of a random init (fine-tuning from the
  pre-trained model); their logical axes are taken from the model's init.
  """
  def init():
    key = jax.random.key(seed)
    boxed = model.init(key, dummy["user"], dummy["item"], dummy["scenario"])["params"]
    p = boxed if params is None else jax.tree.map(
        lambda b, v: b.replace_boxed(v), boxed, params,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))
  return init


def _norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree)


def _apply_update(state: TrainState, tx, grads, loss, extra) -> tuple[TrainState, dict]:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
  metrics = {"loss": loss, "grad_norm": _norm(grads), "param_norm": _norm(params), **extra}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def pretrain_loss(model: nn.Module, params, batch: dict, rng, tau: float, pairs: str):
  """Stage-1 loss (SPEC section 2). Returns (loss, {'user_loss', 'item_loss'}).

  batch: 'user' / 'item' features [B, ...]; 'user_index' / 'item_index' int32 [B] (entity ids,
  to mask repeats); 'user_views' / 'item_views' int32 [B, 2] (two distinct scenarios per row);
  'scenario' int32 [B] (the row's own scenario, used by pairs='user_item').
  pairs='scenario_views': user InfoNCE between r_u^i and r_u^j plus the same for items.
  pairs='user_item': InfoNCE between r_u^k and r_i^k of the row's scenario k, over every
  exposure (clicked or not).
  """
  r1, r2 = jax.random.split(jax.random.wrap_key_data(rng))
  rngs_u, rngs_i = {"dropout": r1}, {"dropout": r2}
  if pairs == "user_item":
    u = model.apply({"params": params}, batch["user"], batch["scenario"], True,
                    method="encode_user", rngs=rngs_u)
    i = model.apply({"params": params}, batch["item"], batch["scenario"], True,
                    method="encode_item", rngs=rngs_i)
    loss = losses.info_nce(u, i, batch["item_index"], tau)
    return loss, {"user_loss": loss, "item_loss": jnp.zeros_like(loss)}
  u_all = model.apply({"params": params}, batch["user"], None, True, method="encode_user",
                      rngs=rngs_u)                                    # [B, K, D]
  i_all = model.apply({"params": params}, batch["item"], None, True, method="encode_item",
                      rngs=rngs_i)
  take = lambda v, idx: jnp.take_along_axis(v, idx[:, :, None], axis=1)  # [B, 2, D]
  uv, iv = take(u_all, batch["user_views"]), take(i_all, batch["item_views"])
  lu = losses.info_nce(uv[:, 0], uv[:, 1], batch["user_index"], tau)
  li = losses.info_nce(iv[:, 0], iv[:, 1], batch["item_index"], tau)
  return lu + li, {"user_loss": lu, "item_loss": li}


def finetune_loss(model: nn.Module, params, batch: dict, rng, tau: float, logq_strength: float):
  """Stage-2 loss: in-batch sampled softmax with logQ correction (SPEC section 2).

  batch: 'user' / 'item' features; 'scenario' int32 [B]; 'item_index' int32 [B];
  'item_logq' float32 [B]. Negatives of row b are the batch's other items, each scored by its
  vector *in row b's scenario*. Returns (loss, {}).
  """
  r1, r2 = jax.random.split(jax.random.wrap_key_data(rng))
  u = model.apply({"params": params}, batch["user"], batch["scenario"], True,
                  method="encode_user", rngs={"dropout": r1})     # [B, D]
  i_all = model.apply({"params": params}, batch["item"], None, True, method="encode_item",
                      rngs={"dropout": r2})                          # [B, K, D]
  logits = losses.scenario_logits(u, i_all, batch["scenario"])
  return losses.sampled_softmax_logq(logits, batch["item_index"], batch["item_logq"], tau,
                                     logq_strength), {}


def make_pretrain_step(model: nn.Module, tx: optax.GradientTransformation, tau: float,
                       pairs: str = "scenario_views") -> Callable:
  """Build the pure ``pretrain_step(state, batch) -> (state, metrics)``.

  Raises ValueError for an unknown ``pairs`` reading.
  """
  if pairs not in ("scenario_views", "user_item"):
    raise ValueError(f"config.pretrain.pairs={pairs!r}; expected 'scenario_views' or 'user_item'")

  def pretrain_step(state: TrainState, batch: dict):
    (loss, aux), grads = jax.value_and_grad(pretrain_loss, argnums=1, has_aux=True)(
        model, state.params, batch, state.rng, tau, pairs)
    return _apply_update(state, tx, grads, loss, aux)
  return pretrain_step


def make_finetune_step(model: nn.Module, tx: optax.GradientTransformation, tau: float,
                       logq_strength: float) -> Callable:
  """Build the pure ``finetune_step(state, batch) -> (state, metrics)``."""
  def finetune_step(state: TrainState, batch: dict):
    (loss, aux), grads = jax.value_and_grad(finetune_loss, argnums=1, has_aux=True)(
        model, state.params, batch, state.rng, tau, logq_strength)
    return _apply_update(state, tx, grads, loss, aux)
  return finetune_step
