"""Tests for sass_jax.eval.metrics and sass_jax.eval.retrieval."""

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sass_jax.eval.metrics import auc, gauc, retrieval_metrics, summarize
from sass_jax.eval.retrieval import popularity_topk, topk_scores

INV_LOG2_3 = 0.6309297535714575  # 1 / log2(3)


# --------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 2000
  labels = rng.random(n) < 0.3
  scores = np.round(rng.random(n) + 0.3 * labels, 1)  # 1 decimal -> many ties
  assert len(np.unique(scores)) < 20
  assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
  assert auc(labels.astype(np.float32), scores) == pytest.approx(
    roc_auc_score(labels, scores), abs=1e-12
  )


def test_auc_hand_example_and_edge_cases():
  # pos {0.8, 0.5}, neg {0.5, 0.1}: pairs 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
  assert auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.1]) == 0.875
  assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert math.isnan(auc([], []))
  with pytest.raises(ValueError, match="scores"):
    auc([1, 0], [[0.1, 0.2]])
  with pytest.raises(ValueError, match="length mismatch"):
    auc([1, 0, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="labels"):
    auc([2, 0], [0.1, 0.2])


# --------------------------------------------------------------------------
# GAUC
# --------------------------------------------------------------------------
def test_gauc_hand_example():
  # User 7 (4 samples): pos {0.9, 0.3}, neg {0.8, 0.1}: 3 of 4 pairs right -> AUC 0.75, weight 4.
  # User 3 (2 samples): pos 0.5 vs neg 0.5 tie -> AUC 0.5, weight 2.
  # User 5 (3 samples, all positive): ignored.
  # GAUC = (4 * 0.75 + 2 * 0.5) / 6 = 4 / 6 = 2/3.
  users = np.array([7, 3, 5, 7, 5, 7, 3, 5, 7])
  labels = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0])
  scores = np.array([0.9, 0.5, 0.2, 0.8, 0.4, 0.3, 0.5, 0.9, 0.1])
  assert gauc(users, labels, scores) == pytest.approx(2 / 3, abs=1e-15)
  assert math.isnan(gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3]))  # no user has both classes
  with pytest.raises(ValueError, match="user_ids"):
    gauc([[1, 2]], [1, 0], [0.1, 0.2])
  with pytest.raises(ValueError, match="length mismatch"):
    gauc([1, 2, 3], [1, 0], [0.1, 0.2])


def _gauc_reference(users, labels, scores):
  num, den = 0.0, 0.0
  for u in np.unique(users):
    m = users == u
    if labels[m].min() != labels[m].max():
      num += m.sum() * roc_auc_score(labels[m], scores[m])
      den += m.sum()
  return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_per_user_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = 5000
  users = rng.integers(0, 300, size=n) * 17 - 1000  # unsorted, negative, non-contiguous ids
  labels = (rng.random(n) < 0.2).astype(np.float64)
  scores = np.round(rng.random(n) + 0.2 * labels, 1)
  expected = _gauc_reference(users, labels, scores)
  assert gauc(users, labels, scores) == pytest.approx(expected, abs=1e-12)
  # Non-integer ids take the np.lexsort path; unsigned ids the int64-key path.
  assert gauc(users.astype(str), labels, scores) == pytest.approx(expected, abs=1e-12)
  assert gauc((users + 1000).astype(np.uint64), labels, scores) == pytest.approx(
    expected, abs=1e-12
  )


