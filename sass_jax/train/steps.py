"""The train state and the two pure step functions (docs/design.md §2).

``pretrain_step(state, batch) -> (state, metrics)`` and ``finetune_step(state, batch) ->
(state, metrics)`` are built by ``make_pretrain_step`` / ``make_finetune_step`` from the model
and optimiser (closed over, static) and compiled by ``Partitioner.compile_step`` with explicit
shardings and the state donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sass_jax.model.protocol import ranking_methods
from sass_jax.model.towers import unit_vectors
from sass_jax.train import inbatch, losses


class TrainState(flax.struct.PyTreeNode):
  """Plain pytree: step int32 [], params (nested dict of float32 arrays), opt_state (optax),
  rng uint32 [2] (raw key data, split every step for dropout), model_state (the model's
  non-trained variable collections, e.g. ``{'batch_stats': ...}`` for STAR's per-scenario
  running statistics; ``{}`` for models without any)."""

  step: jnp.ndarray
  params: Any
  opt_state: Any
  rng: jnp.ndarray
  model_state: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """``{'params': params, **model_state}``, what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


def as_variables(tree: Any) -> dict:
  """A model's variables from either a full variables dict (with a 'params' key) or bare
  params (a tree without one)."""
  if isinstance(tree, dict) and "params" in tree:
    return dict(tree)
  return {"params": tree}


def apply_model(
  model: nn.Module, params, model_state: dict, *args, method: str, rngs=None, train: bool = True
):
  """``model.apply`` of ``method`` with ``model_state`` collections mutable when training.

  Returns (output, new model_state); new model_state is ``model_state`` unchanged when the
  model has no such collections or ``train`` is False.
  """
  variables = {"params": params, **model_state}
  if train and model_state:
    out, new = model.apply(
      variables, *args, train, method=method, rngs=rngs, mutable=list(model_state)
    )
    return out, {**model_state, **new}
  return model.apply(variables, *args, train, method=method, rngs=rngs), model_state


def make_schedule(stage_cfg, num_steps: int) -> optax.Schedule:
  """Learning rate of the update number ``count`` (0-based; the update of step s uses count
  s - 1): linear warm-up over ``warmup_steps`` then cosine decay to 10% at ``num_steps``."""
  warmup = int(stage_cfg.warmup_steps)
  warmup = min(warmup, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    0.0 if warmup else stage_cfg.learning_rate,
    stage_cfg.learning_rate,
    warmup,
    max(num_steps, warmup + 1),
    end_value=0.1 * stage_cfg.learning_rate,
  )


