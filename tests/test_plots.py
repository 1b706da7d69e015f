"""PNG figures (sass_jax/plots.py) from hand-written stage logs and metrics (no training)."""

import json

import matplotlib.image
import numpy as np
import pytest

from sass_jax import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == PNG_MAGIC
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0  # not a blank canvas


def _metrics(ks=(20, 50, 100), empty_scenario=True):
  def block(scale, users=10):
    return {
      **{
        f"{m}@{k}": scale * (j + 1) / 10 * k / 100
        for j, m in enumerate(plots.RETRIEVAL)
        for k in ks
      },
      "auc": 0.6,
      "num_users": users,
    }

  scen = {"a": block(1.0), "b": block(0.5)}
  if empty_scenario:
    scen["c"] = {"num_users": 0, "num_exposures": 0}  # no test users: no retrieval metrics
  pop = {n: (block(0.8) if "recall@20" in b else dict(b)) for n, b in scen.items()}
  return {
    "model": "sass",
    "dataset": "toy",
    "split": "test",
    "scenarios": scen,
    "overall": block(0.7),
    "baselines": {"popularity": {"scenarios": pop, "overall": block(0.6)}},
  }


def _write_log(path, recs):
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_read_log_keeps_last_record_of_a_repeated_step(tmp_path):
  _write_log(
    tmp_path / "finetune_log.jsonl",
    [
      {"step": 10, "loss": 5.0, "grad_norm": 1.0},
      {"step": 20, "loss": 4.0, "grad_norm": 1.0},
      {"step": 10, "loss": 3.0, "grad_norm": 2.0},
    ],
  )
  recs = plots.read_log(tmp_path / "finetune_log.jsonl")
  assert [(r["step"], r["loss"]) for r in recs] == [(10, 3.0), (20, 4.0)]
  assert plots.read_log(tmp_path / "missing.jsonl") == []


def test_write_run_plots(tmp_path):
  for stage, n in (("pretrain", 5), ("finetune", 8)):
    _write_log(
      tmp_path / f"{stage}_log.jsonl",
      [{"step": 10 * (i + 1), "loss": 6.0 - 0.3 * i, "grad_norm": 2.0 / (i + 1)} for i in range(n)],
    )
  (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
  paths = plots.write_run_plots(tmp_path)
  assert paths == [
    tmp_path / "plots" / "training_curves.png",
    tmp_path / "plots" / "scenario_metrics.png",
  ]
  for p in paths:
    _assert_png(p)


def test_write_run_plots_without_logs_or_metrics(tmp_path):
  assert plots.training_curves(tmp_path) is None
  assert plots.write_run_plots(tmp_path) == []
  # Metrics given directly (as evaluate_workdir does), no stage log: only the metrics figure.
  written = plots.write_run_plots(tmp_path, _metrics())
  assert written == [tmp_path / "plots" / "scenario_metrics.png"]


def test_grouped_bars_draw_the_given_values():
  from matplotlib.figure import Figure

  ax = Figure().add_subplot()
  means_a, stds_a = [0.1, 0.3, np.nan], [0.01, 0.02, 0.03]
  plots._grouped_bars(ax, ["x", "y", "z"], {"A": (means_a, stds_a), "B": ([0.2, 0.4, 0.5], None)})
  bars = [c for c in ax.containers if hasattr(c, "patches")]
  assert len(bars) == 2
  np.testing.assert_allclose([p.get_height() for p in bars[0].patches], [0.1, 0.3, 0.0])
  np.testing.assert_allclose([p.get_height() for p in bars[1].patches], [0.2, 0.4, 0.5])
  # Series sit side by side within each group.
  xa = [p.get_x() for p in bars[0].patches]
  xb = [p.get_x() for p in bars[1].patches]
  assert all(a < b for a, b in zip(xa, xb)) and xb[0] < xa[1]
  # Error bars of A span mean +- std.
  seg = bars[0].errorbar.lines[2][0].get_segments()
  np.testing.assert_allclose([s[1, 1] - s[0, 1] for s in seg], [0.02, 0.04, 0.06])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["A", "B"]


def test_bar_chart_with_errors(tmp_path):
  p = plots.bar_chart_with_errors(
    tmp_path / "sub" / "cmp.png",
    ["s1", "s2", "overall"],
    {
      "sass": ([0.2, 0.1, 0.15], [0.01, 0.02, 0.01]),
      "dssm": ([0.18, 0.09, 0.13], [0.02, 0.01, 0.01]),
    },
    "Recall@50 over 5 seeds",
    "recall@50",
  )
  assert p == tmp_path / "sub" / "cmp.png"
  _assert_png(p)
  with pytest.raises(ValueError, match="'dssm': 2 values for 3 groups"):
    plots.bar_chart_with_errors(
      tmp_path / "bad.png", ["s1", "s2", "overall"], {"dssm": ([0.1, 0.2], None)}, "t", "y"
    )


def test_metric_k_falls_back_to_the_largest_evaluated_k():
  assert plots._metric_k(_metrics(), 50) == 50
  assert plots._metric_k(_metrics(ks=(20, 100)), 50) == 100
  assert plots._metric_k(_metrics(ks=(10,)), 50) == 10