# --------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------
def test_retrieval_metrics_hand_example():
  topk = np.array([[2, 0, 4], [1, 3, 4]])
  positives = [np.array([0, 3]), np.array([4, 1, 2])]
  # user 0: hits at rank 1 only; |P| = 2.
  #   K=1: recall 0, hit 0, ndcg 0.
  #   K=2: recall 1/2, hit 1, ndcg = (1/log2 3) / (1 + 1/log2 3) = 0.38685280723454163.
  #   K=3: same as K=2 (IDCG still uses min(|P|, K) = 2 terms).
  # user 1: hits at ranks 0 and 2; |P| = 3.
  #   K=1: recall 1/3, hit 1, ndcg = 1 / 1 = 1.
  #   K=2: recall 1/3, hit 1, ndcg = 1 / (1 + 1/log2 3) = 0.6131471927654584.
  #   K=3: recall 2/3, hit 1, ndcg = (1 + 1/2) / (1 + 1/log2 3 + 1/2) = 0.7039180890341347.
  expected = {
    "recall@1": [0.0, 1 / 3],
    "recall@2": [0.5, 1 / 3],
    "recall@3": [0.5, 2 / 3],
    "hitrate@1": [0.0, 1.0],
    "hitrate@2": [1.0, 1.0],
    "hitrate@3": [1.0, 1.0],
    "ndcg@1": [0.0, 1.0],
    "ndcg@2": [0.38685280723454163, 0.6131471927654584],
    "ndcg@3": [0.38685280723454163, 0.7039180890341347],
  }
  assert INV_LOG2_3 / (1 + INV_LOG2_3) == pytest.approx(0.38685280723454163, abs=1e-15)
  csr = (np.array([0, 2, 5]), np.array([0, 3, 4, 1, 2]))
  for pos in (positives, csr):
    got = retrieval_metrics(topk, pos, ks=[1, 2, 3])
    assert set(got) == set(expected)
    for key, val in expected.items():
      assert got[key].dtype == np.float64
      np.testing.assert_allclose(got[key], val, rtol=0, atol=1e-15, err_msg=key)

  summary = summarize(got)
  assert summary["num_users"] == 2
  assert summary["recall@3"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-15)
  assert summary["ndcg@2"] == pytest.approx(
    (0.38685280723454163 + 0.6131471927654584) / 2, abs=1e-15
  )
  assert isinstance(summary["hitrate@1"], float) and summary["hitrate@1"] == 0.5


def test_retrieval_metrics_padding_duplicates_and_errors():
  # Negative entries are padding; the repeated 3 only counts at its first rank;
  # duplicate positives count once. User 0 of the second row must not leak into user 1.
  topk = np.array([[-1, 3, 3, 5, 7], [-5, -1, 2, 9, 9]])
  got = retrieval_metrics(topk, [np.array([3, 5, 5]), np.array([9, 1])], ks=[4, 5])
  np.testing.assert_array_equal(got["recall@4"], [1.0, 0.5])
  # user 0: DCG = 1/log2(3) + 1/log2(5); IDCG = 1 + 1/log2(3).
  # user 1: DCG = 1/log2(5); IDCG = 1 + 1/log2(3).
  np.testing.assert_allclose(
    got["ndcg@5"],
    [(INV_LOG2_3 + 1 / math.log2(5)) / (1 + INV_LOG2_3), (1 / math.log2(5)) / (1 + INV_LOG2_3)],
    rtol=0,
    atol=1e-15,
  )
  with pytest.raises(ValueError, match="Kmax"):
    retrieval_metrics(topk, [np.array([3]), np.array([1])], ks=[6])
  with pytest.raises(ValueError, match="non-empty"):
    retrieval_metrics(np.zeros((2, 2), int), [np.array([1]), np.array([], dtype=int)], ks=[1])
  with pytest.raises(ValueError, match="test_positives"):
    retrieval_metrics(np.zeros((2, 2), int), (np.array([0, 1]), np.array([1])), ks=[1])


def test_retrieval_metrics_matches_loop_reference():
  rng = np.random.default_rng(0)
  num_users, num_items, kmax = 200, 50, 20
  topk = np.stack([rng.permutation(num_items)[:kmax] for _ in range(num_users)])
  positives = [
    rng.choice(num_items, size=rng.integers(1, 15), replace=False) for _ in range(num_users)
  ]
  got = retrieval_metrics(topk, positives, ks=[5, 20])
  for u in range(num_users):
    p = set(positives[u].tolist())
    for k in (5, 20):
      rel = [1.0 if int(i) in p else 0.0 for i in topk[u, :k]]
      dcg = sum(r / math.log2(j + 2) for j, r in enumerate(rel))
      idcg = sum(1 / math.log2(j + 2) for j in range(min(len(p), k)))
      assert got[f"recall@{k}"][u] == pytest.approx(sum(rel) / len(p), abs=1e-12)
      assert got[f"hitrate@{k}"][u] == float(sum(rel) > 0)
      assert got[f"ndcg@{k}"][u] == pytest.approx(dcg / idcg, abs=1e-12)


