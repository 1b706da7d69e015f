"""Exact top-K retrieval on the accelerator, chunked over users.

:func:`topk_scores` computes ``user_vecs @ item_vecs.T`` for ``chunk_size``
users at a time, masks per-user excluded items (e.g. training positives) to
-inf and keeps the best K with ``jax.lax.top_k``. Every chunk has the same
shape (the last one is padded), so the jitted kernel compiles once per call
signature. Exclusions are shipped per chunk as padded (row, col) index lists
and scattered on the device; no dense U x N mask is ever built on the host.

:func:`popularity_topk` is the most-popular baseline (SPEC section 5) served
through the same kernel, so exclusion semantics are identical.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

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
    if users.ndim != 2 or items.ndim != 2:
        raise ValueError(f"user_vecs and item_vecs must be 2-D, got shapes {users.shape} and {items.shape}")
    if users.shape[1] != items.shape[1]:
        raise ValueError(f"embedding dims differ: user_vecs {users.shape}, item_vecs {items.shape}")
    num_users, num_items = users.shape[0], items.shape[0]
    if num_items == 0:
        raise ValueError("item_vecs must contain at least one item")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k = min(int(k), num_items)
    if num_users == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)

    chunk = min(int(chunk_size), num_users)
    num_chunks = -(-num_users // chunk)
    users = jnp.pad(users, ((0, num_chunks * chunk - num_users), (0, 0)))

    if exclude is not None:
        indptr, indices = as_csr(exclude, num_users, "exclude", num_cols=num_items)
        row_of_entry = np.repeat(np.arange(num_users, dtype=np.int64), np.diff(indptr))
        bounds = indptr[np.minimum(np.arange(num_chunks + 1) * chunk, num_users)]
        pad_len = _next_pow2(max(1, int(np.diff(bounds).max())))

    results = []
    for c in range(num_chunks):
        start = c * chunk
        rows = cols = None
        if exclude is not None:
            lo, hi = bounds[c], bounds[c + 1]
            rows = np.zeros(pad_len, np.int32)
            cols = np.full(pad_len, num_items, np.int32)
            rows[: hi - lo] = row_of_entry[lo:hi] - start
            cols[: hi - lo] = indices[lo:hi]
        results.append(_chunk_topk(users, items, np.int32(start), rows, cols, chunk_size=chunk, k=k))

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
