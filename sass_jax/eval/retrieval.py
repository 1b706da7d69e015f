"""Exact top-K retrieval on the accelerator, chunked over users.

:func:`topk_scores` computes ``user_vecs @ item_vecs.T`` for ``chunk_size``
users at a time, masks per-user excluded items (e.g. training positives) to
-inf and keeps the best K with ``jax.lax.top_k``. Every chunk has the same
shape (the last one is padded), so the jitted kernel compiles once per call
signature. Exclusions are shipped per chunk as padded (row, col) index lists
and scattered on the device; no dense U x N mask is ever built on the host.

:func:`popularity_topk` is the most-popular baseline (docs/design.md §5) served
through the same kernel, so exclusion semantics are identical.

:func:`sharded_topk_scores` is the same exact top-K for corpora spread over a device mesh
(docs/design.md §6): the item vectors are split into one contiguous block of rows per device,
every device scores the user chunk against its block and keeps its own top-K
(``jax.shard_map`` + ``lax.top_k``), and the ``K x devices`` candidates are merged by one more
``lax.top_k``. The full ``[users, items]`` score matrix exists nowhere, neither on a device nor
on a host; each device holds ``chunk_size x items/devices`` scores. Results (order of ties,
exclusions, the -inf tail) are those of :func:`topk_scores`; the scores themselves can differ in
the last bit (a ``[chunk, N/S]`` matmul may sum over D in another order than ``[chunk, N]``).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sass_jax.eval.metrics import CSR, PerRowItems, as_csr


@partial(jax.jit, static_argnames=("chunk_size", "k"))
def _chunk_topk(users, items, start, rows, cols, *, chunk_size: int, k: int):
  """Top-k of one user chunk.

  users [U_pad, D] (U_pad a multiple of chunk_size), items [N, D],
  start int32 scalar (first user of the chunk), rows/cols int32 [L] or None:
  chunk-local user row and item column of each excluded entry; padding
  entries use column N, which is out of bounds and dropped by the scatter.
  """
  u = jax.lax.dynamic_slice_in_dim(users, start, chunk_size, axis=0)
  scores = jnp.dot(u, items.T, precision=jax.lax.Precision.HIGHEST)
  if rows is not None:
    scores = scores.at[rows, cols].set(-jnp.inf, mode="drop")
  return jax.lax.top_k(scores, k)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class _ExclusionChunks:
  """Per user chunk, the excluded (row, col) pairs as padded int32 lists.

  ``self(c, pad_col)`` -> ``(rows [L], cols [L])`` of chunk ``c``: chunk-local user row and
  item column of each excluded entry, padded to L (a power of two shared by every chunk) with
  ``(0, pad_col)``, a column the caller's scatter drops. Raises ValueError (from ``as_csr``)
  for a malformed or out-of-range ``exclude``.
  """

  def __init__(self, exclude: PerRowItems, num_users: int, num_items: int, chunk: int):
    self.indptr, self.indices = as_csr(exclude, num_users, "exclude", num_cols=num_items)
    self.row_of_entry = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(self.indptr))
    num_chunks = -(-num_users // chunk)
    self.bounds = self.indptr[np.minimum(np.arange(num_chunks + 1) * chunk, num_users)]
    self.pad_len = _next_pow2(max(1, int(np.diff(self.bounds).max())))
    self.chunk = chunk

  def __call__(self, c: int, pad_col: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = self.bounds[c], self.bounds[c + 1]
    rows = np.zeros(self.pad_len, np.int32)
    cols = np.full(self.pad_len, pad_col, np.int32)
    rows[: hi - lo] = self.row_of_entry[lo:hi] - c * self.chunk
    cols[: hi - lo] = self.indices[lo:hi]
    return rows, cols


def _check_topk_args(users, items, k: int, chunk_size: int) -> None:
  """Raise ValueError unless users [U, D] and items [N >= 1, D], k >= 1, chunk_size >= 1."""
  if users.ndim != 2 or items.ndim != 2:
    raise ValueError(
      f"user_vecs and item_vecs must be 2-D, got shapes {users.shape} and {items.shape}"
    )
  if users.shape[1] != items.shape[1]:
    raise ValueError(f"embedding dims differ: user_vecs {users.shape}, item_vecs {items.shape}")
  if items.shape[0] == 0:
    raise ValueError("item_vecs must contain at least one item")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def topk_scores(
  user_vecs,
  item_vecs,
  k: int,
  exclude: PerRowItems | None = None,
  chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-K items per user by inner product, with per-user exclusion.

  score[u, i] = <user_vecs[u], item_vecs[i]>, computed in float32 with
  ``Precision.HIGHEST`` (no TF32/bf16 shortcuts on GPU) for ``chunk_size``
  users at a time; excluded (u, i) pairs are set to -inf before
  ``jax.lax.top_k``, which returns the lower item index first among equal
  scores. If a user has fewer than K non-excluded items, the tail of the row
  holds excluded items with score -inf.

  Device memory per chunk is about ``chunk_size * N * 4`` bytes. The
  exclusion lists of a chunk are padded to a power-of-two length (shared by
  all chunks) so that repeated calls reuse few compilations.

  Args:
    user_vecs: float [U, D] (NumPy or JAX array; cast to float32).
    item_vecs: float [N, D] (NumPy or JAX array; cast to float32).
    k: number of items to return per user, >= 1; clipped to N.
    exclude: optional items to mask per user: a CSR tuple
      ``(indptr [U+1] int, indices [nnz] int)`` or a list of U int arrays,
      indices in [0, N).
    chunk_size: users per device call (>= 1); capped at U.

  Returns:
    ``(scores float32 [U, k'], indices int32 [U, k'])`` as NumPy arrays,
    best first, with k' = min(k, N).

  Raises:
    ValueError: vectors not 2-D, dimension mismatch, N == 0, k < 1,
      chunk_size < 1, or a malformed / out-of-range ``exclude``.
  """
  users = jnp.asarray(user_vecs, dtype=jnp.float32)
  items = jnp.asarray(item_vecs, dtype=jnp.float32)
  _check_topk_args(users, items, k, chunk_size)
  num_users, num_items = users.shape[0], items.shape[0]
  k = min(int(k), num_items)
  if num_users == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

  chunk = min(int(chunk_size), num_users)
  num_chunks = -(-num_users // chunk)
  users = jnp.pad(users, ((0, num_chunks * chunk - num_users), (0, 0)))
  excl = None if exclude is None else _ExclusionChunks(exclude, num_users, num_items, chunk)

  results = []
  for c in range(num_chunks):
    start = c * chunk
    rows, cols = (None, None) if excl is None else excl(c, pad_col=num_items)
    results.append(_chunk_topk(users, items, np.int32(start), rows, cols, chunk_size=chunk, k=k))

  scores = np.concatenate([np.asarray(s) for s, _ in results])[:num_users]
  idx = np.concatenate([np.asarray(i) for _, i in results])[:num_users]
  return scores.astype(np.float32, copy=False), idx.astype(np.int32, copy=False)


@functools.lru_cache(maxsize=64)
def _sharded_chunk_fn(
  mesh: Mesh, axes: tuple, chunk: int, k: int, num_items: int, rows_per_shard: int
):
  """Jitted ``(users [U_pad, D], items [S*R, D] (rows over ``axes``), start, rows [L], cols [L])
  -> (scores [chunk, k], indices [chunk, k])``, outputs replicated."""
  kk = min(k, rows_per_shard)
  sizes = [mesh.shape[a] for a in axes]

  def per_shard(u, items, rows, cols):
    shard = jnp.int32(0)
    for a, n in zip(axes, sizes):  # row-major position of this device's block
      shard = shard * n + jax.lax.axis_index(a)
    offset = shard * rows_per_shard
    scores = jnp.dot(u, items.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, R]
    col = offset + jnp.arange(rows_per_shard, dtype=jnp.int32)
    scores = jnp.where(col[None, :] < num_items, scores, -jnp.inf)  # padding rows
    local = cols - offset
    local = jnp.where((local >= 0) & (local < rows_per_shard), local, rows_per_shard)
    scores = scores.at[rows, local].set(-jnp.inf, mode="drop")
    v, i = jax.lax.top_k(scores, kk)
    return v, i + offset

  spread = P(None, axes)
  sharded = jax.shard_map(
    per_shard, mesh=mesh, in_specs=(P(), P(axes), P(), P()), out_specs=(spread, spread)
  )

  def fn(users, items, start, rows, cols):
    u = jax.lax.dynamic_slice_in_dim(users, start, chunk, axis=0)
    cand_v, cand_i = sharded(u, items, rows, cols)  # [chunk, S * kk], shard-major
    v, j = jax.lax.top_k(cand_v, k)
    return v, jnp.take_along_axis(cand_i, j, axis=1)

  rep = NamedSharding(mesh, P())
  return jax.jit(fn, out_shardings=(rep, rep))


def sharded_topk_scores(
  user_vecs,
  item_vecs,
  k: int,
  mesh: Mesh,
  exclude: PerRowItems | None = None,
  chunk_size: int = 1024,
  axes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """:func:`topk_scores` with the item corpus row-sharded over the devices of ``mesh``.

  Items are padded to a multiple of S (the number of devices over ``axes``) and split into S
  contiguous blocks of R = N_pad / S rows, one per device. For each chunk of users (replicated
  on every device) each device computes its ``[chunk, R]`` scores (float32,
  ``Precision.HIGHEST``), masks padding rows and the user's excluded items in its block to
  -inf, and keeps its top ``min(k, R)`` (``jax.shard_map`` + ``lax.top_k``); one more
  ``lax.top_k`` over the ``S * min(k, R)`` candidates gives the exact global top-K. The merge
  keeps ``lax.top_k``'s rule that the lower item index comes first among equal scores
  (candidates are ordered by block, then by rank inside the block), so the ranking, ties and
  the -inf tail of users with fewer than K allowed items are those of :func:`topk_scores`
  for the same scores. Scores can differ from :func:`topk_scores`' in the last bit (the
  per-device matmul may accumulate over D in another order), so two items whose scores are
  within float32 rounding may swap; with exactly representable products (e.g. small-integer
  vectors) the two are bit-identical.

  Works across processes (multi-host): every process passes the same NumPy inputs and gets
  the full result; each device only ever holds ``chunk_size x R`` scores.

  Args:
    user_vecs: float [U, D] (cast to float32).
    item_vecs: float [N, D] (cast to float32), N >= 1.
    k: items per user, >= 1; clipped to N.
    mesh: the device mesh (e.g. ``Partitioner.mesh``).
    exclude: optional items to mask per user: CSR ``(indptr [U+1], indices)`` or a list of U
      int arrays, indices in [0, N).
    chunk_size: users per device call (>= 1); capped at U.
    axes: mesh axes the items are split over (default: all of them, i.e. every device).

  Returns:
    ``(scores float32 [U, k'], indices int32 [U, k'])`` as NumPy arrays, best first,
    k' = min(k, N).

  Raises:
    ValueError: as :func:`topk_scores`, or an axis name not in ``mesh``.
  """
  users = np.asarray(user_vecs, dtype=np.float32)
  items = np.asarray(item_vecs, dtype=np.float32)
  _check_topk_args(users, items, k, chunk_size)
  num_users, num_items = users.shape[0], items.shape[0]
  axes = tuple(mesh.axis_names if axes is None else axes)
  unknown = [a for a in axes if a not in mesh.axis_names]
  if unknown:
    raise ValueError(f"axes {unknown} are not axes of the mesh {dict(mesh.shape)}")
  k = min(int(k), num_items)
  if num_users == 0:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

  shards = int(np.prod([mesh.shape[a] for a in axes]))
  per_shard = -(-num_items // shards)
  n_pad = per_shard * shards
  chunk = min(int(chunk_size), num_users)
  num_chunks = -(-num_users // chunk)
  rep = NamedSharding(mesh, P())
  # Same NumPy values on every process -> global arrays (replicated users, row-split items).
  users_d = jax.device_put(np.pad(users, ((0, num_chunks * chunk - num_users), (0, 0))), rep)
  items_d = jax.device_put(
    np.pad(items, ((0, n_pad - num_items), (0, 0))), NamedSharding(mesh, P(axes))
  )
  excl = None if exclude is None else _ExclusionChunks(exclude, num_users, num_items, chunk)
  fn = _sharded_chunk_fn(mesh, axes, chunk, k, num_items, per_shard)

  results = []
  for c in range(num_chunks):
    if excl is None:
      rows, cols = np.zeros(1, np.int32), np.full(1, n_pad, np.int32)
    else:
      rows, cols = excl(c, pad_col=n_pad)
    start, rows, cols = jax.device_put((np.int32(c * chunk), rows, cols), rep)
    results.append(fn(users_d, items_d, start, rows, cols))

  scores = np.concatenate([np.asarray(s) for s, _ in results])[:num_users]
  idx = np.concatenate([np.asarray(i) for _, i in results])[:num_users]
  return scores.astype(np.float32, copy=False), idx.astype(np.int32, copy=False)


def popularity_topk(
  item_counts,
  num_users: int,
  k: int,
  exclude: PerRowItems | None = None,
  chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
  """Most-popular baseline: every user gets the items with the highest count.

  Items are ranked by ``item_counts`` descending, ties broken by the lower
  item index, after removing the user's excluded items. Served through
  :func:`topk_scores` with user vectors of ones [U, 1]; to keep the order
  exact in float32 (large or non-integer counts can collide when cast), the
  item "vectors" are the items' popularity positions encoded as distinct
  descending values: items are permuted into popularity order and position
  p gets value N - p (exact for N <= 2**24; beyond that adjacent positions
  may tie and ``lax.top_k``'s lower-index-first rule still keeps the more
  popular one first). Exclusions are remapped to positions and results
  mapped back to item ids.

  Args:
    item_counts: float [N] popularity of each item (no NaN), N >= 1.
    num_users: U, number of rows to return.
    k: items per user, >= 1; clipped to N.
    exclude: optional per-user items to skip: CSR tuple
      ``(indptr [U+1], indices)`` or a list of U int arrays, in [0, N).
    chunk_size: users per device call (see :func:`topk_scores`).

  Returns:
    ``(scores float32 [U, k'], indices int32 [U, k'])``, k' = min(k, N):
    scores are the items' counts (cast to float32), -inf for excluded items
    that fill a row when fewer than k' items remain.

  Raises:
    ValueError: ``item_counts`` not 1-D, empty or containing NaN,
      num_users < 0, k < 1, or a malformed / out-of-range ``exclude``.
  """
  counts = np.asarray(item_counts, dtype=np.float64)
  if counts.ndim != 1 or len(counts) == 0:
    raise ValueError(f"item_counts must be a non-empty 1-D array, got shape {counts.shape}")
  if np.isnan(counts).any():
    raise ValueError("item_counts contains NaN")
  if num_users < 0:
    raise ValueError(f"num_users must be >= 0, got {num_users}")
  num_items = len(counts)

  order = np.argsort(-counts, kind="stable")  # position -> item id
  position = np.empty(num_items, dtype=np.int64)  # item id -> position
  position[order] = np.arange(num_items)
  rank_values = (num_items - np.arange(num_items)).astype(np.float32)[:, None]

  excl_pos: CSR | None = None
  if exclude is not None:
    indptr, indices = as_csr(exclude, num_users, "exclude", num_cols=num_items)
    excl_pos = (indptr, position[indices])

  raw, pos = topk_scores(
    np.ones((num_users, 1), np.float32), rank_values, k, exclude=excl_pos, chunk_size=chunk_size
  )
  idx = order[pos].astype(np.int32)
  scores = np.where(np.isneginf(raw), -np.inf, counts[idx]).astype(np.float32)
  return scores, idx
