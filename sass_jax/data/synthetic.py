"""Synthetic multi-scenario exposures with planted structure, any size (docs/design.md §4, "synthetic").

Generative model (all draws from NumPy PCG64 generators seeded by ``data_cfg.seed``):

* C latent clusters (``num_clusters``) with centres ``M[c] ~ N(0, I_d)``, d = ``latent_dim``.
  Every user u has a cluster ``c_u`` (uniform) and a shared latent vector
  ``a_u = M[c_u] + noise * N(0, I_d)``; items likewise (own centres, ``c_i``, ``b_i``).
* Scenario-specific part: in scenario k the user's vector is
  ``u_k = a_u + lam * (P_k[c_u] + a_u W_k)`` and the item's ``v_k = b_i + lam * (Q_k[c_i] + b_i V_k)``,
  with per-scenario cluster offsets ``P_k, Q_k ~ N(0, I_d)`` and per-scenario linear maps
  ``W_k, V_k ~ N(0, 1/d)``; lam = ``scenario_strength``. So a user's preference differs by
  scenario, both per cluster and per user.
* Rows: user ~ activity weights (log-normal), scenario ~ a per-user-cluster Dirichlet(1) mix over
  the K scenarios, exposed item ~ the scenario's popularity: item ranks follow Zipf(``zipf_alpha``)
  and scenario k ranks items by ``sqrt(rho) g_i + sqrt(1 - rho) e_ki`` (rho =
  ``popularity_shared``), so the popular items differ between scenarios.
* Click label ~ Bernoulli(sigmoid(``signal`` * z + beta)), z = the standardised score
  ``<u_k, v_k>`` and beta chosen (on a seeded pilot sample) so the mean click rate is ``ctr``.
* Knobs for the claims experiments (``KNOB_DEFAULTS``; at the defaults the data are byte-for-byte
  what they were before the knobs existed, and the manifest's ``resolved_options`` lists a knob
  only when set): ``scenario_weights`` (K positive numbers: each cluster's scenario mix is
  multiplied by them and renormalised, so scenario k's row share scales with weight k);
  ``item_scenario_strength`` (lam of the item side alone; None = ``scenario_strength``);
  ``scenario_strength_scale`` (K numbers >= 0: lam of scenario k, on both sides, times factor
  k -- 0 makes scenario k's preference the shared ``<a_u, b_i>`` alone);
  ``item_scenario_noise`` (>= 0: ``v_k += item_scenario_noise * e_ik``, an own ``N(0, I_d)`` per
  item and scenario from its own stream, memory ``I * K * d`` floats: appeal that differs by
  scenario item by item, which a scenario-aware user vector cannot absorb);
  ``exposure_signal`` (>= 0: the exposed item ~ popularity * exp(exposure_signal * z), z the score
  standardised under popularity exposure -- what an earlier recommender's logs look like --
  sampled by drawing ``exposure_candidates`` items by popularity per row and keeping one with
  those weights, Gumbel-max, in blocks of 8192 rows; beta is then set on a pilot of these
  exposures so the click rate is still ``ctr``); ``label_fraction`` (in (0, 1], or one per
  scenario: each *training-split* click stays a label with this probability, else it becomes
  an exposure without a click; valid / test labels are untouched). Each is validated with a
  one-line ValueError naming ``config.data.<key>``.
* Side fields: ``num_user_fields`` / ``num_item_fields`` categorical fields ``user_f{j}`` /
  ``item_f{j}`` of ``field_cardinality`` values: a seeded map of the entity's cluster, replaced
  by a uniform random value with probability ``field_noise`` -- so features carry the cluster
  signal.

Store: users = all ``num_users`` users (fields user_id, user_f0..), items = all ``num_items``
items (item_id, item_f0..), int32 [E]; raw ids are the indices as text. Vocabulary ids are from
training-split counts as everywhere (id 0 = never seen in training or rarer than ``min_count``),
computed vectorised. Interactions: ``num_rows`` rows; split: every chunk of ``chunk_rows`` rows is
cut exactly train / valid / test by ``split`` (default 8:1:1) in a seeded random order. Rows are
drawn with replacement, so a (user, item, scenario) can be drawn more than once: every draw is
kept as its own exposure, and the manifest's ``rows_repeated`` counts the draws that repeat an
earlier one (``duplicates: 'keep'``; there is no config choice for generated data).

Rows are generated in chunks straight into memory-mapped columns in a scratch folder beside
``out_dir`` (removed afterwards), so memory stays bounded (O(num_users + num_items) for the entity
state plus O(chunk_rows) per chunk); 1e7 rows take well under a minute on 2 cores.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.table import cfg_get, split_fractions
from sass_jax.schema import FieldSpec

log = logging.getLogger(__name__)

LIMITS = {
  "num_rows": (1_000, 100_000_000),
  "num_users": (1, 100_000_000),
  "num_items": (1, 10_000_000),
  "num_scenarios": (1, 64),
  "num_user_fields": (0, 64),
  "num_item_fields": (0, 64),
}
DEFAULTS = dict(
  num_rows=100_000,
  num_users=10_000,
  num_items=5_000,
  num_scenarios=3,
  num_user_fields=2,
  num_item_fields=2,
  seed=0,
  latent_dim=16,
  num_clusters=32,
  scenario_strength=1.0,
  entity_noise=0.5,
  zipf_alpha=1.0,
  popularity_shared=0.3,
  signal=2.5,
  ctr=0.1,
  field_cardinality=16,
  field_noise=0.2,
  chunk_rows=1 << 19,
  min_count=1,
)
# Knobs for the claims experiments (sass_jax/claims.py). At these defaults the data are exactly
# what the generator made before they existed (same bytes; the manifest's resolved_options lists
# a knob only when it is set away from its default).
KNOB_DEFAULTS = dict(
  scenario_weights=None,  # relative row share per scenario (K positive numbers); None = even
  item_scenario_strength=None,  # lam of the item side; None = scenario_strength
  item_scenario_noise=0.0,  # >= 0: an own N(0, I_d) part per (item, scenario), this scale
  scenario_strength_scale=None,  # K numbers >= 0: lam of scenario k times factor k; None = 1
  exposure_signal=0.0,  # >= 0: exposed item ~ popularity * exp(exposure_signal * z)
  exposure_candidates=32,  # popularity candidates resampled per row when exposure_signal > 0
  label_fraction=1.0,  # in (0, 1], or K of them: share of the training split's clicks kept
)


def _opt(data_cfg, key):
  return cfg_get(data_cfg, key, {**DEFAULTS, **KNOB_DEFAULTS}[key])


def _knobs(data_cfg, K: int) -> dict:
  """The claims knobs (``KNOB_DEFAULTS``), validated: ValueError, one line naming the key."""
  o = {k: _opt(data_cfg, k) for k in KNOB_DEFAULTS}

  def num(key, v, ok, want):
    try:
      f = float(v)
    except (TypeError, ValueError):
      f = float("nan")
    if isinstance(v, bool) or not np.isfinite(f) or not ok(f):
      raise ValueError(f"config.data.{key}={v!r}: expected {want}")
    return f

  w = o["scenario_weights"]
  if w is not None:
    if isinstance(w, (str, bytes)) or not hasattr(w, "__len__") or len(w) != K:
      raise ValueError(
        f"config.data.scenario_weights={w!r}: expected None or {K} positive numbers "
        "(one per scenario)"
      )
    o["scenario_weights"] = [
      num("scenario_weights", x, lambda f: f > 0, f"None or {K} positive numbers") for x in w
    ]
  f = o["scenario_strength_scale"]
  if f is not None:
    want = f"None or {K} numbers >= 0 (one per scenario)"
    if isinstance(f, (str, bytes)) or not hasattr(f, "__len__") or len(f) != K:
      raise ValueError(f"config.data.scenario_strength_scale={f!r}: expected {want}")
    o["scenario_strength_scale"] = [
      num("scenario_strength_scale", x, lambda v: v >= 0, want) for x in f
    ]
  if o["item_scenario_strength"] is not None:
    o["item_scenario_strength"] = num(
      "item_scenario_strength", o["item_scenario_strength"], lambda f: f >= 0, "None or >= 0"
    )
  o["item_scenario_noise"] = num(
    "item_scenario_noise", o["item_scenario_noise"], lambda f: f >= 0, ">= 0"
  )
  o["exposure_signal"] = num("exposure_signal", o["exposure_signal"], lambda f: f >= 0, ">= 0")
  m = o["exposure_candidates"]
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 2 <= m <= 1024:
    raise ValueError(f"config.data.exposure_candidates={m!r}: expected an integer in [2, 1024]")
  o["exposure_candidates"] = int(m)
  lf, want = o["label_fraction"], f"a number in (0, 1] or {K} of them (one per scenario)"
  if isinstance(lf, (str, bytes)) or (hasattr(lf, "__len__") and len(lf) != K):
    raise ValueError(f"config.data.label_fraction={lf!r}: expected {want}")
  if hasattr(lf, "__len__"):
    o["label_fraction"] = [num("label_fraction", x, lambda f: 0 < f <= 1, want) for x in lf]
  else:
    o["label_fraction"] = num("label_fraction", lf, lambda f: 0 < f <= 1, want)
  return o


def _vocab_from_counts(counts: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
  """ids [V] for raw values 0..V-1 with training counts (``store.build_vocab`` ordering)."""
  keep = np.flatnonzero(counts >= max(min_count, 1))
  order = keep[np.lexsort((keep, -counts[keep]))]
  ids = np.zeros(len(counts), np.int32)
  ids[order] = np.arange(1, len(order) + 1, dtype=np.int32)
  return ids, len(order) + 1


class _Side:
  """Latent state of one entity side (users or items)."""

  def __init__(self, rng, n, d, C, K, lam, noise, dtype=np.float32, chunk=1 << 20):
    self.cluster = rng.integers(0, C, size=n, dtype=np.int32)
    centres = rng.standard_normal((C, d)).astype(dtype)
    self.vec = np.empty((n, d), dtype)
    for s in range(0, n, chunk):  # bounded temporaries
      e = min(n, s + chunk)
      self.vec[s:e] = centres[self.cluster[s:e]] + noise * rng.standard_normal(
        (e - s, d), dtype=dtype
      )
    self.offset = (lam * rng.standard_normal((K, C, d))).astype(dtype)
    self.maps = (lam * rng.standard_normal((K, d, d)) / np.sqrt(d)).astype(dtype)

  own = None  # [n, K, d]: an own part per (entity, scenario), when item_scenario_noise > 0

  def in_scenario(self, idx: np.ndarray, k: np.ndarray) -> np.ndarray:
    """float32 [m, d]: the scenario-k vectors of entities ``idx`` (k per row)."""
    a = self.vec[idx]
    out = a + self.offset[k, self.cluster[idx]]
    if self.own is not None:
      out += self.own[idx, k]
    for s in np.unique(k):
      sel = k == s
      out[sel] += a[sel] @ self.maps[s]
    return out


def _fields(rng, cluster, C, num_fields, card, noise):
  """num_fields int32 arrays [n] of raw values in [0, card): a cluster map plus uniform noise."""
  out = []
  for _ in range(num_fields):
    cmap = rng.integers(0, card, size=C, dtype=np.int32)
    v = cmap[cluster]
    flip = rng.random(len(cluster)) < noise
    v[flip] = rng.integers(0, card, size=int(flip.sum()), dtype=np.int32)
    out.append(v)
  return out


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def validate(data_cfg) -> None:
  """The checks ``prepare`` makes before any work, alone: ValueError, one line naming
  ``config.data.<key>``."""
  _options(data_cfg)


def _options(data_cfg) -> tuple[dict, tuple, dict]:
  """(options with defaults, split fractions, claims knobs), validated."""
  o = {k: _opt(data_cfg, k) for k in DEFAULTS}
  for k, (lo, hi) in LIMITS.items():
    v = o[k]
    number = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    if not (number and np.isfinite(v) and int(v) == v and lo <= v <= hi):
      raise ValueError(f"config.data.{k}={v!r}: expected an integer in [{lo}, {hi}]")
    o[k] = int(v)
  if not 0.0 <= o["popularity_shared"] <= 1.0 or not 0.0 < o["ctr"] < 1.0:
    raise ValueError("config.data.popularity_shared must be in [0, 1] and ctr in (0, 1)")
  if o["field_cardinality"] < 1 or o["num_clusters"] < 1 or o["latent_dim"] < 1:
    raise ValueError("config.data.field_cardinality, num_clusters and latent_dim must be >= 1")
  frac = split_fractions(data_cfg)
  return o, frac, _knobs(data_cfg, o["num_scenarios"])


def prepare(data_cfg, out_dir: str | os.PathLike) -> Path:
  """Generate the synthetic data set described in the module docstring and write a store.

  data_cfg fields (defaults in DEFAULTS): num_rows (1e3..1e8), num_users, num_items (<= 1e7),
  num_scenarios (1..64), num_user_fields / num_item_fields, seed, and the model knobs latent_dim,
  num_clusters, scenario_strength, entity_noise, zipf_alpha, popularity_shared, signal, ctr,
  field_cardinality, field_noise; chunk_rows, split, min_count.

  Output: scenario names ``s0..s{K-1}``; user fields user_id (+ user_f*), item fields item_id
  (+ item_f*), int32 [E]; interactions int32 user / item / scenario, float32 label, int8 split.
  The manifest's ``generator`` block holds the realised click rate per scenario and the
  popularity top-10 items of each scenario.

  Raises ValueError for an option outside its range; the output is the same for the same options
  (deterministic for a seed, whatever the machine).
  """
  t0 = time.time()
  o, frac, kn = _options(data_cfg)
  n, U, I, K = o["num_rows"], o["num_users"], o["num_items"], o["num_scenarios"]
  d, C, seed = int(o["latent_dim"]), int(o["num_clusters"]), int(o["seed"])
  chunk = max(int(o["chunk_rows"]), 1024)
  es = kn["exposure_signal"]
  lf = np.broadcast_to(np.asarray(kn["label_fraction"], np.float64), (K,))
  item_lam = kn["item_scenario_strength"]
  item_lam = o["scenario_strength"] if item_lam is None else item_lam

  rng = np.random.default_rng([seed, 0])
  users = _Side(rng, U, d, C, K, o["scenario_strength"], o["entity_noise"])
  items = _Side(rng, I, d, C, K, item_lam, o["entity_noise"])
  if kn["scenario_strength_scale"] is not None:  # scaled after the draws: same random stream
    f = np.asarray(kn["scenario_strength_scale"], np.float32)[:, None, None]
    for side in (users, items):
      side.offset *= f
      side.maps *= f
  if kn["item_scenario_noise"] > 0:  # own stream: the other draws stay as they were
    items.own = kn["item_scenario_noise"] * np.random.default_rng([seed, 4]).standard_normal(
      (I, K, d), dtype=np.float32
    )
  user_raw_f = _fields(
    rng, users.cluster, C, o["num_user_fields"], o["field_cardinality"], o["field_noise"]
  )
  item_raw_f = _fields(
    rng, items.cluster, C, o["num_item_fields"], o["field_cardinality"], o["field_noise"]
  )
  # Activity of users, scenario mix per user cluster, per-scenario item popularity.
  ucdf = np.cumsum(rng.lognormal(0.0, 1.0, size=U))
  ucdf /= ucdf[-1]
  mix = rng.dirichlet(np.ones(K), size=C)
  if kn["scenario_weights"] is not None:  # reweighted per scenario, renormalised per cluster
    mix = mix * np.asarray(kn["scenario_weights"])
    mix /= mix.sum(1, keepdims=True)
  scen_cdf = np.cumsum(mix, axis=1)[:, :-1]
  rcdf = np.cumsum(np.arange(1, I + 1, dtype=np.float64) ** -float(o["zipf_alpha"]))
  rcdf /= rcdf[-1]
  g = rng.standard_normal(I).astype(np.float32)
  rho = float(o["popularity_shared"])
  by_pop = np.empty((K, I), np.int32)
  for k in range(K):
    z = np.sqrt(rho) * g + np.sqrt(1 - rho) * rng.standard_normal(I).astype(np.float32)
    by_pop[k] = np.argsort(-z, kind="stable")
  del g

  def draw(r, m, signal=0.0):
    uu = np.minimum(np.searchsorted(ucdf, r.random(m), side="right"), U - 1).astype(np.int32)
    kk = (r.random(m)[:, None] >= scen_cdf[users.cluster[uu]]).sum(1).astype(np.int32)
    if signal > 0:  # popularity candidates, one resampled by exp(signal * standardised score)
      return (uu, kk) + _exposed(r, uu, kk, signal)
    rank = np.minimum(np.searchsorted(rcdf, r.random(m), side="right"), I - 1)
    ii = by_pop[kk, rank]
    score = np.einsum("md,md->m", users.in_scenario(uu, kk), items.in_scenario(ii, kk))
    return uu, kk, ii, score

  M = kn["exposure_candidates"]

  def _exposed(r, uu, kk, signal, block=8192):
    """Sampling-importance-resampling of the exposed item: M candidates ~ the scenario's
    popularity, one kept with probability ~ exp(signal * z) (z the score standardised by the
    popularity pilot), in blocks of ``block`` rows (bounded memory)."""
    m = len(uu)
    ii, score = np.empty(m, np.int32), np.empty(m, np.float32)
    for s in range(0, m, block):
      e = min(m, s + block)
      rank = np.minimum(np.searchsorted(rcdf, r.random((e - s, M)), side="right"), I - 1)
      kb = np.repeat(kk[s:e], M)
      cand = by_pop[kb, rank.reshape(-1)]
      ub = np.repeat(users.in_scenario(uu[s:e], kk[s:e]), M, axis=0)
      sc = np.einsum("md,md->m", ub, items.in_scenario(cand, kb)).reshape(e - s, M)
      logits = signal * (sc - mu) / sd + r.gumbel(size=sc.shape)
      pick = np.argmax(logits, 1)
      ii[s:e] = cand.reshape(e - s, M)[np.arange(e - s), pick]
      score[s:e] = sc[np.arange(e - s), pick]
    return ii, score

  # Pilot sample: standardise the score (under popularity exposure) and pick beta for the
  # target click rate (under the exposure actually used).
  _, _, _, pilot = draw(np.random.default_rng([seed, 1]), 20_000)
  mu, sd = float(pilot.mean()), float(pilot.std()) or 1.0
  if es > 0:
    _, _, _, pilot = draw(np.random.default_rng([seed, 1, 1]), 20_000, es)
  zp = o["signal"] * (pilot - mu) / sd
  lo, hi = -30.0, 30.0
  for _ in range(60):
    beta = (lo + hi) / 2
    lo, hi = (beta, hi) if _sigmoid(zp + beta).mean() < o["ctr"] else (lo, beta)

  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  store.remove_stale_temps(out_dir)
  scratch = None
  try:
    scratch = Path(tempfile.mkdtemp(prefix=store.temp_prefix(out_dir, "gen"), dir=out_dir.parent))
    cols = {
      c: np.lib.format.open_memmap(scratch / f"{c}.npy", mode="w+", dtype=dt, shape=(n,))
      for c, dt in store.INTERACTION_COLUMNS.items()
    }
  except OSError as e:
    if scratch is not None:
      shutil.rmtree(scratch, ignore_errors=True)
    raise store.DataError(
      store.os_error_message(e, f"creating scratch space for {n} rows in {out_dir.parent}")
    ) from e
  try:
    u_train = np.zeros(U, np.int64)
    i_train = np.zeros(I, np.int64)
    clicks = np.zeros(K, np.int64)
    rows_k = np.zeros(K, np.int64)
    hidden, zsum = 0, 0.0
    for ci, s in enumerate(range(0, n, chunk)):
      m = min(chunk, n - s)
      r = np.random.default_rng([seed, 2, ci])
      uu, kk, ii, score = draw(r, m, es)
      zsum += float(((score - mu) / sd).sum())
      label = r.random(m) < _sigmoid(o["signal"] * (score - mu) / sd + beta)
      n_tr, n_va = int(round(frac[0] * m)), int(round(frac[1] * m))
      sp = np.repeat(np.array([0, 1, 2], np.int8), [n_tr, n_va, max(m - n_tr - n_va, 0)])[:m]
      r.shuffle(sp)
      if (lf < 1.0).any():  # hide training clicks: they stay as exposures without a click
        hide = (sp == 0) & label & (np.random.default_rng([seed, 3, ci]).random(m) >= lf[kk])
        label[hide] = False
        hidden += int(hide.sum())
      cols["user"][s : s + m], cols["item"][s : s + m] = uu, ii
      cols["scenario"][s : s + m], cols["label"][s : s + m], cols["split"][s : s + m] = (
        kk,
        label,
        sp,
      )
      tr = sp == 0
      u_train += np.bincount(uu[tr], minlength=U)
      i_train += np.bincount(ii[tr], minlength=I)
      clicks += np.bincount(kk, weights=label, minlength=K).astype(np.int64)
      rows_k += np.bincount(kk, minlength=K)
    for c in cols.values():
      c.flush()
    del users.vec, items.vec
    # Draws are with replacement, so a (user, item, scenario) can repeat; they are kept (each
    # draw is its own exposure) and counted.
    key = cols["user"].astype(np.int64) * (I * K) + cols["item"].astype(np.int64) * K
    key += cols["scenario"]
    key.sort()
    repeated = int(np.count_nonzero(key[1:] == key[:-1]))
    del key

    mc = int(o["min_count"])
    ucols, specs_u = {}, []
    ids, size = _vocab_from_counts(u_train, mc)
    ucols["user_id"] = ids
    specs_u.append(FieldSpec("user_id", size))
    for j, v in enumerate(user_raw_f):
      vid, size = _vocab_from_counts(
        np.bincount(v, weights=u_train, minlength=o["field_cardinality"]), mc
      )
      ucols[f"user_f{j}"] = vid[v]
      specs_u.append(FieldSpec(f"user_f{j}", size))
    icols, specs_i = {}, []
    ids, size = _vocab_from_counts(i_train, mc)
    icols["item_id"] = ids
    specs_i.append(FieldSpec("item_id", size))
    for j, v in enumerate(item_raw_f):
      vid, size = _vocab_from_counts(
        np.bincount(v, weights=i_train, minlength=o["field_cardinality"]), mc
      )
      icols[f"item_f{j}"] = vid[v]
      specs_i.append(FieldSpec(f"item_f{j}", size))

    extra = {
      "dataset": "synthetic",
      "sources": {},
      "rows_read": {"generated": n},
      "rows_rejected": {},
      "duplicates": "keep",
      "rows_merged": {},
      "rows_repeated": {"generated": repeated},
      "rows_kept": {"interactions": n, "users": U, "items": I},
      "options": store.data_options(data_cfg),
      "label": "Bernoulli(sigmoid(signal * standardised <u_k, v_k> + beta))",
      "scenario_rule": "planted: scenario ~ Dirichlet mix of the user's cluster",
      "generator": {
        "resolved_options": {
          **o,
          **{k: v for k, v in kn.items() if v != KNOB_DEFAULTS[k]},
        },
        "beta": beta,
        "score_mean": mu,
        "score_std": sd,
        "click_rate_by_scenario": (clicks / np.maximum(rows_k, 1)).tolist(),
        "rows_by_scenario": rows_k.tolist(),
        "popularity_top10_by_scenario": by_pop[:, :10].tolist(),
      },
    }
    if es > 0:  # mean standardised planted score of the exposures (0 under popularity alone)
      extra["generator"]["exposure_score_mean"] = zsum / n
    if (lf < 1.0).any():
      extra["generator"]["training_clicks_hidden"] = hidden
    width = len(str(max(U, I) - 1))
    out = store.write_store(
      out_dir,
      scenario_names=[f"s{k}" for k in range(K)],
      user_specs=specs_u,
      item_specs=specs_i,
      users=ucols,
      items=icols,
      user_masks={},
      item_masks={},
      inter=cols,
      user_raw_ids=np.arange(U).astype(f"<U{width}"),
      item_raw_ids=np.arange(I).astype(f"<U{width}"),
      extra_manifest=extra,
    )
    del cols
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  log.info(
    "generated %d synthetic rows (%d users, %d items, %d scenarios) in %.1fs into %s",
    n,
    U,
    I,
    K,
    time.time() - t0,
    out,
  )
  return out
