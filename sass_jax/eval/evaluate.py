"""Evaluation of a trained two-tower model on a prepared data set (docs/design.md §5).

Retrieval, per scenario k: every user with at least one labelled positive of the evaluated
split in scenario k is scored against the whole item corpus with the items' scenario-k vectors;
the user's training positives in scenario k are masked; Recall@K, HitRate@K, NDCG@K for every K.
Ranking: AUC and GAUC over the split's labelled exposures of scenario k (every rated pair),
exactly over the whole split. 'overall' pools the (user, scenario) lists of every scenario and
every exposure. A most-popular-items baseline (per scenario, from training positives) is
evaluated the same way.

Nothing is unreachable in silence: a test positive that is also a masked (training, or with
``mask='train_valid'`` validation) positive of the same (user, item, scenario) is masked out of
the ranking and so can never be retrieved; such pairs are counted per scenario and overall as
``test_positives_in_train`` in the metrics (with a warning when there are any), and with
``corpus='scenario'`` so are the positives outside the scenario's corpus
(``test_positives_outside_corpus``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np

from sass_jax.data.pipeline import gather_features
from sass_jax.data.store import SPLITS, PreparedData
from sass_jax.eval import metrics as M
from sass_jax.eval.retrieval import popularity_topk, sharded_topk_scores, topk_scores
from sass_jax.model.protocol import ranking_methods
from sass_jax.model.towers import retrieval_part
import flax.linen as nn

from sass_jax.train.steps import as_variables

log = logging.getLogger("sass_jax")
EVAL_SPLITS = ("valid", "test")  # config.eval.split: the split evaluated
EVAL_MASKS = ("train", "train_valid")  # config.eval.mask: the positives masked from rankings
EVAL_CORPORA = ("all", "scenario")  # config.eval.corpus (scenario_corpus)


def _csr(groups: np.ndarray, values: np.ndarray, num_groups: int):
  """CSR (indptr [G+1], indices) of ``values`` grouped by ``groups`` in [0, G)."""
  order = np.argsort(groups, kind="stable")
  indptr = np.zeros(num_groups + 1, np.int64)
  np.cumsum(np.bincount(groups, minlength=num_groups), out=indptr[1:])
  return indptr, np.asarray(values)[order].astype(np.int64)


def encode_all(
  model: nn.Module,
  params,
  table: dict,
  masks: dict,
  method: str,
  scenario: int | None,
  chunk: int = 4096,
  partitioner=None,
) -> np.ndarray:
  """Vectors of every entity of a table, computed in fixed-size chunks on the device.

  Returns float32 [N, D] for ``scenario`` k, or [N, K, D] (every scenario) if it is None.
  With a ``partitioner`` (params on its mesh, possibly spanning processes) the inputs and
  vectors are replicated over the mesh, so every process gets all of them.
  """
  n = len(next(iter(table.values())))
  rep = None if partitioner is None else partitioner.replicated()
  fn = _encoder(model, method, scenario is None, rep)
  out = []
  for start in range(0, n, chunk):
    rows = np.arange(start, min(start + chunk, n))
    pad = chunk - len(rows) if n > chunk else 0
    rows_p = np.concatenate([rows, np.full(pad, rows[-1])]) if pad else rows
    feats = gather_features(table, masks, rows_p)
    sc = None if scenario is None else np.full(len(rows_p), scenario, np.int32)
    if rep is not None:
      feats, sc = jax.device_put((feats, sc), rep)
    out.append(np.asarray(fn(params, feats, sc))[: len(rows)])
  return np.concatenate(out)


_ENCODERS: dict = {}


def _encoder(model, method, all_scenarios, out_sharding=None) -> Callable:
  key = (model, method, all_scenarios, out_sharding)
  if key not in _ENCODERS:
    m = method
    if all_scenarios:
      _ENCODERS[key] = jax.jit(
        lambda v, f, s: model.apply(as_variables(v), f, None, method=m), out_shardings=out_sharding
      )
    else:
      _ENCODERS[key] = jax.jit(
        lambda v, f, s: model.apply(as_variables(v), f, s, method=m), out_shardings=out_sharding
      )
  return _ENCODERS[key]


def _check_corpus(corpus: str) -> None:
  if corpus not in EVAL_CORPORA:
    raise ValueError(f"config.eval.corpus={corpus!r}; expected one of {EVAL_CORPORA}")


def scenario_corpus(data: PreparedData, k: int, corpus: str = "all") -> np.ndarray | None:
  """The candidate items of scenario k: None for 'all' (every item of the corpus,
  docs/design.md §5), or for 'scenario' int64 [N_k] (sorted) the items with at least one interaction of
  scenario k in the training split -- the domain's catalogue when scenarios are domains with
  their own items (Douban book / music, Amazon sports / clothing), where ranking the other
  domain's items would only test whether a model can tell the domains apart. Only training
  rows count: a catalogue read from the validation or test rows would tell the ranking which
  items the held-out positives are.

  Raises ValueError for another ``corpus``.
  """
  _check_corpus(corpus)
  if corpus == "all":
    return None
  inter = data.inter
  sel = (np.asarray(inter["scenario"]) == k) & (np.asarray(inter["split"]) == SPLITS["train"])
  return np.unique(np.asarray(inter["item"])[sel]).astype(np.int64)


def _pair_keys(inter: dict, rows: np.ndarray, num_items: int) -> np.ndarray:
  """int64 keys user * num_items + item of the given interaction rows."""
  return inter["user"][rows].astype(np.int64) * int(num_items) + inter["item"][rows]


def _valid_only(topk: Callable) -> Callable:
  """``topk`` returning (scores, indices) -> indices, with -inf entries (excluded items that
  fill a row when fewer than K items are allowed) replaced by -1 (padding, never a hit)."""

  def fn(vecs, ex):
    scores, idx = topk(vecs, ex)
    return np.where(np.isneginf(np.asarray(scores)), -1, np.asarray(idx))

  return fn


def _in_corpus(
  topk: Callable, cand: np.ndarray | None, item_vecs, num_users: int, kmax: int, exclude
):
  """``topk(item_vecs, exclude)`` over the candidates ``cand`` only: exclusions are mapped to
  candidate positions and the result back to item indices (padding -1 stays -1), padded with
  -1 to ``kmax``."""
  if cand is None:
    return topk(item_vecs, exclude)
  pos = np.full(item_vecs.shape[0], -1, np.int64)
  pos[cand] = np.arange(len(cand))
  indptr, ex = (np.asarray(a, np.int64) for a in exclude)
  local = pos[ex]
  keep = local >= 0  # only candidates can be ranked, so only they need masking
  row = np.repeat(np.arange(num_users), np.diff(indptr))
  new_ptr = np.zeros(num_users + 1, np.int64)
  np.cumsum(np.bincount(row[keep], minlength=num_users), out=new_ptr[1:])
  idx = np.asarray(topk(item_vecs[cand], (new_ptr, local[keep])))
  out = np.full((num_users, kmax), -1, np.int64)
  out[:, : idx.shape[1]] = np.where(idx >= 0, cand[np.maximum(idx, 0)], -1)  # -1: padding
  return out


def evaluate(
  model: nn.Module,
  params,
  data: PreparedData,
  split: str = "test",
  ks=(20, 50, 100),
  mask: str = "train",
  user_chunk: int = 1024,
  partitioner=None,
  corpus: str = "all",
) -> dict[str, Any]:
  """Evaluate ``params`` and the popularity baseline on ``split``.

  Returns the metrics dict written to metrics.json::

    {"split": ..., "scenarios": {name: {"recall@50": .., "ndcg@50": .., "hitrate@50": ..,
      "auc": .., "gauc": .., "num_users": .., "num_exposures": ..,
      "test_positives_in_train": .., ["test_positives_outside_corpus": ..]}}, "overall": {...},
     "baselines": {"popularity": {"scenarios": {...}, "overall": {...}}},
     "auc_score": "retrieval" | "retrieval + preference head"}

  mask: 'train' masks each user's training positives (in the scenario evaluated);
  'train_valid' also masks validation positives. Raises ValueError for an unknown mask/split,
  and for split='valid' with mask='train_valid' (it would mask the positives being scored).
  Masked items never count as retrieved, even where they fill the tail of a user's list.
  partitioner: a ``sass_jax.partition.Partitioner`` whose mesh holds ``params``: vectors are
  gathered replicated and the top-K is ``retrieval.sharded_topk_scores`` (items split over
  every device of the mesh, exact merge; docs/design.md §6) -- same metrics, and it runs with
  several processes. None: the single-device ``retrieval.topk_scores``.
  corpus: 'all' ranks every item in every scenario (docs/design.md §5); 'scenario' ranks only the
  scenario's own items (:func:`scenario_corpus`), for the model and popularity alike.
  Raises ValueError for an unknown corpus.
  """
  _check_corpus(corpus)
  if mask not in EVAL_MASKS:
    raise ValueError(f"config.eval.mask={mask!r}; expected 'train' or 'train_valid'")
  if split not in EVAL_SPLITS:
    raise ValueError(f"config.eval.split={split!r}; expected 'valid' or 'test'")
  if split == "valid" and mask == "train_valid":
    raise ValueError(
      "config.eval.split='valid' with config.eval.mask='train_valid' masks the "
      "very validation positives being scored; use config.eval.mask='train'"
    )
  inter = {c: np.asarray(v) for c, v in data.inter.items()}
  kmax = max(ks)
  # the vectors that score labelled exposures (AUC, GAUC): the retrieval vectors, or SASS's
  # ranking vectors when it has a preference head (model.protocol.ranking_methods); the
  # items are encoded once, the retrieval vectors being the ranking vectors' leading part
  rank_u, rank_i = ranking_methods(model)
  item_rank = encode_all(
    model, params, data.items, data.item_masks, rank_i, None, partitioner=partitioner
  )  # [N, K, D']
  item_all = retrieval_part(getattr(model, "cfg", None), item_rank)  # [N, K, D]
  pos = inter["label"] > 0.5
  in_split = inter["split"] == SPLITS[split]
  masked_splits = [SPLITS["train"]] + ([SPLITS["valid"]] if mask == "train_valid" else [])
  in_mask = np.isin(inter["split"], masked_splits) & pos

  model_users, pop_users, scen_res, pop_res = [], [], {}, {}
  all_scores, all_labels, all_groups, all_pop = [], [], [], []
  for k, name in enumerate(data.scenario_names):
    sk = inter["scenario"] == k
    test_rows = np.flatnonzero(in_split & sk & pos)
    users = np.unique(inter["user"][test_rows])
    res, pres = {"num_users": int(len(users))}, {"num_users": int(len(users))}
    exp_rows = np.flatnonzero(in_split & sk)
    res["num_exposures"] = pres["num_exposures"] = int(len(exp_rows))
    # Held-out positives that are also masked positives of the same (user, item, scenario):
    # masked out of the ranking, so never retrievable. Counted, never silently lost.
    test_keys = np.unique(_pair_keys(inter, test_rows, data.num_items))
    masked_keys = _pair_keys(inter, np.flatnonzero(in_mask & sk), data.num_items)
    n_in_train = int(np.isin(test_keys, masked_keys).sum())
    res["test_positives_in_train"] = pres["test_positives_in_train"] = n_in_train
    cand = scenario_corpus(data, k, corpus)
    if cand is not None:
      n_out = int((~np.isin(test_keys % data.num_items, cand)).sum())
      res["test_positives_outside_corpus"] = pres["test_positives_outside_corpus"] = n_out
    counts = np.bincount(
      inter["item"][np.flatnonzero(sk & pos & (inter["split"] == 0))], minlength=data.num_items
    ).astype(np.float32)
    if len(users):
      local = np.searchsorted(users, inter["user"][test_rows])
      test_pos = _csr(local, inter["item"][test_rows], len(users))
      mrows = np.flatnonzero(in_mask & sk & np.isin(inter["user"], users))
      exclude = _csr(np.searchsorted(users, inter["user"][mrows]), inter["item"][mrows], len(users))
      uvec = encode_all(
        model,
        params,
        {f: c[users] for f, c in data.users.items()},
        {f: c[users] for f, c in data.user_masks.items()},
        "encode_user",
        k,
        partitioner=partitioner,
      )
      if partitioner is None:
        model_topk = _valid_only(
          lambda vecs, ex: topk_scores(uvec, vecs, kmax, exclude=ex, chunk_size=user_chunk)
        )
      else:
        model_topk = _valid_only(
          lambda vecs, ex: sharded_topk_scores(
            uvec, vecs, kmax, partitioner.mesh, exclude=ex, chunk_size=user_chunk
          )
        )
      idx = _in_corpus(model_topk, cand, item_all[:, k], len(users), kmax, exclude)
      per_user = M.retrieval_metrics(idx, test_pos, ks)
      pidx = _in_corpus(
        _valid_only(lambda c, ex: popularity_topk(c, len(users), kmax, exclude=ex)),
        cand,
        counts,
        len(users),
        kmax,
        exclude,
      )
      pop_per_user = M.retrieval_metrics(pidx, test_pos, ks)
      res.update({m: float(v.mean()) for m, v in per_user.items()})
      pres.update({m: float(v.mean()) for m, v in pop_per_user.items()})
      model_users.append(per_user), pop_users.append(pop_per_user)
    if len(exp_rows):
      eu = inter["user"][exp_rows]
      # Encode each distinct user once, then score every exposure row.
      eus, inv = np.unique(eu, return_inverse=True)
      uv = encode_all(
        model,
        params,
        {f: c[eus] for f, c in data.users.items()},
        {f: c[eus] for f, c in data.user_masks.items()},
        rank_u,
        k,
        partitioner=partitioner,
      )
      scores = np.einsum("nd,nd->n", uv[inv], item_rank[inter["item"][exp_rows], k])
      labels = inter["label"][exp_rows]
      pscores = counts[inter["item"][exp_rows]]
      res["auc"], res["gauc"] = M.auc(labels, scores), M.gauc(eu, labels, scores)
      pres["auc"], pres["gauc"] = M.auc(labels, pscores), M.gauc(eu, labels, pscores)
      all_scores.append(scores), all_labels.append(labels), all_pop.append(pscores)
      all_groups.append(eu.astype(np.int64) * data.num_scenarios + k)
    scen_res[name], pop_res[name] = res, pres

  lost = {n: r["test_positives_in_train"] for n, r in scen_res.items()}
  if sum(lost.values()):
    log.warning(
      "%d positive(s) of the %s split are also %s positives of the same (user, item, "
      "scenario) and are masked out of the ranking, so no model can retrieve them "
      "(per scenario: %s); counted as test_positives_in_train in the metrics",
      sum(lost.values()),
      split,
      "training" if mask == "train" else "training / validation",
      lost,
    )

  def pooled(per_users, scores):
    out = {"num_users": int(sum(len(next(iter(p.values()))) for p in per_users))}
    for key in ("test_positives_in_train", "test_positives_outside_corpus"):
      if any(key in r for r in scen_res.values()):
        out[key] = int(sum(r.get(key, 0) for r in scen_res.values()))
    if per_users:
      out.update({m: float(np.concatenate([p[m] for p in per_users]).mean()) for m in per_users[0]})
    if scores:
      lab, grp, sc = map(np.concatenate, (all_labels, all_groups, scores))
      out.update(
        {"auc": M.auc(lab, sc), "gauc": M.gauc(grp, lab, sc), "num_exposures": int(len(lab))}
      )
    return out

  return {
    "split": split,
    "corpus": corpus,
    "mask": mask,
    "num_items": data.num_items,
    # what scored AUC / GAUC: the retrieval score, or SASS's ranking score with its
    # preference head (model.protocol.ranking_methods)
    "auc_score": "retrieval" if rank_u == "encode_user" else "retrieval + preference head",
    "scenarios": scen_res,
    "overall": pooled(model_users, all_scores),
    "baselines": {"popularity": {"scenarios": pop_res, "overall": pooled(pop_users, all_pop)}},
  }


def markdown_table(metrics: dict, k: int = 50) -> str:
  """A Markdown table: one row per scenario plus 'overall'; model and popularity columns."""
  cols = [f"recall@{k}", f"ndcg@{k}", f"hitrate@{k}", "auc", "gauc"]
  model = metrics.get("model", "model")
  head = ["scenario", "users"] + [f"{model} {c}" for c in cols] + [f"Pop {c}" for c in cols[:3]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  if metrics.get("auc_score", "retrieval") != "retrieval":
    lines.insert(0, f"AUC / GAUC scored by: {metrics['auc_score']}\n")
  pop = metrics["baselines"]["popularity"]
  rows = list(metrics["scenarios"].items()) + [("overall", metrics["overall"])]
  for name, r in rows:
    p = pop["overall"] if name == "overall" else pop["scenarios"][name]
    fmt = lambda d, c: f"{d[c]:.4f}" if c in d and d[c] == d[c] else "n/a"
    cells = (
      [name, str(r.get("num_users", 0))] + [fmt(r, c) for c in cols] + [fmt(p, c) for c in cols[:3]]
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