def make_optimizer(stage_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW over ``make_schedule`` (optax).

  stage_cfg: ``config.pretrain`` or ``config.train`` (learning_rate, warmup_steps,
  weight_decay).
  """
  return optax.adamw(
    make_schedule(stage_cfg, num_steps), weight_decay=float(stage_cfg.weight_decay)
  )


def make_init_fn(
  model: nn.Module,
  tx: optax.GradientTransformation,
  dummy: dict,
  seed: int,
  params: Any | None = None,
) -> Callable[[], TrainState]:
  """A no-argument function building the initial state with *boxed* params (logical axes).

  dummy: a batch-shaped example {'user': features, 'item': features, 'scenario': int32 [B]}.
  params: start from these (unboxed) params, or a full variables dict ``{'params': ...,
  'batch_stats': ...}``, instead of a random init (fine-tuning from the pre-trained model);
  their logical axes are taken from the model's init.
  """

  def init():
    key = jax.random.key(seed)
    variables = dict(model.init(key, dummy["user"], dummy["item"], dummy["scenario"]))
    boxed = variables.pop("params")
    model_state = nn.meta.unbox(variables)
    if params is not None:
      given = as_variables(params)
      boxed = jax.tree.map(
        lambda b, v: b.replace_boxed(v),
        boxed,
        given.pop("params"),
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
      )
      model_state = {**model_state, **given}
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=boxed,
      opt_state=tx.init(boxed),
      rng=jax.random.key_data(jax.random.fold_in(key, 1)),
      model_state=model_state,
    )

  return init


def _norm(tree) -> jnp.ndarray:
  return optax.tree.norm(tree)


def _apply_update(state: TrainState, tx, grads, loss, aux) -> tuple[TrainState, dict]:
  extra, model_state = aux
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
  metrics = {"loss": loss, "grad_norm": _norm(grads), "param_norm": _norm(params), **extra}
  return state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, rng=rng, model_state=model_state
  ), metrics


PRETRAIN_PAIRS = ("scenario_views", "user_item")  # config.pretrain.pairs (pretrain_loss)


def pretrain_loss(
  model: nn.Module,
  params,
  batch: dict,
  rng,
  tau: float,
  pairs: str,
  model_state: dict | None = None,
):
  """Stage-1 loss (docs/design.md §2). Returns (loss, ({'user_loss', 'item_loss'}, model_state)).

  batch: 'user' / 'item' features [B, ...]; 'user_index' / 'item_index' int32 [B] (entity ids,
  to mask repeats); 'user_views' / 'item_views' int32 [B, 2] (two distinct scenarios per row);
  'scenario' int32 [B] (the row's own scenario, used by pairs='user_item').
  pairs='scenario_views': user InfoNCE between r_u^i and r_u^j plus the same for items (the
  unit vectors only when the model has ``score_bias``).
  pairs='user_item': InfoNCE between r_u^k and r_i^k of the row's scenario k, over every
  exposure (clicked or not).
  With ``config.model.scenario_compute='grouped'`` a model that encodes chosen scenarios
  (``encodes_views``: SASS) computes only the two views of each row; other models (and
  'onehot') compute all K and take two.
  model_state: non-trained collections (e.g. STAR's batch_stats), updated and returned.
  """
  ms = model_state or {}
  r1, r2 = jax.random.split(jax.random.wrap_key_data(rng))
  rngs_u, rngs_i = {"dropout": r1}, {"dropout": r2}
  blocked, dtype = _softmax_form(model)
  nce = functools.partial(inbatch.info_nce, dtype=dtype) if blocked else losses.info_nce

  def views_loss(uv, iv, ms):
    # two views of one entity compare the unit vectors only: score_bias's appended
    # [sqrt(tau) b, sqrt(tau)] would add tau * b_1 * b_2 + tau to a user-user score
    cfg = getattr(model, "cfg", None)
    uv, iv = unit_vectors(cfg, uv), unit_vectors(cfg, iv)
    lu = nce(uv[:, 0], uv[:, 1], batch["user_index"], tau)
    li = nce(iv[:, 0], iv[:, 1], batch["item_index"], tau)
    return lu + li, ({"user_loss": lu, "item_loss": li}, ms)

  if pairs == "scenario_views" and _encodes_views(model):
    # only the two views of each row ([B, 2, D]), not all K scenarios
    uv, ms = apply_model(
      model, params, ms, batch["user"], batch["user_views"], method="encode_user", rngs=rngs_u
    )
    iv, ms = apply_model(
      model, params, ms, batch["item"], batch["item_views"], method="encode_item", rngs=rngs_i
    )
    return views_loss(uv, iv, ms)
  if pairs == "user_item":
    u, ms = apply_model(
      model, params, ms, batch["user"], batch["scenario"], method="encode_user", rngs=rngs_u
    )
    i, ms = apply_model(
      model, params, ms, batch["item"], batch["scenario"], method="encode_item", rngs=rngs_i
    )
    # a column sharing the row's user or its item is neither positive nor negative
    loss = nce(u, i, (batch["user_index"], batch["item_index"]), tau)
    return loss, ({"user_loss": loss, "item_loss": jnp.zeros_like(loss)}, ms)
  u_all, ms = apply_model(
    model, params, ms, batch["user"], None, method="encode_user", rngs=rngs_u
  )  # [B, K, D]
  i_all, ms = apply_model(model, params, ms, batch["item"], None, method="encode_item", rngs=rngs_i)
  take = lambda v, idx: jnp.take_along_axis(v, idx[:, :, None], axis=1)  # [B, 2, D]
  return views_loss(take(u_all, batch["user_views"]), take(i_all, batch["item_views"]), ms)


def _softmax_form(model: nn.Module) -> tuple[bool, str]:
  """(whether this trace takes the row-blocked softmax, the products' dtype): from
  ``config.model.inbatch_softmax`` ('dense' for a model without a config) and
  ``config.model.compute_dtype`` (``sass_jax/train/inbatch.py``)."""
  cfg = getattr(model, "cfg", None)
  blocked = inbatch.blocked_here(getattr(cfg, "inbatch_softmax", "dense"))
  return blocked, getattr(cfg, "compute_dtype", "float32")


def _encodes_views(model: nn.Module) -> bool:
  return (
    bool(getattr(model, "encodes_views", False))
    and getattr(model.cfg, "scenario_compute", "onehot") == "grouped"
  )


def finetune_loss(
  model: nn.Module,
  params,
  batch: dict,
  rng,
  tau: float,
  logq_strength: float,
  model_state: dict | None = None,
  negatives: str = "all",
  labelled_weight: float = 0.0,
):
  """Stage-2 loss: in-batch sampled softmax with logQ correction (docs/design.md §2).

  batch: 'user' / 'item' features; 'scenario' int32 [B]; 'item_index' int32 [B];
  'item_logq' float32 [B]. negatives='all': negatives of row b are the batch's other items,
  each scored by its vector *in row b's scenario* (every item encoded in all K scenarios);
  'same_scenario': only the items of rows of row b's scenario (each item encoded once, in its
  own row's scenario: the cost does not grow with K). Returns (loss, ({}, model_state)).
  labelled_weight > 0 (``config.train.labelled_weight``): the batch also holds 'labelled' =
  {'user', 'item': features [B_l, ...], 'scenario' int32 [B_l], 'label' float32 [B_l]}
  (labelled exposures of the training split, label 1 and 0) and the loss is the softmax loss
  plus labelled_weight * ``losses.labelled_bce`` of them, each pair's user and item encoded in
  the pair's scenario by the model's ranking vectors (``protocol.ranking_methods``: SASS's
  preference head, if any, scores them; the softmax never sees it); the extras are then {'softmax_loss', 'labelled_bce'}. With 0 the loss,
  the extras ({}) and the random numbers are exactly those without the option.
  Raises ValueError for another ``negatives``, or a weight > 0 with no 'labelled' batch.
  """
  if negatives not in losses.NEGATIVES:
    raise ValueError(f"config.train.negatives={negatives!r}; expected one of {losses.NEGATIVES}")
  if labelled_weight > 0:
    if "labelled" not in batch:
      raise ValueError("config.train.labelled_weight > 0 but the batch has no 'labelled' exposures")
    soft, (extra, ms) = finetune_loss(
      model, params, batch, rng, tau, logq_strength, model_state, negatives
    )
    lb = batch["labelled"]
    # Own dropout keys, folded from the step's key (the softmax part's keys are unchanged).
    r3, r4 = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(rng), 1))
    rank_u, rank_i = ranking_methods(model)  # SASS: with the preference head, if any
    ul, ms = apply_model(
      model, params, ms, lb["user"], lb["scenario"], method=rank_u, rngs={"dropout": r3}
    )  # [B_l, D']
    il, ms = apply_model(
      model, params, ms, lb["item"], lb["scenario"], method=rank_i, rngs={"dropout": r4}
    )  # [B_l, D']
    bce = losses.labelled_bce(ul, il, lb["label"], tau)
    return soft + labelled_weight * bce, (
      {**extra, "softmax_loss": soft, "labelled_bce": bce},
      ms,
    )
  ms = model_state or {}
  r1, r2 = jax.random.split(jax.random.wrap_key_data(rng))
  blocked, dtype = _softmax_form(model)
  u, ms = apply_model(
    model, params, ms, batch["user"], batch["scenario"], method="encode_user", rngs={"dropout": r1}
  )  # [B, D]
  if negatives == "same_scenario":
    i, ms = apply_model(
      model,
      params,
      ms,
      batch["item"],
      batch["scenario"],
      method="encode_item",
      rngs={"dropout": r2},
    )  # [B, D]
    if blocked:
      return inbatch.softmax_ce(
        u,
        i,
        tau,
        bias=-logq_strength * batch["item_logq"].astype(jnp.float32),
        dup_ids=(batch["item_index"],),
        same_group=batch["scenario"],
        dtype=dtype,
      ), ({}, ms)
    logits = u.astype(jnp.float32) @ i.astype(jnp.float32).T
    return losses.sampled_softmax_logq(
      logits,
      batch["item_index"],
      batch["item_logq"],
      tau,
      logq_strength,
      scenario=batch["scenario"],
    ), ({}, ms)
  i_all, ms = apply_model(
    model, params, ms, batch["item"], None, method="encode_item", rngs={"dropout": r2}
  )  # [B, K, D]
  if blocked:
    return inbatch.softmax_ce(
      u,
      i_all,
      tau,
      bias=-logq_strength * batch["item_logq"].astype(jnp.float32),
      scenario=batch["scenario"],
      dup_ids=(batch["item_index"],),
      dtype=dtype,
    ), ({}, ms)
  logits = losses.scenario_logits(
    u, i_all, batch["scenario"], getattr(model.cfg, "scenario_compute", "grouped")
  )
  return losses.sampled_softmax_logq(
    logits, batch["item_index"], batch["item_logq"], tau, logq_strength
  ), ({}, ms)


def make_pretrain_step(
  model: nn.Module, tx: optax.GradientTransformation, tau: float, pairs: str = "scenario_views"
) -> Callable:
  """Build the pure ``pretrain_step(state, batch) -> (state, metrics)``.

  Raises ValueError for an unknown ``pairs`` reading.
  """
  if pairs not in PRETRAIN_PAIRS:
    raise ValueError(f"config.pretrain.pairs={pairs!r}; expected 'scenario_views' or 'user_item'")

  def pretrain_step(state: TrainState, batch: dict):
    (loss, aux), grads = jax.value_and_grad(pretrain_loss, argnums=1, has_aux=True)(
      model, state.params, batch, state.rng, tau, pairs, state.model_state
    )
    return _apply_update(state, tx, grads, loss, aux)

  return pretrain_step


def make_finetune_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  tau: float,
  logq_strength: float,
  negatives: str = "all",
  labelled_weight: float = 0.0,
) -> Callable:
  """Build the pure ``finetune_step(state, batch) -> (state, metrics)``; ``negatives`` and
  ``labelled_weight`` as ``finetune_loss`` (ValueError for an unknown ``negatives``)."""
  if negatives not in losses.NEGATIVES:
    raise ValueError(f"config.train.negatives={negatives!r}; expected one of {losses.NEGATIVES}")

  def finetune_step(state: TrainState, batch: dict):
    (loss, aux), grads = jax.value_and_grad(finetune_loss, argnums=1, has_aux=True)(
      model,
      state.params,
      batch,
      state.rng,
      tau,
      logq_strength,
      state.model_state,
      negatives,
      labelled_weight,
    )
    return _apply_update(state, tx, grads, loss, aux)

  return finetune_step


NAN_POLICIES = ("raise", "skip")


def with_nan_policy(
  step_fn: Callable, policy: str = "raise", debug_nan_at_step: int = 0
) -> Callable:
  """Wrap ``step(state, batch) -> (state, metrics)`` for ``config.train.nan_policy``.

  'raise': the step is unchanged (the loop stops on a non-finite loss / grad_norm /
  param_norm). 'skip': a step whose loss, gradient norm or new parameter norm is not finite
  keeps the old params, opt_state and model_state (step and rng still advance) and reports
  ``metrics['skipped'] = 1`` (int32 []; 0 otherwise); the other metrics are those of the
  discarded update (so they show which quantity was not finite).
  debug_nan_at_step > 0 (testing hook, ``config.train.debug_nan_at_step``): the params are made
  NaN for the forward pass of that step (1-based), so its loss and gradients are NaN.
  Raises ValueError for an unknown policy.
  """
  if policy not in NAN_POLICIES:
    raise ValueError(f"config.train.nan_policy={policy!r}; expected one of {NAN_POLICIES}")
  if policy == "raise" and debug_nan_at_step <= 0:
    return step_fn

  def wrapped(state: TrainState, batch: dict):
    run_state = state
    if debug_nan_at_step > 0:
      hit = state.step + 1 == debug_nan_at_step
      run_state = state.replace(
        params=jax.tree.map(lambda p: jnp.where(hit, jnp.full_like(p, jnp.nan), p), state.params)
      )
    new, metrics = step_fn(run_state, batch)
    if policy == "raise":
      return new, metrics
    ok = (
      jnp.isfinite(metrics["loss"])
      & jnp.isfinite(metrics["grad_norm"])
      & jnp.isfinite(metrics["param_norm"])
    )
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
    new = new.replace(
      params=keep(new.params, state.params),
      opt_state=keep(new.opt_state, state.opt_state),
      model_state=keep(new.model_state, state.model_state),
    )
    metrics = {**metrics, "skipped": (~ok).astype(jnp.int32)}
    return new, metrics

  return wrapped
