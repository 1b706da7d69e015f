"""The tuning points of ``--mode compare`` (sass_jax/compare.py), without the training loop.

Variants (a model plus the config overrides that define it), the run config of a variant at a
point, and the two searches of ``config.compare.search``:

- ``'grid'``: ``compare.learning_rates x taus x widths`` (``grid_points``), the same for every
  variant;
- ``'random'``: ``compare.trials`` distinct points of ``compare.space`` (and, for a variant that
  pre-trains, ``compare.pretrain_space``) drawn with ``numpy.random.default_rng(config.seed)``
  (the pre-training dimensions with ``config.seed + 1``): the same draws and the same count for
  every variant (``random_points``, ``trial_count``).

``point_tag`` names a point's run directory; ``search_problems`` is the config check of these
settings (reported by ``config_check``, raised by ``tuning_points``). Kept apart from
``compare`` so that ``config_check`` can import it without the training loop.
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
from typing import Any

import numpy as np

from sass_jax.model import registry

log = logging.getLogger("sass_jax")

# Config variants beyond the registered models: variant name -> config overrides (dotted path ->
# value). SASS-Base is SASS without pre-training (docs/design.md §2).
VARIANTS: dict[str, dict[str, Any]] = {
  "sass_base": {"model.name": "sass", "pretrain.num_steps": 0},
  # Ablations (docs/design.md §2 and 1): the two readings of the pre-training pairs, and the
  # gates off (plain sum of the global and scenario paths).
  "sass_user_item": {"model.name": "sass", "pretrain.pairs": "user_item"},
  "sass_scenario_views": {"model.name": "sass", "pretrain.pairs": "scenario_views"},
  "sass_no_gates": {"model.name": "sass", "model.gate_style": "none"},
  "sass_base_no_gates": {"model.name": "sass", "pretrain.num_steps": 0, "model.gate_style": "none"},
  # Scenario-agnostic item vectors (one per item, scenario 0's path; sass_jax/claims.py, c),
  # user vectors, or both (the Amazon cold-start study, RESULTS.md).
  "sass_agnostic_items": {"model.name": "sass", "model.item_scenario": "agnostic"},
  "sass_agnostic_users": {"model.name": "sass", "model.user_scenario": "agnostic"},
  "sass_agnostic_both": {
    "model.name": "sass",
    "model.user_scenario": "agnostic",
    "model.item_scenario": "agnostic",
  },
}


def known_variants() -> dict[str, dict[str, Any]]:
  """Every variant ``config.compare.models`` may name -> its config overrides: each registered
  model under its own name (with ``pretrain.num_steps = 0`` unless its entry ``pretrains``:
  the baselines have no pre-training stage, docs/design.md §3; 'sass' runs the config's
  pre-training settings), then ``VARIANTS``."""
  out = {
    name: {"model.name": name} if e.pretrains else {"model.name": name, "pretrain.num_steps": 0}
    for name, e in registry.MODELS.items()
  }
  return {**out, **VARIANTS}


def _set(cfg, path: str, value):
  node = cfg
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = (
    type(node[leaf])(value)
    if isinstance(node[leaf], (int, float)) and not isinstance(node[leaf], bool)
    else value
  )


def grid_points(cfg) -> list[dict[str, Any]]:
  """The tuning grid ``compare.learning_rates x taus x widths`` as a list of override dicts;
  an empty axis means the config's own value (``train.learning_rate``, ``model.tau``,
  ``model.widths``)."""
  cc = cfg.compare
  lrs = tuple(cc.learning_rates) or (cfg.train.learning_rate,)
  taus = tuple(cc.taus) or (cfg.model.tau,)
  widths = tuple(cc.widths) or (tuple(cfg.model.widths),)
  return [
    {
      "train.learning_rate": float(lr),
      "model.tau": float(tau),
      "model.widths": tuple(int(w) for w in ws),
    }
    for lr, tau, ws in itertools.product(lrs, taus, widths)
  ]


# Short names of tuned config paths in a point's tag (other paths: the path, '.' -> '-').
TAG_NAMES = {
  "train.learning_rate": "lr",
  "model.tau": "tau",
  "model.widths": "w",
  "train.logq_strength": "logq",
  "pretrain.tau": "ptau",
  "pretrain.num_steps": "psteps",
  "pretrain.pairs": "pairs",
  "model.item_scenario": "items",
}
SEARCHES = ("grid", "random")  # config.compare.search


def _tag_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return "-".join(_tag_value(x) for x in v)
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def point_tag(point: dict[str, Any]) -> str:
  """A directory-safe name of a point, its keys in order: short name (``TAG_NAMES``) + value,
  joined by '_', e.g. 'lr0.001_tau0.2_w256-128' (a grid point, the names runs were always
  saved under) or 'lr0.0003_tau0.1_logq1.5_w128-64_ptau0.5_psteps600_pairsuser_item'."""
  parts = [TAG_NAMES.get(k, k.replace(".", "-")) + _tag_value(v) for k, v in point.items()]
  return re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))


def _space(pairs, name: str) -> list[tuple[str, tuple]]:
  """``((path, choices), ...)`` as a list of (path, tuple of choices); ValueError naming
  ``config.compare.<name>`` when malformed."""
  out = []
  for item in tuple(pairs or ()):
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ValueError(
        f"config.compare.{name} has {item!r}; expected (dotted config path, (choices, ...)) "
        "pairs, e.g. ('model.tau', (0.1, 0.2))"
      )
    path, choices = item
    if not isinstance(choices, (tuple, list)) or not choices:
      raise ValueError(
        f"config.compare.{name}[{path!r}]={choices!r}: expected a non-empty tuple of choices"
      )
    out.append((path, tuple(choices)))
  paths = [p for p, _ in out]
  if len(set(paths)) != len(paths):
    raise ValueError(f"config.compare.{name}: a path appears twice in {paths}")
  return out


def _leaf(cfg, path: str) -> bool:
  node = cfg
  for part in path.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return not hasattr(node, "keys")


def search_problems(cfg) -> list[str]:
  """The problems of ``config.compare``'s search settings, one line each naming the key
  (``config_check`` reports them; ``compare`` raises them)."""
  cc = cfg.compare
  out = []
  if cc.search not in SEARCHES:
    out.append(f"config.compare.search={cc.search!r}: expected one of {SEARCHES}")
  t = cc.trials
  if not (isinstance(t, int) and not isinstance(t, bool) and t >= 1):
    out.append(f"config.compare.trials={t!r}: expected an int >= 1")
  for name in ("space", "pretrain_space"):
    try:
      dims = _space(cc[name], name)
    except ValueError as e:
      out.append(str(e))
      continue
    for path, _ in dims:
      if not _leaf(cfg, path):
        out.append(
          f"config.compare.{name} has {path!r}, which is not a config value; expected a dotted "
          "path such as 'train.learning_rate' or 'model.tau'"
        )
  if cc.search == "random" and not tuple(cc.space or ()) and not tuple(cc.pretrain_space or ()):
    out.append("config.compare.space and pretrain_space are both empty: nothing to search")
  return out


def pretrains(cfg, variant: str) -> bool:
  """Whether ``variant`` runs a pre-training stage (pretrain.num_steps > 0 after its
  overrides)."""
  return int(run_config(cfg, variant, {}, cfg.seed).pretrain.num_steps) > 0


def variant_space(cfg, variant: str) -> tuple[list, list]:
  """(shared dims, pre-training dims) searched for ``variant``: ``config.compare.space`` and,
  when the variant pre-trains, ``pretrain_space``; paths the variant's own overrides fix are
  left out (an ablation keeps what defines it)."""
  fixed = set(known_variants()[variant])
  shared = [(p, c) for p, c in _space(cfg.compare.space, "space") if p not in fixed]
  pre = []
  if pretrains(cfg, variant):
    pre = [(p, c) for p, c in _space(cfg.compare.pretrain_space, "pretrain_space")]
    pre = [(p, c) for p, c in pre if p not in fixed]
  return shared, pre


def _size(dims) -> int:
  return int(np.prod([len(c) for _, c in dims], dtype=object)) if dims else 1


def _decode(dims, index: int) -> dict[str, Any]:
  """The point of the product of ``dims`` at mixed-radix ``index`` (last dim fastest)."""
  out = {}
  for path, choices in reversed(dims):
    index, r = divmod(int(index), len(choices))
    out[path] = _plain(choices[r])
  return dict(reversed(list(out.items())))


def _plain(v):
  """A JSON-serialisable Python value (tuples stay tuples: run configs set them)."""
  if isinstance(v, (tuple, list)):
    return tuple(_plain(x) for x in v)
  if isinstance(v, np.generic):
    return v.item()
  return v


def _draw(rng, dims, n: int) -> list[dict[str, Any]]:
  """``n`` distinct points of the product of ``dims`` (n <= its size), uniformly at random."""
  size = _size(dims)
  if size <= 2**62:
    idx = rng.choice(size, size=n, replace=False)
  else:  # beyond int64: rejection sampling of random mixed-radix indices
    seen, idx = set(), []
    while len(idx) < n:
      i = tuple(int(rng.integers(len(c))) for _, c in dims)
      if i not in seen:
        seen.add(i)
        idx.append(i)
    return [{p: _plain(c[j]) for (p, c), j in zip(dims, i)} for i in idx]
  return [_decode(dims, i) for i in idx]


def trial_count(cfg, variants) -> int:
  """The number of random-search points every variant gets: ``config.compare.trials``, or
  fewer where a variant's space has fewer distinct points (then every variant gets that
  many, the budget staying equal)."""
  sizes = [_size(sum(variant_space(cfg, v), [])) for v in variants]
  return int(min([int(cfg.compare.trials)] + sizes))


def random_points(cfg, variant: str, n: int | None = None) -> list[dict[str, Any]]:
  """``n`` (default ``trial_count(cfg, [variant])``) distinct points of ``variant``'s space.

  The shared dimensions are drawn with ``numpy.random.default_rng(config.seed)``, so every
  variant with the same space gets the same points in the same order; a pre-training variant's
  pre-training dimensions come from ``default_rng(config.seed + 1)``, one draw per point
  (without repetition while the pre-training space lasts, then cycling through it again)."""
  shared, pre = variant_space(cfg, variant)
  n = trial_count(cfg, [variant]) if n is None else int(n)
  if n > _size(shared + pre):
    raise ValueError(f"{variant}: {n} points asked from a space of {_size(shared + pre)}")
  seed = int(cfg.seed)
  if n <= _size(shared):
    points = _draw(np.random.default_rng(seed), shared, n)
    if pre:
      rng = np.random.default_rng(seed + 1)
      reps = -(-n // _size(pre))
      extra = [q for _ in range(reps) for q in _draw(rng, pre, _size(pre) if reps > 1 else n)]
      points = [{**p, **q} for p, q in zip(points, extra[:n])]
    return points
  # The shared space alone has fewer than n points: draw from the whole product.
  return _draw(np.random.default_rng(seed), shared + pre, n)


def tuning_points(cfg, variants) -> dict[str, list[dict[str, Any]]]:
  """{variant: its tuning points}: the grid (the same for all) or the random-search draws
  (the same count for all). Raises ValueError for bad search settings or colliding tags."""
  problems = search_problems(cfg)
  if problems:
    raise ValueError("\n".join(problems))
  if cfg.compare.search == "grid":
    pts = grid_points(cfg)
    out = {v: pts for v in variants}
  else:
    n = trial_count(cfg, variants)
    if n < int(cfg.compare.trials):
      log.info(
        "compare: the search space has only %d distinct point(s) for some model; every model "
        "gets %d trials instead of config.compare.trials=%d",
        n,
        n,
        int(cfg.compare.trials),
      )
    out = {v: random_points(cfg, v, n) for v in variants}
  for v, pts in out.items():
    tags = [point_tag(p) for p in pts]
    if len(set(tags)) != len(tags):
      raise ValueError(f"compare: two tuning points of {v} share a tag: {tags}")
  return out


def run_config(cfg, variant: str, point: dict[str, Any], seed: int):
  """The full config of one run: ``cfg`` with the variant's, the grid point's and the seed's
  values set. Raises ValueError for an unknown variant."""
  known = known_variants()
  if variant not in known:
    raise ValueError(f"config.compare.models has {variant!r}; expected names from {sorted(known)}")
  c = copy.deepcopy(cfg)
  for path, value in {**known[variant], **point}.items():
    _set(c, path, value)
  c.seed = int(seed)
  return c
