"""--mode compare on the tiny config: every model and seed in the table, means and stds right."""

import copy
import json
import re

import numpy as np
import pytest

from configs import test as test_config
from sass_jax import compare

MODELS = ("dssm_mixed", "sass_base", "sass")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  wd = tmp_path_factory.mktemp("compare")
  cfg = test_config.get_config()
  cfg.pretrain.num_steps = 5
  cfg.train.num_steps = 10
  cfg.checkpoint.every_steps = 10
  cfg.compare.models = MODELS
  cfg.compare.seeds = 2
  cfg.compare.learning_rates = (1e-3, 3e-3)  # two grid points: tuning on valid
  cfg.compare.taus = ()
  cfg.compare.results_dir = str(wd / "results")
  cfg.compare.name = "tiny"
  return cfg, wd, compare.compare(cfg, wd / "work")


def test_every_model_and_seed_is_run_on_test(compared):
  cfg, wd, res = compared
  raw = json.loads((wd / "results" / "tiny.json").read_text())
  assert raw["models"] == list(MODELS) and raw["seeds"] == [0, 1]
  got = sorted((r["model"], r["seed"]) for r in raw["runs"])
  assert got == sorted((m, s) for m in MODELS for s in (0, 1))
  assert all(r["split"] == "test" and r["metrics"]["split"] == "test" for r in raw["runs"])
  # Tuning: every model saw the same two grid points on the validation split.
  assert sorted((t["model"], t["point"]) for t in raw["tuning"]) == sorted(
    (m, p["tag"]) for m in MODELS for p in raw["grid"]
  )
  for m in MODELS:
    vals = {t["point"]: t["recall@50"] for t in raw["tuning"] if t["model"] == m}
    assert raw["chosen"][m] == max(vals, key=vals.get)
    assert all(r["point"] == raw["chosen"][m] for r in raw["runs"] if r["model"] == m)
  # Seeds differ, so the runs are not copies of each other.
  r = {(x["model"], x["seed"]): x["metrics"]["overall"]["recall@50"] for x in raw["runs"]}
  assert any(r[(m, 0)] != r[(m, 1)] for m in MODELS)
  assert (wd / "results" / "tiny.md").is_file()


def test_table_means_and_stds_recomputed_from_raw_json(compared):
  cfg, wd, res = compared
  raw = json.loads((wd / "results" / "tiny.json").read_text())
  md = (wd / "results" / "tiny.md").read_text()
  sections = {s.split("\n", 1)[0].strip(): s for s in md.split("\n## ")[1:]}
  for g in raw["scenarios"] + ["overall"]:
    rows = {
      line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
      for line in sections[g].splitlines()
      if line.startswith("| ") and "---" not in line and not line.startswith("| model")
    }
    assert set(rows) == set(MODELS) | {"popularity"}
    best = {}
    for m in MODELS:
      blocks = [
        x["metrics"]["overall"] if g == "overall" else x["metrics"]["scenarios"][g]
        for x in raw["runs"]
        if x["model"] == m
      ]
      for j, met in enumerate(compare.TABLE_METRICS):
        vals = np.array([b[met] for b in blocks])
        cell = rows[m][j].strip("*")
        mean_s, std_s = cell.split(" ± ")
        assert float(mean_s) == pytest.approx(round(vals.mean(), 4), abs=1e-4)
        assert float(std_s) == pytest.approx(round(vals.std(ddof=1), 4), abs=1e-4)
        best.setdefault(met, []).append((round(vals.mean(), 4), m))
    # The bold cell of each column is the best mean (popularity included).
    for j, met in enumerate(compare.TABLE_METRICS):
      bold = [m for m in rows if rows[m][j].startswith("**")]
      vals = {m: float(re.sub(r"[*]", "", rows[m][j]).split(" ± ")[0]) for m in rows}
      assert bold and all(vals[b] == max(vals.values()) for b in bold)


def test_rerun_skips_finished_runs(compared):
  cfg, wd, res = compared
  again = compare.compare(cfg, wd / "work")
  assert again["runs"] == json.loads(json.dumps(res["runs"]))
  assert again["wall_s"] < res["wall_s"]


def test_changed_eval_protocol_reevaluates_without_retraining(compared):
  cfg, wd, res = compared
  logs = {p: p.read_text() for p in (wd / "work").rglob("finetune_log.jsonl")}
  c = copy.deepcopy(cfg)
  c.eval.corpus = "scenario"
  c.compare.name = "tiny_scenario"
  again = compare.compare(c, wd / "work")
  assert {r["metrics"]["corpus"] for r in again["runs"]} == {"scenario"}
  assert {r["metrics"]["corpus"] for r in res["runs"]} == {"all"}
  assert {p: p.read_text() for p in logs} == logs  # no training step was run again
  assert "only that scenario's own items" in (wd / "results" / "tiny_scenario.md").read_text()


def test_unknown_variant_is_rejected(tmp_path):
  cfg = test_config.get_config()
  cfg.compare.models = ("sass", "deepfm")
  with pytest.raises(ValueError, match="config.compare.models has 'deepfm'"):
    compare.compare(cfg, tmp_path)
