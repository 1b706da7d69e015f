"""PNG figures of a run (docs/design.md §5, "a PNG plot"): training curves and per-scenario metrics.

:func:`write_run_plots` (called at the end of ``loop.evaluate_workdir`` on process 0) writes

- ``WORKDIR/plots/training_curves.png``: loss and gradient norm against the step, one row per
  stage, from ``WORKDIR/<stage>_log.jsonl``;
- ``WORKDIR/plots/scenario_metrics.png``: Recall@K, NDCG@K, HitRate@K (K = 50 when evaluated)
  per scenario and overall, the model beside the popularity baseline, from ``metrics.json``.

:func:`bar_chart_with_errors` is the generic grouped bar chart (mean +- std per series), also
for figures that compare several models. Figures are drawn on matplotlib's Agg canvas without
pyplot, so no global backend is switched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from sass_jax.train.stages import STAGES

log = logging.getLogger("sass_jax")
RETRIEVAL = ("recall", "ndcg", "hitrate")


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path


def _grouped_bars(ax, groups: Sequence[str], series: Mapping[str, tuple], legend: bool = True):
  """Draw one bar per (group, series) on ``ax``; series maps name -> (means [G], stds [G] or
  None). Raises ValueError if a series does not have len(groups) values."""
  n = max(1, len(series))
  width = 0.8 / n
  x = np.arange(len(groups), dtype=np.float64)
  for j, (name, (means, stds)) in enumerate(series.items()):
    means = np.asarray(means, np.float64)
    if means.shape != (len(groups),):
      raise ValueError(
        f"series {name!r}: {means.shape[0] if means.ndim else 0} values for {len(groups)} groups"
      )
    err = None
    if stds is not None:
      err = np.asarray(stds, np.float64)
      if err.shape != means.shape:
        raise ValueError(f"series {name!r}: stds shape {err.shape}, expected {means.shape}")
      err = np.nan_to_num(err)
    ax.bar(
      x + (j - (n - 1) / 2) * width, np.nan_to_num(means), width, yerr=err, capsize=3, label=name
    )
  ax.set_xticks(x)
  ax.set_xticklabels(
    groups,
    rotation=20 if max(map(len, groups), default=0) > 10 else 0,
    ha="right" if max(map(len, groups), default=0) > 10 else "center",
  )
  ax.grid(axis="y", alpha=0.3)
  if legend:
    ax.legend(fontsize="small")


def bar_chart_with_errors(
  path: str | Path, groups: list[str], series: dict[str, tuple], title: str, ylabel: str
) -> Path:
  """Grouped bar chart as PNG: one group per entry of ``groups``, one bar per series.

  ``series``: name -> (means float [G], stds float [G] or None); std bars are drawn when
  given (NaN means are drawn as 0). Returns the path written. Raises ValueError if a series'
  length differs from ``len(groups)``.
  """
  fig = _figure(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 4.5)
  ax = fig.add_subplot()
  _grouped_bars(ax, groups, series)
  ax.set_title(title)
  ax.set_ylabel(ylabel)
  return _save(fig, path)


def read_log(path: str | Path) -> list[dict]:
  """Records of a ``<stage>_log.jsonl`` sorted by step; of repeated steps (a stage re-run into
  the same workdir) the last record is kept. Missing file -> []."""
  path = Path(path)
  if not path.is_file():
    return []
  by_step = {}
  for line in path.read_text().splitlines():
    if line.strip():
      rec = json.loads(line)
      by_step[int(rec["step"])] = rec
  return [by_step[s] for s in sorted(by_step)]


def training_curves(workdir: str | Path, path: str | Path | None = None) -> Path | None:
  """Loss and gradient norm per logged step, one row per stage that has a log.

  Writes ``path`` (default ``WORKDIR/plots/training_curves.png``) and returns it, or returns
  None when no ``<stage>_log.jsonl`` exists.
  """
  workdir = Path(workdir)
  logs = {s: read_log(workdir / f"{s}_log.jsonl") for s in STAGES}
  logs = {s: r for s, r in logs.items() if r}
  if not logs:
    return None
  fig = _figure(10, 3.2 * len(logs))
  axes = fig.subplots(len(logs), 2, squeeze=False)
  for row, (stage, recs) in enumerate(logs.items()):
    steps = [r["step"] for r in recs]
    for col, key in enumerate(("loss", "grad_norm")):
      ax = axes[row, col]
      ax.plot(steps, [r.get(key, np.nan) for r in recs], marker="." if len(recs) < 30 else None)
      ax.set_title(f"{stage}: {key.replace('_', ' ')}")
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
  return _save(fig, path or workdir / "plots" / "training_curves.png")


def _metric_k(metrics: dict, k: int) -> int:
  keys = [key for block in metrics.get("scenarios", {}).values() for key in block]
  ks = sorted({int(key.split("@")[1]) for key in keys if key.startswith("recall@")})
  return k if k in ks or not ks else ks[-1]


def scenario_metrics(metrics: dict, path: str | Path, k: int = 50) -> Path:
  """Recall@K, NDCG@K and HitRate@K per scenario and overall, model vs popularity.

  ``metrics`` is the dict of metrics.json; K is ``k`` if evaluated, else the largest K there.
  Missing values (a scenario with no test users) are drawn as 0. Returns ``path``.
  """
  k = _metric_k(metrics, k)
  blocks = dict(metrics["scenarios"])
  blocks["overall"] = metrics["overall"]
  pop = metrics.get("baselines", {}).get("popularity")
  pop_blocks = {**pop["scenarios"], "overall": pop["overall"]} if pop else None
  groups = list(blocks)
  model = metrics.get("model", "model")
  fig = _figure(max(10.0, 1.1 * len(groups) * 3), 4.2)
  axes = fig.subplots(1, len(RETRIEVAL), squeeze=False)[0]
  for j, (ax, m) in enumerate(zip(axes, RETRIEVAL)):
    key = f"{m}@{k}"
    series = {model: ([blocks[g].get(key, np.nan) for g in groups], None)}
    if pop_blocks is not None:
      series["popularity"] = ([pop_blocks.get(g, {}).get(key, np.nan) for g in groups], None)
    _grouped_bars(ax, groups, series, legend=j == 0)
    ax.set_title(key)
  fig.suptitle(f"{model} on {metrics.get('dataset', '?')} ({metrics.get('split', '?')} split)")
  return _save(fig, path)


def write_run_plots(workdir: str | Path, metrics: dict | None = None) -> list[Path]:
  """Write ``WORKDIR/plots/{training_curves,scenario_metrics}.png``; returns the paths written.

  ``metrics`` defaults to ``WORKDIR/metrics.json`` (skipped, with a log line, if absent); the
  training curves are skipped when the workdir has no stage log.
  """
  workdir = Path(workdir)
  out = []
  curves = training_curves(workdir)
  if curves is None:
    log.info("no <stage>_log.jsonl in %s; training_curves.png not written", workdir)
  else:
    out.append(curves)
  if metrics is None and (workdir / "metrics.json").is_file():
    metrics = json.loads((workdir / "metrics.json").read_text())
  if metrics is None:
    log.info("no metrics.json in %s; scenario_metrics.png not written", workdir)
  else:
    out.append(scenario_metrics(metrics, workdir / "plots" / "scenario_metrics.png"))
  log.info("plots written: %s", ", ".join(map(str, out)) or "none")
  return out
