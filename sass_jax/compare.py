"""``--mode compare``: every model on the same data, splits and tuning budget, several seeds.

The table a multi-scenario retrieval paper prints (docs/design.md §3)::

    python -m sass_jax.main --mode compare --config configs/movielens.py \
        --workdir runs/compare_movielens --config.compare.seeds=5
    # random search, the same 12 trials for every model, 5 test seeds:
    python -m sass_jax.main --mode compare --config configs/movielens.py --workdir runs/cmp \
        --config.compare.search=random --config.compare.trials=12 --config.compare.seeds=5

For each *variant* in ``config.compare.models`` (a model plus the settings that define it, see
``known_variants()``: every registered model, and the config variants of ``VARIANTS``):

1. **Tuning** (fair: the same budget for every variant; the points: ``sass_jax/tuning.py``),
   one run per point with seed 0, scored on the *validation* split by overall Recall@50
   (``config.compare.select_metric``). ``config.compare.search``:

   - ``'grid'`` (default): the grid ``learning_rates x taus x widths``, the same for every
     variant. A grid of one point skips tuning.
   - ``'random'``: ``config.compare.trials`` distinct points of ``config.compare.space``
     (``((dotted config path, (choices, ...)), ...)``, e.g. learning rate, tau, logQ strength,
     widths), drawn with ``numpy.random.default_rng(config.seed)``: the same draws for every
     variant. Variants that pre-train (``pretrain.num_steps > 0`` after their overrides, e.g.
     'sass') also draw the dimensions of ``config.compare.pretrain_space`` (pre-training tau,
     steps, pairs) from ``default_rng(config.seed + 1)``; a path a variant fixes itself (e.g.
     sass_user_item's pairs) is not searched for it. A space with fewer distinct points than
     ``trials`` gives every variant that many (logged).
2. **Test**: the chosen point is trained with seeds ``seed .. seed + seeds - 1`` and evaluated
   on the *test* split (the seed-0 tuning run is reused). Test numbers never influence a choice.
3. **Significance** (``config.compare.reference``, default 'sass', with ``seeds >= 2``): per
   scenario and overall, a paired t-test over seeds (``scipy.stats.ttest_rel``, runs paired by
   seed) of the test ``select_metric`` between the reference and the best *other* model by
   mean: mean difference, t, two-sided p (``significance()``).

Writes ``<results_dir>/<name>.json`` (every run: variant, point, seed, split, metrics; per
variant its tuning ``points``, ``chosen`` tag, ``chosen_values`` of every tuned key and
``trials``; ``significance``), ``<name>.md`` (per scenario and overall: model rows x Recall@50 /
NDCG@50 / HitRate@50 / AUC columns, mean +- sample standard deviation (ddof=1) over seeds, best
mean per column in bold; then the significance table, the chosen values and trial counts, and
the tuning table) and ``<name>.png`` (per-scenario Recall@50 bars with std error bars).

Runs live in ``WORKDIR/runs/<variant>/<point tag>/seed<s>``; every run shares the data prepared
once in ``WORKDIR/data`` and is skipped when its metrics already exist, so an interrupted
comparison resumes where it stopped (grid points keep the tags they always had).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sass_jax.config_migrate import migrate
from sass_jax.train import loop
from sass_jax.tuning import (  # noqa: F401  (re-exported: compare.known_variants() etc.)
  SEARCHES,
  TAG_NAMES,
  VARIANTS,
  grid_points,
  known_variants,
  point_tag,
  pretrains,
  random_points,
  run_config,
  search_problems,
  trial_count,
  tuning_points,
  variant_space,
)

log = logging.getLogger("sass_jax")

TABLE_METRICS = ("recall@50", "ndcg@50", "hitrate@50", "auc")


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
  points = tuning_points(cfg, variants)
  if int(ccfg.seeds) < 1:
    raise ValueError(f"config.compare.seeds={ccfg.seeds}; need at least 1")
  data = loop.prepare(cfg, workdir)
  name = ccfg.name or data.manifest.get("dataset", cfg.data.name)
  seeds = [int(cfg.seed) + s for s in range(int(ccfg.seeds))]
  runs, tuning, chosen, chosen_values = [], [], {}, {}
  t_all = time.time()
  results: dict = {}
  for v in variants:
    best, best_val = None, -np.inf
    for point in points[v]:
      rd = workdir / "runs" / v / point_tag(point) / f"seed{seeds[0]}"
      splits = ("valid",) if len(points[v]) > 1 else ()
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
    best = best or points[v][0]
    chosen[v] = point_tag(best)
    chosen_values[v] = dict(best)
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
      chosen_values,
      tuning,
      runs,
      time.time() - t_all,
    )
    results["command"] = command
    write_results(results, Path(ccfg.results_dir))
  return results


def _results(
  cfg, data, name, seeds, variants, points, chosen, chosen_values, tuning, runs, wall_s
) -> dict:
  out = {
    "name": name,
    "dataset": data.manifest.get("dataset", cfg.data.name),
    "scenarios": list(data.scenario_names),
    "seeds": seeds,
    "models": list(variants),
    "search": cfg.compare.search,
    # Every variant's tuning points (grid: the same list for all; random: the same count).
    "points": {v: [dict(p, tag=point_tag(p)) for p in points[v]] for v in variants},
    "chosen": dict(chosen),
    "chosen_values": {v: dict(chosen_values[v]) for v in chosen_values},
    "trials": {v: len(points[v]) for v in variants},
    "select_metric": cfg.compare.select_metric,
    "reference": cfg.compare.reference,
    "tuning": list(tuning),
    "runs": list(runs),
    "wall_s": wall_s,
    "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
  }
  if cfg.compare.search == "grid":  # the one grid, as results files always had it
    out["grid"] = [dict(p, tag=point_tag(p)) for p in grid_points(cfg)]
  out["significance"] = significance(out)
  return out


def significance(results: dict) -> dict:
  """Paired t-test over seeds of ``results['reference']`` vs the best *other* model by mean.

  For every scenario and overall: the test ``select_metric`` of the reference and of the other
  model (the highest mean; popularity, which has no seeds, is not a candidate) on the seeds both
  ran, paired by seed; ``scipy.stats.ttest_rel`` gives t and the two-sided p. Returns
  ``{'reference', 'metric', 'computed': bool, 'reason' (when not computed), 'groups': {group:
  {'baseline', 'reference_mean', 'baseline_mean', 'difference' (reference - baseline),
  't', 'p', 'n'}}}``.
  """
  ref = results.get("reference", "sass")
  metric = results["select_metric"]
  out: dict[str, Any] = {"reference": ref, "metric": metric, "computed": False, "groups": {}}
  by_model: dict[str, dict[int, dict]] = {}
  for r in results["runs"]:
    by_model.setdefault(r["model"], {})[int(r["seed"])] = r["metrics"]
  others = [m for m in results["models"] if m != ref and m in by_model]
  n_seeds = len(by_model.get(ref, {}))
  if ref not in results["models"] or ref not in by_model:
    out["reason"] = f"not computed (reference {ref!r} not among the models run)"
    return out
  if n_seeds < 2:
    out["reason"] = f"not computed ({n_seeds} seed)"
    return out
  if not others:
    out["reason"] = "not computed (no other model)"
    return out
  from scipy import stats

  def value(metrics, g):
    block = metrics["overall"] if g == "overall" else metrics["scenarios"][g]
    v = block.get(metric, np.nan)
    return float(v) if v is not None else float("nan")

  for g in results["scenarios"] + ["overall"]:
    means = {m: float(np.mean([value(x, g) for x in by_model[m].values()])) for m in others}
    finite = {m: x for m, x in means.items() if x == x}
    if not finite:
      continue
    base = max(finite, key=finite.get)
    seeds = sorted(set(by_model[ref]) & set(by_model[base]))
    a = np.array([value(by_model[ref][s], g) for s in seeds], np.float64)
    b = np.array([value(by_model[base][s], g) for s in seeds], np.float64)
    if len(seeds) >= 2:
      res = stats.ttest_rel(a, b)
      t, p = float(res.statistic), float(res.pvalue)
    else:
      t = p = float("nan")
    out["groups"][g] = {
      "baseline": base,
      "reference_mean": float(a.mean()) if len(a) else float("nan"),
      "baseline_mean": float(b.mean()) if len(b) else float("nan"),
      "difference": float((a - b).mean()) if len(a) else float("nan"),
      "t": t,
      "p": p,
      "n": len(seeds),
    }
  out["computed"] = True
  return out


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
  lines += _significance_lines(results)
  lines += _chosen_lines(results)
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
  return "\n".join(lines)


def _fmt_value(v) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ", ".join(_fmt_value(x) for x in v) + ")"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def _chosen_lines(results: dict) -> list[str]:
  """The chosen values of every tuned key and the trial count per model."""
  # Results files written before chosen_values was recorded: the chosen point's tag.
  chosen_values = results.get("chosen_values") or {
    m: {"setting": tag} for m, tag in results.get("chosen", {}).items()
  }
  if not chosen_values:
    return []
  trials = results.get("trials") or {}
  search = results.get("search", "grid")
  lines = [
    f"## Chosen settings ({search} search, validation split)",
    "",
    "Trials: tuning runs per model (1 = a single setting, not tuned).",
    "",
    "| model | trials | chosen values |",
    "|---|---|---|",
  ]
  for m, vals in chosen_values.items():
    cell = ", ".join(f"{k}={_fmt_value(v)}" for k, v in vals.items()) or "(config's own)"
    lines.append(f"| {m} | {trials.get(m, '')} | {cell} |")
  lines.append("")
  return lines


def _fmt_p(p: float) -> str:
  if p != p:
    return "n/a"
  return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _significance_lines(results: dict) -> list[str]:
  sig = results.get("significance") or significance(results)
  ref, metric = sig["reference"], sig["metric"]
  lines = [f"## {ref} vs best baseline: paired t-test over seeds", ""]
  if not sig["computed"]:
    return lines + [f"Test {metric}: {sig['reason']}.", ""]
  lines += [
    f"Test {metric}, difference = {ref} − the best other model by mean (per row), runs "
    "paired by seed; `scipy.stats.ttest_rel`, two-sided p.",
    "",
    "| scenario | best baseline | difference | t | p | n seeds |",
    "|---|---|---|---|---|---|",
  ]
  for g, r in sig["groups"].items():
    t = "n/a" if r["t"] != r["t"] else f"{r['t']:.2f}"
    lines.append(
      f"| {g} | {r['baseline']} | {r['difference']:+.4f} | {t} | {_fmt_p(r['p'])} | {r['n']} |"
    )
  lines.append("")
  return lines


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
