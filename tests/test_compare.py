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
  # Chosen values of every tuned key, trial counts and the significance test are recorded.
  assert raw["search"] == "grid" and raw["trials"] == {m: 2 for m in MODELS}
  for m in MODELS:
    tag = compare.point_tag(
      {k: tuple(v) if isinstance(v, list) else v for k, v in raw["chosen_values"][m].items()}
    )
    assert tag == raw["chosen"][m]
  sig = raw["significance"]
  assert sig["computed"] and set(sig["groups"]) == set(raw["scenarios"]) | {"overall"}
  assert all(g["n"] == 2 and g["baseline"] != "sass" for g in sig["groups"].values())
  md = (wd / "results" / "tiny.md").read_text()
  assert "## sass vs best baseline" in md and "| sass | 2 | train.learning_rate=" in md


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


# -- tuning budget: random search (pure functions, no training) ----------------------------


def _random_cfg(**compare_overrides):
  cfg = test_config.get_config()
  cfg.compare.search = "random"
  for k, v in compare_overrides.items():
    cfg.compare[k] = v
  return cfg


SEARCHED = ("dssm_mixed", "star", "sass_base", "sass", "sass_user_item")


def test_random_points_are_deterministic_equal_distinct_and_within_the_space():
  cfg = _random_cfg(trials=12)
  pts = compare.tuning_points(cfg, SEARCHED)
  assert pts == compare.tuning_points(copy.deepcopy(cfg), SEARCHED)  # same seed: same draws
  other = copy.deepcopy(cfg)
  other.seed = 7
  assert compare.tuning_points(other, SEARCHED)["dssm_mixed"] != pts["dssm_mixed"]
  shared = dict(cfg.compare.space)
  pre = dict(cfg.compare.pretrain_space)
  for v in SEARCHED:
    assert len(pts[v]) == 12  # the same budget for every model
    tags = [compare.point_tag(p) for p in pts[v]]
    assert len(set(tags)) == 12 and len({json.dumps(p) for p in pts[v]}) == 12  # distinct
    for p in pts[v]:
      json.dumps(p)  # JSON-serialisable
      assert re.fullmatch(r"[A-Za-z0-9._+-]+", compare.point_tag(p))  # directory-safe
      for k, val in p.items():
        assert val in {**shared, **pre}[k], (v, k, val)
    # The shared dimensions are the same draws, in the same order, for every model.
    assert [{k: p[k] for k in shared} for p in pts[v]] == [
      {k: p[k] for k in shared} for p in pts["dssm_mixed"]
    ]
  # Pre-training dimensions only for the variants that pre-train; an ablation keeps its own
  # pre-training pairs (sass_user_item fixes pretrain.pairs).
  for v in ("dssm_mixed", "star", "sass_base"):
    assert all(set(p) == set(shared) for p in pts[v])
  assert all(set(p) == set(shared) | set(pre) for p in pts["sass"])
  assert len({p["pretrain.pairs"] for p in pts["sass"]}) == 2
  assert all(set(p) == set(shared) | set(pre) - {"pretrain.pairs"} for p in pts["sass_user_item"])
  c = compare.run_config(cfg, "sass_user_item", pts["sass_user_item"][0], 0)
  assert c.pretrain.pairs == "user_item"
  # The shared draws are numpy.random.default_rng(config.seed) choices without replacement.
  first = np.random.default_rng(cfg.seed).choice(3 * 4 * 4 * 2, 12, replace=False)[0]
  lr_i, rest = divmod(int(first), 4 * 4 * 2)
  assert pts["star"][0]["train.learning_rate"] == shared["train.learning_rate"][lr_i]


def test_small_space_gives_every_model_all_of_its_points(caplog):
  space = (("train.learning_rate", (1e-3, 3e-3)), ("model.tau", (0.1, 0.2)))
  cfg = _random_cfg(trials=12, space=space)
  with caplog.at_level("INFO", logger="sass_jax"):
    pts = compare.tuning_points(cfg, ("dssm_mixed", "sass"))
  assert [len(pts[v]) for v in ("dssm_mixed", "sass")] == [4, 4]
  assert {(p["train.learning_rate"], p["model.tau"]) for p in pts["dssm_mixed"]} == {
    (a, b) for a in (1e-3, 3e-3) for b in (0.1, 0.2)
  }
  assert "only 4 distinct point(s)" in caplog.text


