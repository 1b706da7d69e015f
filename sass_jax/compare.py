"""``--mode compare``: every model on the same data, splits and tuning budget, several seeds.

The table a multi-scenario retrieval paper prints (docs/design.md §3)::

    python -m sass_jax.main --mode compare --config configs/movielens.py \
        --workdir runs/compare_movielens --config.compare.seeds=5

For each *variant* in ``config.compare.models`` (a model plus the settings that define it, see
``known_variants()``: every registered model, and the config variants of ``VARIANTS``):

1. **Tuning** (fair: the same grid for every variant): one run per point of the grid
   ``learning_rates x taus x widths`` with seed 0, scored on the *validation* split by overall
   Recall@50 (``config.compare.select_metric``). Grids of one point each skip tuning.
2. **Test**: the chosen point is trained with seeds ``seed .. seed + seeds - 1`` and evaluated
   on the *test* split (the seed-0 tuning run is reused). Test numbers never influence a choice.

Writes ``<results_dir>/<name>.json`` (every run: variant, grid point, seed, split, metrics),
``<name>.md`` (per scenario and overall: model rows x Recall@50 / NDCG@50 / HitRate@50 / AUC
columns, mean +- sample standard deviation (ddof=1) over seeds, best mean per column in bold;
then the tuning table) and ``<name>.png`` (per-scenario Recall@50 bars with std error bars).

Runs live in ``WORKDIR/runs/<variant>/<grid point>/seed<s>``; every run shares the data prepared
once in ``WORKDIR/data`` and is skipped when its metrics already exist, so an interrupted
comparison resumes where it stopped.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sass_jax.config_migrate import migrate
from sass_jax.model import registry
from sass_jax.train import loop

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
}
TABLE_METRICS = ("recall@50", "ndcg@50", "hitrate@50", "auc")


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


def point_tag(point: dict[str, Any]) -> str:
  """A directory-safe name of a grid point, e.g. 'lr0.001_tau0.2_w256-128'."""
  return (
    f"lr{point['train.learning_rate']:g}_tau{point['model.tau']:g}_"
    f"w{'-'.join(str(w) for w in point['model.widths'])}"
  )


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


def _run(cfg, workdir: Path, run_dir: Path, splits: tuple[str, ...]) -> dict[str, dict]:
  """Train one run (resuming / skipping what is done) and evaluate it on ``splits``."""
  run_dir.mkdir(parents=True, exist_ok=True)
  link = run_dir / "data"
  if not link.exists():
    os.symlink(os.path.relpath(workdir / "data", run_dir), link)
  out = {}
  for s in splits:
    f = run_dir / f"compare_{s}.json"
    if f.is_file() and _same_protocol(m := json.loads(f.read_text()), cfg):
      out[s] = m
  todo = [s for s in splits if s not in out]
  if not todo:
    return out
  loop.train(cfg, run_dir, evaluate=False, show_progress=False)
  for s in todo:
    c = copy.deepcopy(cfg)
    c.eval.split = s
    m = loop.evaluate_workdir(c, run_dir)
    tmp = run_dir / f"compare_{s}.json.tmp"
    tmp.write_text(json.dumps(m, indent=1))
    tmp.replace(run_dir / f"compare_{s}.json")
    out[s] = m
  return out


def _same_protocol(metrics: dict, cfg) -> bool:
  """Whether saved metrics were computed as ``cfg.eval`` asks (corpus, mask, every K); metrics
  saved before 'corpus' / 'mask' were recorded used 'all' / 'train'. A mismatch means the run
  is evaluated again (its training is reused)."""
  e = cfg.eval
  ks_saved = {int(m.split("@")[1]) for m in metrics.get("overall", {}) if m.startswith("recall@")}
  return (
    metrics.get("corpus", "all") == e.corpus
    and metrics.get("mask", "train") == e.mask
    and set(map(int, e.ks)) <= ks_saved
  )


def _select_value(metrics: dict, metric: str) -> float:
  v = metrics["overall"].get(metric, float("nan"))
  return float(v) if v == v else -np.inf


def compare(cfg, workdir: str | Path, command: str = "") -> dict:
  """Tune, train and evaluate every variant of ``config.compare``; write the results files.

  command: the command line that ran it, recorded in the results files.
  Returns the raw results dict (also written as ``<results_dir>/<name>.json``).
  Raises ValueError for an unknown variant or fewer than one seed.
  """
  ccfg = cfg.compare
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  variants = list(ccfg.models)
  known = known_variants()
  for v in variants:
    if v not in known:
      raise ValueError(f"config.compare.models has {v!r}; expected names from {sorted(known)}")
  points = grid_points(cfg)
  if int(ccfg.seeds) < 1:
    raise ValueError(f"config.compare.seeds={ccfg.seeds}; need at least 1")
  data = loop.prepare(cfg, workdir)
  name = ccfg.name or data.manifest.get("dataset", cfg.data.name)
  seeds = [int(cfg.seed) + s for s in range(int(ccfg.seeds))]
  runs, tuning, chosen = [], [], {}
  t_all = time.time()
  results: dict = {}
  for v in variants:
    best, best_val = None, -np.inf
    for point in points:
      rd = workdir / "runs" / v / point_tag(point) / f"seed{seeds[0]}"
      splits = ("valid",) if len(points) > 1 else ()
      t = time.time()
      res = _run(run_config(cfg, v, point, seeds[0]), workdir, rd, splits) if splits else {}
      if splits:
        val = _select_value(res["valid"], ccfg.select_metric)
        tuning.append({"model": v, "point": point_tag(point), **point, ccfg.select_metric: val})
        log.info(
          "compare %s %s: valid %s %.4f (%.0fs)",
          v,
          point_tag(point),
          ccfg.select_metric,
          val,
          time.time() - t,
        )
        if val > best_val:
          best, best_val = point, val
    best = best or points[0]
    chosen[v] = point_tag(best)
    for s in seeds:
      rd = workdir / "runs" / v / point_tag(best) / f"seed{s}"
      t = time.time()
      res = _run(run_config(cfg, v, best, s), workdir, rd, ("test",))
      runs.append(
        {"model": v, "point": point_tag(best), "seed": s, "split": "test", "metrics": res["test"]}
      )
      log.info(
        "compare %s seed %d: test overall recall@50 %.4f (%.0fs)",
        v,
        s,
        res["test"]["overall"].get("recall@50", float("nan")),
        time.time() - t,
      )
    # Written after every model, so a long comparison has a partial table to look at.
    results = _results(
      cfg,
      data,
      name,
      seeds,
      variants[: variants.index(v) + 1],
      points,
      chosen,
      tuning,
      runs,
      time.time() - t_all,
    )
    results["command"] = command
    write_results(results, Path(ccfg.results_dir))
  return results


def _results(cfg, data, name, seeds, variants, points, chosen, tuning, runs, wall_s) -> dict:
  return {
    "name": name,
    "dataset": data.manifest.get("dataset", cfg.data.name),
    "scenarios": list(data.scenario_names),
    "seeds": seeds,
    "models": list(variants),
    "grid": [dict(p, tag=point_tag(p)) for p in points],
    "chosen": dict(chosen),
    "select_metric": cfg.compare.select_metric,
    "tuning": list(tuning),
    "runs": list(runs),
    "wall_s": wall_s,
    "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
  }


def summarize_runs(results: dict) -> dict:
  """{model: {scenario or 'overall': {metric: (mean, std, n)}}} over the test runs' seeds,
  plus a 'popularity' row (deterministic, std 0). std is the sample standard deviation
  (ddof=1; 0 for one seed); NaN values (e.g. AUC without negatives) give NaN."""
  groups = results["scenarios"] + ["overall"]
  out: dict[str, dict] = {}
  pop = None
  for model in results["models"]:
    rs = [r["metrics"] for r in results["runs"] if r["model"] == model]
    if not rs:
      continue
    pop = pop or rs[0]["baselines"]["popularity"]
    out[model] = {}
    for g in groups:
      blocks = [m["overall"] if g == "overall" else m["scenarios"][g] for m in rs]
      out[model][g] = {}
      for met in TABLE_METRICS:
        vals = np.array([b.get(met, np.nan) for b in blocks], np.float64)
        std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[model][g][met] = (float(np.mean(vals)), std, len(vals))
  if pop is not None:
    out["popularity"] = {
      g: {
        met: (
          float((pop["overall"] if g == "overall" else pop["scenarios"][g]).get(met, np.nan)),
          0.0,
          1,
        )
        for met in TABLE_METRICS
      }
      for g in groups
    }
  return out


def _corpus_sentence(corpus: str) -> str:
  if corpus == "scenario":
    return (
      "Items ranked in each scenario: only that scenario's own items "
      "(`config.eval.corpus='scenario'`), training positives masked."
    )
  return "Items ranked in each scenario: the whole item corpus, training positives masked."


def markdown(results: dict) -> str:
  """The results file's Markdown: one table per scenario and overall, then the tuning grid."""
  summ = summarize_runs(results)
  n = len(results["seeds"])
  lines = [
    f"# {results['name']}: multi-scenario retrieval, test split",
    "",
    f"Mean ± sample std over {n} seed(s) {results['seeds']}; settings chosen per "
    f"model on the validation split by overall {results['select_metric']} "
    "(tuning table below). Best mean per column in **bold**. Popularity: most-clicked "
    "training items of the scenario (no seeds). "
    + _corpus_sentence(migrate(results.get("config", {}))["eval"]["corpus"]),
    "",
  ]
  if results.get("command"):
    lines += ["Made by:", "", "```bash", results["command"], "```", ""]
  models = list(summ)
  for g in results["scenarios"] + ["overall"]:
    lines += [
      f"## {g}",
      "",
      "| model | " + " | ".join(TABLE_METRICS) + " |",
      "|---|" + "---|" * len(TABLE_METRICS),
    ]
    best = {}
    for met in TABLE_METRICS:
      means = [summ[m][g][met][0] for m in models if summ[m][g][met][0] == summ[m][g][met][0]]
      best[met] = max(means) if means else None
    for m in models:
      cells = []
      for met in TABLE_METRICS:
        mean, std, k = summ[m][g][met]
        if mean != mean:
          cells.append("n/a")
          continue
        s = f"{mean:.4f}" + (f" ± {std:.4f}" if m != "popularity" else "")
        cells.append(f"**{s}**" if best[met] is not None and mean == best[met] else s)
      lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
  if results["tuning"]:
    lines += [
      "## Tuning (validation split, seed 0)",
      "",
      f"| model | setting | valid {results['select_metric']} | chosen |",
      "|---|---|---|---|",
    ]
    for t in results["tuning"]:
      mark = "yes" if results["chosen"].get(t["model"]) == t["point"] else ""
      lines.append(f"| {t['model']} | {t['point']} | {t[results['select_metric']]:.4f} | {mark} |")
    lines.append("")
  else:
    lines += [
      "No tuning grid (one setting per model): "
      + ", ".join(f"{m}: {p}" for m, p in results["chosen"].items()),
      "",
    ]
  return "\n".join(lines)


def write_results(results: dict, results_dir: Path) -> None:
  """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``results_dir``."""
  results_dir.mkdir(parents=True, exist_ok=True)
  base = results_dir / results["name"]
  tmp = base.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(results, indent=1))
  tmp.replace(base.with_suffix(".json"))
  base.with_suffix(".md").write_text(markdown(results))
  try:
    from sass_jax import plots
  except ImportError:  # matplotlib missing: the table and JSON are still written
    log.warning("matplotlib not available; %s.png not written", base)
    return
  summ = summarize_runs(results)
  groups = results["scenarios"] + ["overall"]
  series = {
    m: ([summ[m][g]["recall@50"][0] for g in groups], [summ[m][g]["recall@50"][1] for g in groups])
    for m in summ
  }
  plots.bar_chart_with_errors(
    str(base.with_suffix(".png")),
    groups,
    series,
    f"{results['name']}: test Recall@50 (mean ± std over {len(results['seeds'])} seeds)",
    "Recall@50",
  )
