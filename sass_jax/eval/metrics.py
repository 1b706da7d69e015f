"""Offline evaluation metrics (pure NumPy, vectorised).

Contents
--------
* :func:`auc` -- exact ROC AUC (Mann-Whitney U with average ranks for ties).
* :func:`gauc` -- group AUC as defined in the DIN paper (Zhou et al., "Deep
  Interest Network for Click-Through Rate Prediction", KDD 2018, eq. 7).
* :func:`retrieval_metrics` -- per-user Recall@K, HitRate@K and NDCG@K for
  top-K retrieval against held-out positives (docs/design.md §5).
* :func:`summarize` -- averages of per-user metrics.
* :func:`as_csr` -- normalise per-user item lists to a validated CSR pair
  (shared with :mod:`sass_jax.eval.retrieval`).

All functions run in O(n log n) with no Python loop over samples, users or
groups (the only per-user loop is the unavoidable conversion of a Python list
of arrays in :func:`as_csr`).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

CSR = tuple[np.ndarray, np.ndarray]
"""A ``(indptr [R+1] int, indices [nnz] int)`` pair: row ``r`` owns
``indices[indptr[r]:indptr[r+1]]``."""

PerRowItems = Union[Sequence[np.ndarray], CSR]
"""Either a list of R 1-D integer arrays or a :data:`CSR` tuple."""


# --------------------------------------------------------------------------
# Input validation helpers
# --------------------------------------------------------------------------
def _as_1d(x, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
  return arr


def _binary_labels(labels) -> np.ndarray:
  lab = _as_1d(labels, "labels")
  if lab.dtype == np.bool_:
    return lab
  if not np.all((lab == 0) | (lab == 1)):
    raise ValueError("labels must be binary: bool or numbers in {0, 1}")
  return lab == 1


def _finite_scores(scores) -> np.ndarray:
  s = _as_1d(scores, "scores")
  if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
    raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
  if np.issubdtype(s.dtype, np.floating) and np.isnan(s).any():
    raise ValueError("scores contains NaN")
  return s


def _check_same_length(**arrays: np.ndarray) -> None:
  lengths = {name: len(a) for name, a in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"length mismatch: {lengths}")


def as_csr(
  rows: PerRowItems,
  num_rows: int,
  name: str = "rows",
  num_cols: int | None = None,
) -> CSR:
  """Normalise per-row integer lists to a validated CSR pair.

  Args:
    rows: either a list (any non-tuple sequence) of ``num_rows`` 1-D integer
      arrays, or a tuple ``(indptr [num_rows+1], indices [nnz])``. A tuple is
      always interpreted as CSR, a list always as per-row arrays.
    num_rows: expected number of rows R.
    name: argument name used in error messages.
    num_cols: if given, every index must lie in ``[0, num_cols)``; otherwise
      indices only have to be non-negative.

  Returns:
    ``(indptr int64 [R+1], indices int64 [nnz])``.

  Raises:
    ValueError: wrong number of rows, non-1-D or non-integer arrays, a
      malformed indptr (not starting at 0, decreasing, or not ending at nnz),
      or an index out of range.
  """
  if isinstance(rows, tuple):
    if len(rows) != 2:
      raise ValueError(f"{name}: a CSR tuple must be (indptr, indices), got {len(rows)} items")
    indptr = _as_1d(rows[0], f"{name} indptr")
    indices = _as_1d(rows[1], f"{name} indices")
    if len(indptr) != num_rows + 1:
      raise ValueError(f"{name} indptr must have length {num_rows + 1}, got {len(indptr)}")
    if len(indptr) and not np.issubdtype(indptr.dtype, np.integer):
      raise ValueError(f"{name} indptr must be integer, got dtype {indptr.dtype}")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != len(indices):
      raise ValueError(f"{name} indptr must start at 0, be non-decreasing and end at len(indices)")
  else:
    arrays = [np.asarray(r) for r in rows]
    if len(arrays) != num_rows:
      raise ValueError(f"{name} must have {num_rows} rows, got {len(arrays)}")
    if any(a.ndim != 1 for a in arrays):
      raise ValueError(f"every row of {name} must be a 1-D array")
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=num_rows)
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    nonempty = [a for a in arrays if len(a)]
    indices = np.concatenate(nonempty) if nonempty else np.zeros(0, dtype=np.int64)
  if len(indices) and not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{name} indices must be integer, got dtype {indices.dtype}")
  indices = indices.astype(np.int64)
  if len(indices):
    lo, hi = indices.min(), indices.max()
    if lo < 0 or (num_cols is not None and hi >= num_cols):
      bound = f"[0, {num_cols})" if num_cols is not None else ">= 0"
      raise ValueError(f"{name} indices must be in {bound}, got range [{lo}, {hi}]")
  return indptr, indices


# --------------------------------------------------------------------------
# AUC / GAUC
# --------------------------------------------------------------------------
def _run_starts(a: np.ndarray) -> np.ndarray:
  """bool mask of positions where a sorted 1-D array starts a new run of equal values."""
  starts = np.empty(len(a), dtype=bool)
  starts[:1] = True
  np.not_equal(a[1:], a[:-1], out=starts[1:])
  return starts


def _tie_group_stats(is_pos: np.ndarray, new_group: np.ndarray):
  """Per tie-group (start index, #positives, #negatives) from sorted data."""
  starts = np.flatnonzero(new_group)
  sizes = np.diff(np.append(starts, len(is_pos)))
  pos = np.add.reduceat(is_pos.astype(np.int64), starts)
  return starts, pos, sizes - pos


def auc(labels, scores) -> float:
  """Exact ROC AUC via the Mann-Whitney U statistic.

  AUC = P(score(pos) > score(neg)) + 0.5 * P(score(pos) == score(neg)),
  i.e. average ranks are used for tied scores (identical to
  ``sklearn.metrics.roc_auc_score``). Scores are sorted once
  (``np.argsort``, O(n log n)); the U statistic is accumulated per tie group
  in exact int64 arithmetic as ``sum_g pos_g * (2 * neg_before_g + neg_g)``
  (= 2U), so the result is exact up to the final division even for 10M+
  rows.

  Args:
    labels: [N] bool, or numbers in {0, 1}.
    scores: [N] real numbers (any float/int dtype, no NaN; +-inf allowed).

  Returns:
    AUC as a Python float in [0, 1]; ``float('nan')`` when fewer than two
    classes are present (including N == 0).

  Raises:
    ValueError: ``labels``/``scores`` not 1-D, lengths differ, labels not
      binary, or scores containing NaN.
  """
  y = _binary_labels(labels)
  s = _finite_scores(scores)
  _check_same_length(labels=y, scores=s)
  n = len(y)
  n_pos = int(np.count_nonzero(y))
  n_neg = n - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(s)
  _, pos, neg = _tie_group_stats(y[order], _run_starts(s[order]))
  neg_before = np.cumsum(neg) - neg
  two_u = int(np.sum(pos * (2 * neg_before + neg)))
  return two_u / (2.0 * n_pos * n_neg)


def _sort_by_user_then_score(u: np.ndarray, s: np.ndarray):
  """Permutation sorting by (user, score), plus run-start flags over it.

  Returns ``(order, new_user, new_group)``: ``new_user[i]`` marks the first
  sorted sample of a user, ``new_group[i]`` the first of a run of equal
  (user, score). For integer user ids the sort is one ``np.argsort`` of the
  int64 key ``(user - min) * n_distinct_scores + dense_score_rank`` (about
  2x faster than ``np.lexsort``); other dtypes, or spans that would
  overflow int64, fall back to ``np.lexsort``.
  """
  by_score = np.argsort(s)
  s_sorted = s[by_score]
  score_rank = np.empty(len(s), dtype=np.int64)
  score_rank[by_score] = np.cumsum(_run_starts(s_sorted)) - 1
  num_ranks = int(score_rank[by_score[-1]]) + 1
  if np.issubdtype(u.dtype, np.integer):
    u_min, u_max = int(u.min()), int(u.max())
    if (u_max - u_min + 1) * num_ranks < 2**62:
      user_code = (u - u.dtype.type(u_min)).astype(np.int64)
      key = user_code * num_ranks + score_rank
      order = np.argsort(key)
      return order, _run_starts(user_code[order]), _run_starts(key[order])
  order = np.lexsort((score_rank, u))
  new_user = _run_starts(u[order])
  return order, new_user, new_user | _run_starts(score_rank[order])


def gauc(user_ids, labels, scores) -> float:
  """Group AUC (Zhou et al., DIN, KDD 2018, eq. 7).

  GAUC = sum_u n_u * AUC_u / sum_u n_u, where the sums run over users that
  have at least one positive and one negative sample, n_u is the user's
  number of samples (impressions) and AUC_u is the exact tie-averaged AUC
  (as in :func:`auc`) over that user's samples. Users with a single class
  are ignored.

  Fully vectorised: one sort by (user, score) (see
  :func:`_sort_by_user_then_score`), tie groups are runs of equal
  (user, score), and per-user U statistics are segment sums
  (``np.add.reduceat``) in int64; no Python loop over users.

  Args:
    user_ids: [N] user keys (any sortable dtype, e.g. int64).
    labels: [N] bool, or numbers in {0, 1}.
    scores: [N] real numbers (no NaN).

  Returns:
    GAUC as a Python float; ``float('nan')`` when no user has both classes.

  Raises:
    ValueError: an argument not 1-D, lengths differ, labels not binary, or
      scores containing NaN.
  """
  u = _as_1d(user_ids, "user_ids")
  y = _binary_labels(labels)
  s = _finite_scores(scores)
  _check_same_length(user_ids=u, labels=y, scores=s)
  n = len(u)
  if n == 0:
    return float("nan")
  order, new_user, new_group = _sort_by_user_then_score(u, s)
  starts, pos, neg = _tie_group_stats(y[order], new_group)
  # Index (into the tie-group arrays) of each user's first tie group.
  user_first_group = np.flatnonzero(new_user[starts])
  user_of_group = np.cumsum(new_user[starts]) - 1
  neg_before_global = np.cumsum(neg) - neg
  neg_before = neg_before_global - neg_before_global[user_first_group][user_of_group]

  two_u = np.add.reduceat(pos * (2 * neg_before + neg), user_first_group)
  n_pos = np.add.reduceat(pos, user_first_group)
  n_neg = np.add.reduceat(neg, user_first_group)
  valid = (n_pos > 0) & (n_neg > 0)
  if not valid.any():
    return float("nan")
  auc_u = two_u[valid] / (2.0 * n_pos[valid] * n_neg[valid])
  weight = (n_pos[valid] + n_neg[valid]).astype(np.float64)
  return float(np.dot(weight, auc_u) / weight.sum())


# --------------------------------------------------------------------------
# Top-K retrieval metrics
# --------------------------------------------------------------------------
def _topk_hits(topk: np.ndarray, indptr: np.ndarray, indices: np.ndarray):
  """hits [U, Kmax] bool and |P| [U] (distinct positives per user).

  Ranked entries are encoded as the int64 key
  ``((user * W) + item + 1) * Kmax + rank`` (padding items < 0 map to item
  slot 0, which no positive uses). Sorting each row makes the keys globally
  sorted, so every distinct positive (user, item) finds its first (lowest
  rank) occurrence in the ranked lists with one ``np.searchsorted`` of the
  nnz positives into the U * Kmax keys; later repeats of an item never count.
  """
  num_users, kmax = topk.shape
  width = int(max(indices.max(), topk.max())) + 2
  if num_users * width * kmax >= 2**62:
    raise ValueError(
      f"item ids up to {width - 2} with U={num_users}, K={kmax} overflow the int64 rank keys; "
      "remap items to a dense range 0..N-1"
    )
  user_base = np.arange(num_users, dtype=np.int64) * width

  rows = np.repeat(user_base, np.diff(indptr))
  pos_keys = np.sort(rows + indices + 1)
  pos_keys = pos_keys[_run_starts(pos_keys)]
  pos_user = pos_keys // width
  num_pos = np.bincount(pos_user, minlength=num_users)

  ranked = (user_base[:, None] + np.maximum(topk + 1, 0)) * kmax + np.arange(kmax)
  ranked = np.sort(ranked, axis=1).ravel()
  loc = np.minimum(np.searchsorted(ranked, pos_keys * kmax), len(ranked) - 1)
  found = ranked[loc] // kmax == pos_keys

  hits = np.zeros((num_users, kmax), dtype=bool)
  hits[pos_user[found], ranked[loc[found]] % kmax] = True
  return hits, num_pos


def retrieval_metrics(
  topk_items, test_positives: PerRowItems, ks: Sequence[int], scores=None
) -> dict[str, np.ndarray]:
  """Per-user Recall@K, HitRate@K and NDCG@K (docs/design.md §5).

  With T_K = the first K items of a user's ranked list and P the user's set
  of held-out positives:

  * ``recall@K``  = |T_K ∩ P| / |P|
  * ``hitrate@K`` = 1 if |T_K ∩ P| > 0 else 0
  * ``ndcg@K``    = DCG@K / IDCG@K with binary relevance,
    DCG@K = sum_{r < K, item at rank r in P} 1 / log2(r + 2) and
    IDCG@K = sum_{r < min(|P|, K)} 1 / log2(r + 2)  (ranks r are 0-based).

  P is a set: duplicate entries in a user's positives are counted once, and
  an item repeated within a ranked list only counts at its first rank.
  Negative entries in ``topk_items`` are padding (never a hit), and so are entries whose
  ``scores`` are -inf: the excluded (masked) items that ``topk_scores`` puts in the tail of a
  row when a user has fewer than Kmax allowed items -- a masked item is never retrieved.

  Vectorised: hits [U, Kmax] come from one ``np.searchsorted`` of the
  sorted (user, item) positive keys into the row-sorted ranked keys, then
  cumulative sums over ranks give every K at once.

  Args:
    topk_items: int [U, Kmax] item indices, best first, Kmax >= max(ks).
    test_positives: the users' held-out positives, non-empty for every user:
      a list of U 1-D int arrays, or a CSR tuple ``(indptr [U+1], indices)``
      (see :func:`as_csr`).
    ks: cut-offs, each in [1, Kmax].
    scores: optional float [U, Kmax], the scores of ``topk_items`` (as returned with them by
      ``topk_scores``); entries at -inf are ignored.

  Returns:
    dict mapping ``recall@K``, ``hitrate@K``, ``ndcg@K`` (for every K in
    ``ks``) to float64 arrays of shape [U].

  Raises:
    ValueError: ``topk_items`` not a 2-D integer array, ``ks`` empty or a K
      outside [1, Kmax], ``test_positives`` malformed (see :func:`as_csr`),
      a user with no positives, ``scores`` of another shape, or item ids so large that
      U * max_item * max(ks) reaches 2**62 (remap ids densely).
  """
  topk = np.asarray(topk_items)
  if topk.ndim != 2:
    raise ValueError(f"topk_items must be 2-D [U, Kmax], got shape {topk.shape}")
  if topk.size and not np.issubdtype(topk.dtype, np.integer):
    raise ValueError(f"topk_items must be integer, got dtype {topk.dtype}")
  num_users, kmax = topk.shape
  if scores is not None:
    sc = np.asarray(scores)
    if sc.shape != topk.shape:
      raise ValueError(f"scores must have the shape of topk_items {topk.shape}, got {sc.shape}")
    topk = np.where(np.isneginf(sc), -1, topk)
  ks = sorted({int(k) for k in ks})
  if not ks:
    raise ValueError("ks must contain at least one cut-off")
  if ks[0] < 1 or ks[-1] > kmax:
    raise ValueError(f"every K in ks must be in [1, Kmax={kmax}], got {ks}")
  topk = topk[:, : ks[-1]].astype(np.int64)  # ranks beyond max(ks) never matter
  kmax = ks[-1]
  indptr, indices = as_csr(test_positives, num_users, "test_positives")
  empty = np.flatnonzero(np.diff(indptr) == 0)
  if len(empty):
    raise ValueError(
      f"test_positives must be non-empty for every user; empty for users {empty[:10].tolist()}"
    )
  if num_users == 0:
    return {f"{m}@{k}": np.zeros(0) for k in ks for m in ("recall", "hitrate", "ndcg")}

  hits, num_pos = _topk_hits(topk, indptr, indices)
  discount = 1.0 / np.log2(np.arange(kmax, dtype=np.float64) + 2.0)
  cum_hits = np.cumsum(hits, axis=1)
  cum_dcg = np.cumsum(hits * discount, axis=1)
  cum_idcg = np.cumsum(discount)

  out: dict[str, np.ndarray] = {}
  for k in ks:
    n_hit = cum_hits[:, k - 1]
    out[f"recall@{k}"] = n_hit / num_pos
    out[f"hitrate@{k}"] = (n_hit > 0).astype(np.float64)
    out[f"ndcg@{k}"] = cum_dcg[:, k - 1] / cum_idcg[np.minimum(num_pos, k) - 1]
  return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, float]:
  """Average per-user metrics (docs/design.md §5: metrics are user-averaged).

  Args:
    per_user: dict of equal-length 1-D arrays [U], e.g. the output of
      :func:`retrieval_metrics`.

  Returns:
    dict with the mean of every entry as a plain Python float (nan when
    U == 0) plus ``num_users`` (int U).

  Raises:
    ValueError: ``per_user`` empty, an entry not 1-D, lengths differ, or a
      key named ``num_users``.
  """
  if not per_user:
    raise ValueError("per_user must contain at least one metric")
  if "num_users" in per_user:
    raise ValueError("per_user must not contain the reserved key 'num_users'")
  arrays = {name: _as_1d(v, f"per_user[{name!r}]") for name, v in per_user.items()}
  _check_same_length(**arrays)
  num_users = len(next(iter(arrays.values())))
  summary: dict[str, float] = {
    name: float(np.mean(a, dtype=np.float64)) if num_users else float("nan")
    for name, a in arrays.items()
  }
  summary["num_users"] = num_users
  return summary