# --------------------------------------------------------------------------
# Device top-K
# --------------------------------------------------------------------------
def test_topk_scores_hand_example_with_exclusion():
  items = np.array([[6, 1], [5, 2], [4, 3], [3, 4], [2, 5], [1, 6]], np.float32)
  users = np.array([[1, 0], [0, 1], [1, -1]], np.float32)
  # user 0 scores [6,5,4,3,2,1], item 0 (the best) excluded -> items 1,2,3.
  # user 1 scores [1,2,3,4,5,6], items 5 and 3 excluded -> items 4,2,1.
  # user 2 scores [5,3,1,-1,-3,-5], nothing excluded -> items 0,1,2.
  exclude = (np.array([0, 1, 3, 3], np.int64), np.array([0, 5, 3], np.int32))
  for chunk_size in (1, 2, 1024):
    scores, idx = topk_scores(users, items, 3, exclude=exclude, chunk_size=chunk_size)
    assert scores.dtype == np.float32 and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, [[1, 2, 3], [4, 2, 1], [0, 1, 2]])
    np.testing.assert_array_equal(scores, [[5, 4, 3], [5, 3, 2], [5, 3, 1]])
  # Without exclusion the training positive comes back on top.
  _, idx = topk_scores(users, items, 1)
  np.testing.assert_array_equal(idx[:, 0], [0, 5, 0])


def test_topk_scores_matches_numpy_reference():
  rng = np.random.default_rng(0)
  num_users, num_items, dim, k = 37, 53, 8, 10
  users = rng.normal(size=(num_users, dim)).astype(np.float32)
  items = rng.normal(size=(num_items, dim)).astype(np.float32)
  excluded = [
    rng.choice(num_items, size=rng.integers(0, 21), replace=False) for _ in range(num_users)
  ]

  ref = users.astype(np.float64) @ items.T.astype(np.float64)
  for u, ex in enumerate(excluded):
    ref[u, ex] = -np.inf
  ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :k]

  scores, idx = topk_scores(users, items, k, exclude=excluded, chunk_size=8)  # 37 = 4*8 + 5: padded
  assert idx.shape == scores.shape == (num_users, k)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, np.take_along_axis(ref, ref_idx, axis=1), rtol=1e-5, atol=1e-5)
  for u, ex in enumerate(excluded):
    assert not set(idx[u].tolist()) & set(ex.tolist())

  # k larger than N is clipped to N.
  scores_all, idx_all = topk_scores(users, items, 1000, chunk_size=16)
  assert idx_all.shape == (num_users, num_items)
  np.testing.assert_array_equal(idx_all, np.argsort(-(users.astype(np.float64) @ items.T), axis=1))


def test_topk_scores_errors():
  with pytest.raises(ValueError, match="dims"):
    topk_scores(np.zeros((2, 3)), np.zeros((4, 2)), 1)
  with pytest.raises(ValueError, match="exclude"):
    topk_scores(np.zeros((2, 3)), np.zeros((4, 3)), 1, exclude=[np.array([0]), np.array([4])])


def test_popularity_topk_order_and_exclusion():
  counts = np.array([3.0, 5.0, 5.0, 0.0, 2.0])
  # Popularity order, ties to lower index: items 1, 2, 0, 4, 3.
  exclude = [np.array([2]), np.array([], dtype=np.int64), np.array([1, 0])]
  scores, idx = popularity_topk(counts, 3, 3, exclude=exclude)
  np.testing.assert_array_equal(idx, [[1, 0, 4], [1, 2, 0], [2, 4, 3]])
  np.testing.assert_array_equal(scores, [[5, 3, 2], [5, 5, 3], [5, 2, 0]])

  # k > N is clipped; the excluded item fills the last slot with -inf.
  scores, idx = popularity_topk(counts, 1, 10, exclude=(np.array([0, 1]), np.array([2])))
  np.testing.assert_array_equal(idx, [[1, 0, 4, 3, 2]])
  np.testing.assert_array_equal(scores, [[5, 3, 2, 0, -np.inf]])

  # Counts that collide in float32 still rank exactly (2**25 + 1 > 2**25).
  big = np.array([2.0**25, 2.0**25 + 1, 1.0])
  _, idx = popularity_topk(big, 2, 2, chunk_size=1)
  np.testing.assert_array_equal(idx, [[1, 0], [1, 0]])