def test_grid_search_keeps_todays_points_and_tags():
  cfg = test_config.get_config()
  cfg.compare.learning_rates = (1e-3, 3e-3)
  cfg.compare.taus = (0.2,)
  cfg.compare.widths = ((256, 128),)
  assert cfg.compare.search == "grid"
  pts = compare.tuning_points(cfg, ("dssm_mixed", "sass"))
  assert pts["dssm_mixed"] == pts["sass"] == compare.grid_points(cfg)
  assert [compare.point_tag(p) for p in pts["sass"]] == [
    "lr0.001_tau0.2_w256-128",
    "lr0.003_tau0.2_w256-128",
  ]
  tag = compare.point_tag(
    {"train.logq_strength": 1.5, "pretrain.tau": 0.5, "pretrain.num_steps": 600}
    | {"pretrain.pairs": "user_item", "train.weight_decay": 0.01}
  )
  assert tag == "logq1.5_ptau0.5_psteps600_pairsuser_item_train-weight_decay0.01"


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("search", "bayes", "config.compare.search='bayes'"),
    ("trials", 0, "config.compare.trials=0"),
    ("space", (("train.lr", (1e-3,)),), "config.compare.space has 'train.lr'"),
    ("pretrain_space", (("pretrain.taus", (0.1,)),), "config.compare.pretrain_space has"),
    ("space", (("model.tau", ()),), r"config.compare.space\['model.tau'\]"),
  ],
)
def test_bad_search_settings_are_rejected_naming_the_key(key, value, match):
  from sass_jax import config_check

  cfg = _random_cfg()
  cfg.compare[key] = value
  with pytest.raises(ValueError, match=match):
    compare.tuning_points(cfg, ("sass",))
  with pytest.raises(ValueError, match=match):
    config_check.validate(cfg, stages=())


# -- significance and the results file (hand-made results) -----------------------------------

SCEN = ("a", "b")
# recall@50 per model, seed, group (scenario a, scenario b, overall).
R50 = {
  "dssm_mixed": {0: (0.10, 0.30, 0.20), 1: (0.12, 0.28, 0.21), 2: (0.11, 0.27, 0.19)},
  "star": {0: (0.14, 0.20, 0.16), 1: (0.13, 0.22, 0.18), 2: (0.16, 0.21, 0.17)},
  "sass": {0: (0.15, 0.29, 0.22), 1: (0.17, 0.26, 0.22), 2: (0.16, 0.31, 0.25)},
}


def _handmade(seeds=(0, 1, 2)):
  def metrics(vals):
    block = lambda v: {"recall@50": v, "ndcg@50": v / 2, "hitrate@50": v * 2, "auc": 0.5 + v}
    return {
      "split": "test",
      "overall": block(vals[2]),
      "scenarios": {s: block(v) for s, v in zip(SCEN, vals)},
      "baselines": {
        "popularity": {"overall": block(0.05), "scenarios": {s: block(0.05) for s in SCEN}}
      },
    }

  runs = [
    {"model": m, "point": "p", "seed": s, "split": "test", "metrics": metrics(R50[m][s])}
    for m in R50
    for s in seeds
  ]
  res = {
    "name": "hand",
    "scenarios": list(SCEN),
    "seeds": list(seeds),
    "models": list(R50),
    "search": "random",
    "chosen": {m: "p" for m in R50},
    "chosen_values": {
      m: {"train.learning_rate": 0.003, "model.tau": 0.05, "model.widths": (128, 64)} for m in R50
    },
    "trials": {m: 12 for m in R50},
    "select_metric": "recall@50",
    "reference": "sass",
    "tuning": [],
    "runs": runs,
  }
  res["significance"] = compare.significance(res)
  return res


def _by_hand(ref, other, j):
  d = np.array([R50[ref][s][j] - R50[other][s][j] for s in (0, 1, 2)])
  n = len(d)
  t = d.mean() / (d.std(ddof=1) / np.sqrt(n))
  p = 1 - abs(t) / np.sqrt(2 + t * t)  # two-sided p of Student's t with 2 degrees of freedom
  return d.mean(), t, p


def test_significance_matches_a_hand_computation():
  sig = _handmade()["significance"]
  assert sig["computed"] and sig["reference"] == "sass" and sig["metric"] == "recall@50"
  # The best other model by mean: star on a, dssm_mixed on b and overall.
  expected = {"a": "star", "b": "dssm_mixed", "overall": "dssm_mixed"}
  for j, g in enumerate(SCEN + ("overall",)):
    r = sig["groups"][g]
    assert r["baseline"] == expected[g] and r["n"] == 3
    diff, t, p = _by_hand("sass", expected[g], j)
    assert r["difference"] == pytest.approx(diff, abs=1e-12)
    assert r["t"] == pytest.approx(t, rel=1e-9)
    assert r["p"] == pytest.approx(p, rel=1e-9)


def test_markdown_shows_chosen_values_trials_and_p_values():
  res = _handmade()
  md = compare.markdown(res)
  assert "## sass vs best baseline" in md
  for g in SCEN + ("overall",):
    r = res["significance"]["groups"][g]
    row = f"| {g} | {r['baseline']} | {r['difference']:+.4f} | {r['t']:.2f} | "
    assert row + f"{compare._fmt_p(r['p'])} | 3 |" in md
  assert "| sass | 12 | train.learning_rate=0.003, model.tau=0.05, model.widths=(128, 64) |" in md
  json.dumps(res)  # the results JSON holds significance, chosen_values and trials
  one = _handmade(seeds=(0,))
  assert not one["significance"]["computed"]
  assert "not computed (1 seed)" in compare.markdown(one)
