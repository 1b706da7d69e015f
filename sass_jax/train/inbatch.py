"""Row-blocked in-batch softmax cross-entropy: loss and gradient in one pass, no ``[B, B]`` array.

Both training losses are a softmax cross-entropy over the rows of an in-batch logit matrix
``z[b, j] = <q_b, k_j> / tau + bias_j`` (row b's target is column b; docs/design.md §2). The
dense form (``sass_jax/train/losses.py``) writes the ``[B, B]`` logits (64 MB at B = 4096,
17 GB at 65536), then reads them back for the log-sum-exp, and its backward pass recomputes the
softmax from them. On a CPU that traffic, not the arithmetic, set the time: the
``[4096, 64] x [64, 4096]`` product alone ran at 45-82 GFLOP/s against 135-180 for the same
product in cache-sized tiles (BENCHMARKS.md, "Row-blocked in-batch softmax").

Here the rows are taken ``T`` at a time (``lax.scan`` over row tiles). For each tile of rows
``x [T, D]`` (all of one scenario, when each column has a vector per scenario):

    z = x k^T / tau + bias                     [T, B] float32 (masked entries -1e9)
    m = max_j z,  e = exp(z - m),  s = sum_j e
    CE_b = m_b + log s_b - z[b, b]             (the row's loss)
    G = (e / s - onehot(b)) / tau              (d CE / d (x k^T), exactly the softmax gradient)
    dx = G k,  dk += G^T x                     ([T, D] and [B, D])

Every row's softmax spans all B columns inside its own tile, so the gradient is complete when
the tile is done: the forward pass computes it and keeps only ``dx`` and ``dk`` (``[B, D]``
and ``[K, B, D]``), and the backward pass of the scalar loss scales them by the incoming
cotangent (``jax.custom_vjp``). One exponential per logit, three matmuls per tile, nothing of
size ``B x B`` outside a tile. The loss value is the dense form's to float32 rounding (the
sums run in another order), and so are the gradients; a test compares both on random inputs.

The products take ``dtype`` operands with float32 accumulation (``'bfloat16'`` under
``config.model.compute_dtype='bfloat16'``: the unit vectors are rounded to 8 bits of mantissa,
the logits, softmax and gradients stay float32); the dense form computes them in float32.

Columns can be masked (neither positive nor negative): where a column shares an id with the
row's positive pair (``dup_ids``), or where its group differs from the row's (``same_group``:
``config.train.negatives='same_scenario'``). A row whose every other column is masked has loss
0. Selected by ``config.model.inbatch_softmax`` ('blocked', the default, or 'dense').
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from sass_jax.model import grouped
from sass_jax.train import losses

INBATCH_SOFTMAX = ("blocked", "dense")  # config.model.inbatch_softmax
_MASKED = -1e9
# Two row tiles per scan iteration: on the 2-core CPU the fine-tune loss at B = 4096 (float32,
# T = 256) took 58 ms unrolled by 2 against 68 ms by 1 and 72 ms by 4 (a prototype of this scan).
_UNROLL = 2


def _tiles(x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, tau, dtype, with_grad):
  """The scan over row tiles. Shapes: x [NT, T, D]; pos int32 [NT, T] (the column of each
  slot's positive; >= B marks an empty slot); key int32 [NT] (which of v's K column sets a
  tile reads); v [K, B, D]; bias float32 [B]; dup_rows / dup_cols tuples of int [NT, T] / [B];
  grp_row / grp_col int [NT, T] / [B] or None. Returns (sum of the rows' CE, dx [NT, T, D]
  float32, dv [K, B, D] float32), the last two None without ``with_grad``."""
  num_cols = v.shape[1]
  cdt = jnp.dtype(dtype)
  vc = v.astype(cdt)
  vt = jnp.swapaxes(vc, 1, 2)  # [K, D, B]: z = x @ vt[k] is a plain [T, D] x [D, B] product
  xc = x.astype(cdt)
  xt = jnp.swapaxes(xc, 1, 2)  # [NT, D, T]: dk^T += xt @ G, a plain [D, T] x [T, B] product
  cols = jnp.arange(num_cols, dtype=jnp.int32)[None, :]
  inv_tau = 1.0 / tau
  f32 = jnp.float32

  def body(dvt, a):
    xi, xti, ki, pi, dri, gri = a
    z = jnp.dot(xi, vt[ki], preferred_element_type=f32) * inv_tau + bias[None, :]
    eye = cols == pi[:, None]
    mask = jnp.zeros(z.shape, bool)
    for r, c in zip(dri, dup_cols):
      mask = mask | (r[:, None] == c[None, :])
    mask = mask & ~eye
    if gri is not None:
      mask = mask | (gri[:, None] != grp_col[None, :])
    z = jnp.where(mask, _MASKED, z)
    m = jnp.max(z, axis=1, keepdims=True)
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=1, keepdims=True)
    valid = pi < num_cols
    ce = jnp.where(valid, m[:, 0] + jnp.log(s[:, 0]) - jnp.sum(jnp.where(eye, z, 0.0), 1), 0.0)
    if not with_grad:
      return dvt, (jnp.sum(ce), None)
    g = (jnp.where(valid[:, None], e / s - eye, 0.0) * inv_tau).astype(cdt)
    dx = jnp.dot(g, vc[ki], preferred_element_type=f32)  # [T, D]
    dvt = dvt.at[ki].add(jnp.dot(xti, g, preferred_element_type=f32))  # [D, B]
    return dvt, (jnp.sum(ce), dx)

  init = jnp.zeros(vt.shape, f32) if with_grad else None
  dvt, (ce, dx) = jax.lax.scan(
    body, init, (xc, xt, key, pos, tuple(dup_rows), grp_row), unroll=_UNROLL
  )
  dv = None if dvt is None else jnp.swapaxes(dvt, 1, 2)
  return jnp.sum(ce), dx, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _ce_sum(x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, tau, dtype):
  return _tiles(x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, tau, dtype, False)[0]


def _ce_sum_fwd(x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, tau, dtype):
  loss, dx, dv = _tiles(
    x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, tau, dtype, True
  )
  return loss, (dx.astype(x.dtype), dv.astype(v.dtype))


def _ce_sum_bwd(tau, dtype, res, g):
  dx, dv = res
  return (
    (g * dx).astype(dx.dtype),
    None,
    None,
    (g * dv).astype(dv.dtype),
    None,
    None,
    None,
    None,
    None,
  )


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def _tile_rows(n: int, k: int, tile: int | None) -> int:
  return int(tile or grouped.tile_size(n, k))


def softmax_ce(
  queries: jnp.ndarray,
  keys: jnp.ndarray,
  tau: float,
  *,
  bias: jnp.ndarray | None = None,
  scenario: jnp.ndarray | None = None,
  dup_ids: tuple[jnp.ndarray, ...] = (),
  same_group: jnp.ndarray | None = None,
  dtype: str = "float32",
  tile: int | None = None,
) -> jnp.ndarray:
  """Mean over rows of the in-batch softmax cross-entropy, row b's target column b; scalar
  float32. Differentiable in ``queries`` and ``keys`` (the gradient is computed in the same
  pass, see the module docstring).

  Args:
    queries: float [B, D] (row b's vector: a user, or one view).
    keys: float [B, D] (column j's vector), or [B, K, D] (column j's vector in each of K
      scenarios; row b scores the columns in its own scenario ``scenario[b]``).
    tau: temperature (> 0); z[b, j] = <q_b, k_j> / tau + bias_j.
    bias: float [B] per column (e.g. -alpha log q_j, the logQ correction), or None.
    scenario: int [B] in [0, K), required with [B, K, D] keys; rows are then tiled by scenario
      (``grouped.make_groups``), each tile multiplied by its scenario's column vectors only.
    dup_ids: int [B] arrays; column j != b is masked for row b when any of them equals row
      b's value (a repeat of the positive's user or item).
    same_group: int [B] or None; column j is masked for row b when ``same_group[j]`` differs.
    dtype: 'float32' or 'bfloat16', the products' operand dtype (float32 accumulation).
    tile: rows per tile (default ``grouped.tile_size(B, K)``, K = 1 for [B, D] keys).
  Raises ValueError for [B, K, D] keys without ``scenario``, or mismatched shapes.
  Source: docs/design.md §2 (both stages' softmax losses).
  """
  b, d = queries.shape
  if keys.ndim == 3:
    if scenario is None:
      raise ValueError("softmax_ce: keys [B, K, D] need each row's scenario")
    num_k = keys.shape[1]
    groups = grouped.make_groups(scenario, num_k, tile=_tile_rows(b, num_k, tile), blocks=1)
    src, dest = groups.src[0], groups.dest[0]
    nt, t = groups.tile_group.shape[-1], groups.tile
    x = grouped.permute_rows(queries, src, dest).reshape(nt, t, d)
    key = groups.tile_group[0]
    v = jnp.swapaxes(keys, 0, 1)  # [K, B, D]
    pos = src.reshape(nt, t)

    def rows(a):  # a row-indexed int [B] array laid out in the slots (empty slots: -1)
      return jnp.take(a, src, axis=0, mode="fill", fill_value=-1).reshape(nt, t)
  else:
    t = _tile_rows(b, 1, tile)
    nt = -(-b // t)
    x = jnp.pad(queries, ((0, nt * t - b), (0, 0))).reshape(nt, t, d)
    key = jnp.zeros((nt,), jnp.int32)
    v = keys[None]
    pos = jnp.arange(nt * t, dtype=jnp.int32).reshape(nt, t)

    def rows(a):
      return jnp.pad(a, (0, nt * t - b), constant_values=-1).reshape(nt, t)

  if v.shape[1] != b or v.shape[2] != d:
    raise ValueError(f"softmax_ce: queries {queries.shape} and keys {keys.shape} do not match")
  bias = jnp.zeros((b,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  dup_cols = tuple(jnp.asarray(i, jnp.int32) for i in dup_ids)
  dup_rows = tuple(rows(i) for i in dup_cols)
  grp_col = None if same_group is None else jnp.asarray(same_group, jnp.int32)
  grp_row = None if grp_col is None else rows(grp_col)
  total = _ce_sum(x, pos, key, v, bias, dup_rows, dup_cols, grp_row, grp_col, float(tau), dtype)
  return total / b


# Below this many rows a float32 InfoNCE takes the dense form: run once per direction, the
# blocked form does six products where the dense one does three on a [B, B] array that still
# fits in cache; measured crossover (BENCHMARKS.md, "Row-blocked in-batch softmax"): dense
# 4.6 vs blocked 6.8 ms at B = 1024, 27.7 vs 25.1 at 2048, 150 vs 98 at 4096.
INFO_NCE_MIN_ROWS = 2048


def info_nce(
  view_a, view_b, ids, tau: float, dtype: str = "float32", min_rows: int | None = None
) -> jnp.ndarray:
  """``losses.info_nce`` (symmetric in-batch InfoNCE, same arguments), row-blocked: the
  duplicate mask is symmetric, so the column-wise cross-entropy of ``a b^T`` is the row-wise one
  of ``b a^T``. Scalar float32. With float32 products and fewer than ``min_rows`` rows it is
  ``losses.info_nce`` itself (faster there; bfloat16 products are blocked at every size);
  ``min_rows`` None reads ``INFO_NCE_MIN_ROWS``."""
  min_rows = INFO_NCE_MIN_ROWS if min_rows is None else min_rows
  if dtype == "float32" and view_a.shape[0] < min_rows:
    return losses.info_nce(view_a, view_b, ids, tau)
  ids = tuple(ids) if isinstance(ids, (tuple, list)) else (ids,)
  return 0.5 * (
    softmax_ce(view_a, view_b, tau, dup_ids=ids, dtype=dtype)
    + softmax_ce(view_b, view_a, tau, dup_ids=ids, dtype=dtype)
  )


def blocked_here(softmax: str) -> bool:
  """Whether a loss traced now takes the row-blocked form: ``softmax`` ('blocked' or 'dense',
  ``config.model.inbatch_softmax``) says so and the batch is not split over a mesh's 'data'
  axis (``grouped.batch_blocks`` > 1: there the dense form's rows stay split over the devices,
  where the row scan would run the whole batch on each). Raises ValueError for another
  ``softmax``."""
  if softmax not in INBATCH_SOFTMAX:
    raise ValueError(f"config.model.inbatch_softmax={softmax!r}; expected one of {INBATCH_SOFTMAX}")
  return softmax == "blocked" and grouped.current_blocks() == 1


def dense_twin(model):
  """``model`` with ``config.model.inbatch_softmax='dense'`` (same parameters), or ``model``
  itself when it has no config or is already dense. XLA's cost analysis counts a loop's body
  once, so the row-blocked form's flops are under-counted by the number of tiles; benchmarks
  count a step's flops on this twin, whose dense softmax does the same multiply-adds."""
  cfg = getattr(model, "cfg", None)
  if not dataclasses.is_dataclass(cfg) or getattr(cfg, "inbatch_softmax", "dense") == "dense":
    return model
  return type(model)(dataclasses.replace(cfg, inbatch_softmax="dense"))
