"""The two training losses of SASS (docs/design.md §2). Pure functions of arrays.

- ``info_nce``: symmetric in-batch InfoNCE between two views (pre-training, stage 1).
- ``sampled_softmax_logq``: in-batch sampled softmax over clicked (user, item, scenario)
  triples with logQ correction (Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
  Corpus Item Recommendations", RecSys 2019) (fine-tuning, stage 2).

- ``labelled_bce``: binary cross-entropy of labelled (user, item, scenario) exposures, label 1
  and 0 (the labelled negatives of the entire space; optional, ``config.train.labelled_weight``).

The two softmax losses treat a repeat of the positive's entity elsewhere in the batch as neither a positive nor a
negative (its logit is masked), so a popular item is not pushed away from its own users.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sass_jax.model.grouped import SCENARIO_COMPUTE, grouped_matmul, make_groups

_MASKED = -1e9
NEGATIVES = ("all", "same_scenario")  # config.train.negatives


def _duplicate_mask(ids: jnp.ndarray | tuple[jnp.ndarray, ...]) -> jnp.ndarray:
  """bool [B, B]: True where column j shares an entity with row b's positive pair, j != b.

  ``ids`` is one int [B] array, or a tuple of them (e.g. (user ids, item ids) of user-item
  pairs): a column is masked when *any* of them equals the row's.
  """
  ids = ids if isinstance(ids, (tuple, list)) else (ids,)
  same = ids[0][:, None] == ids[0][None, :]
  for other in ids[1:]:
    same = same | (other[:, None] == other[None, :])
  return same & ~jnp.eye(ids[0].shape[0], dtype=bool)


def _softmax_ce_diag(logits: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """float32 [B]: cross entropy of each row (``axis=-1``) or column (``axis=0``) of a square
  ``logits`` with its diagonal entry as the target.

  The diagonal is read as a masked sum rather than ``jnp.diagonal``: its gradient is then an
  elementwise select that XLA fuses into the softmax gradient, where the gather's gradient was
  a scatter-add into a zero-filled [B, B] array; reducing over ``axis=0`` for the columns
  avoids a transposed copy of the logits."""
  n = logits.shape[0]
  eye = jnp.arange(n)[:, None] == jnp.arange(n)[None, :]
  return jax.nn.logsumexp(logits, axis=axis) - jnp.sum(jnp.where(eye, logits, 0.0), axis=axis)


def info_nce(
  view_a: jnp.ndarray, view_b: jnp.ndarray, ids: jnp.ndarray | tuple[jnp.ndarray, ...], tau: float
) -> jnp.ndarray:
  """Symmetric in-batch InfoNCE; scalar float32.

  Args:
    view_a, view_b: float [B, D], L2-normalised; row b of each are two views of entity b.
    ids: int [B] entity ids; another row with the same id is masked out (not a negative). A
      tuple of int [B] arrays masks a column when any of them matches: for user-item pairs
      pass (user ids, item ids), so that another row of the same user is not a negative of
      the item-to-user direction (its logit would equal the positive's).
    tau: temperature (> 0).
  Returns:
    0.5 * (CE(a b^T / tau, diag) + CE(b a^T / tau, diag)), averaged over the batch.
  Source: docs/design.md §2 (stage 1, "positives are the two views of the same user, negatives are
  the other users' views in the batch; symmetric in-batch InfoNCE with temperature tau_pre").
  """
  logits = (view_a.astype(jnp.float32) @ view_b.astype(jnp.float32).T) / tau
  logits = jnp.where(_duplicate_mask(ids), _MASKED, logits)
  return 0.5 * (_softmax_ce_diag(logits).mean() + _softmax_ce_diag(logits, axis=0).mean())


def scenario_logits(
  user_vecs: jnp.ndarray,
  item_vecs_all: jnp.ndarray,
  scenario: jnp.ndarray,
  compute: str = "grouped",
) -> jnp.ndarray:
  """float32 [B, B]: logits[b, j] = <r_u^{k_b}[b], r_i^{k_b}[j]> (item j seen in user b's scenario).

  Args: user_vecs float [B, D] (each user in its own scenario); item_vecs_all float [B, K, D]
  (every item in every scenario); scenario int [B]; compute: 'grouped' (default) multiplies
  each row only by the items' vectors in its own scenario (rows tiled by scenario,
  ``grouped.grouped_matmul``: about B * B * D multiply-adds), 'onehot' (the earlier form) by
  all K of them through a one-hot mask (K * B * B * D). Neither materialises [B, B, D].
  Raises ValueError for another ``compute``.
  """
  if compute not in SCENARIO_COMPUTE:
    raise ValueError(
      f"config.model.scenario_compute={compute!r}; expected one of {SCENARIO_COMPUTE}"
    )
  k = item_vecs_all.shape[1]
  if compute == "grouped":
    rhs = jnp.transpose(item_vecs_all.astype(jnp.float32), (1, 2, 0))  # [K, D, B]
    return grouped_matmul(user_vecs.astype(jnp.float32), rhs, make_groups(scenario, k))
  onehot = jax.nn.one_hot(scenario, k, dtype=jnp.float32)
  u = user_vecs.astype(jnp.float32)[:, None, :] * onehot[:, :, None]  # [B, K, D]
  return jnp.einsum("bkd,jkd->bj", u, item_vecs_all.astype(jnp.float32))


def sampled_softmax_logq(
  logits: jnp.ndarray,
  item_ids: jnp.ndarray,
  item_logq: jnp.ndarray,
  tau: float,
  logq_strength: float,
  scenario: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """In-batch sampled softmax with logQ correction; scalar float32.

  Args:
    logits: float [B, B] raw scores <r_u[b], r_i[j]> (row b's positive is column b).
    item_ids: int [B] item ids; a column j != b holding row b's positive item is masked.
    item_logq: float [B] log of item j's sampling probability (its share of the training
      positives, i.e. how often it appears as an in-batch negative).
    tau: temperature; logits are divided by it.
    logq_strength: alpha in s(b, j) = <u_b, i_j> / tau - alpha * log q_j; 0 turns it off.
    scenario: None, or int [B] each row's scenario: then a column of another scenario than row
      b's is masked too (negatives from the row's own scenario only).
  Returns: mean over b of CE(row b, target b).
  Source: docs/design.md §2 (stage 2); Yi et al., RecSys 2019, eq. (3).
  """
  z = logits.astype(jnp.float32) / tau - logq_strength * item_logq.astype(jnp.float32)[None, :]
  mask = _duplicate_mask(item_ids)
  if scenario is not None:
    mask = mask | (scenario[:, None] != scenario[None, :])
  z = jnp.where(mask, _MASKED, z)
  return _softmax_ce_diag(z).mean()


def labelled_bce(
  user_vecs: jnp.ndarray, item_vecs: jnp.ndarray, label: jnp.ndarray, tau: float
) -> jnp.ndarray:
  """Mean binary cross-entropy of labelled exposures; scalar float32.

  Args:
    user_vecs: float [B_l, D] r_u^{k_b}: each pair's user in the pair's scenario k_b.
    item_vecs: float [B_l, D] r_i^{k_b}: each pair's item in the same scenario.
    label: float [B_l] in {0, 1} (1: clicked / liked; 0: exposed and not, or disliked).
    tau: temperature; the logit is s_b = <r_u^{k_b}, r_i^{k_b}> / tau (the model's score).
  Returns: mean over b of -[y_b log sigmoid(s_b) + (1 - y_b) log(1 - sigmoid(s_b))], computed
    stably as softplus(s_b) - y_b s_b.
  Source: docs/design.md §2 (stage 2, "labelled negatives of the entire space").
  """
  s = jnp.sum(user_vecs.astype(jnp.float32) * item_vecs.astype(jnp.float32), axis=-1) / tau
  y = label.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(s) - y * s)
