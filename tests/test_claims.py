"""SASS's claims on planted synthetic data (sass_jax/claims.py) and the generator knobs they use."""

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from sass_jax import claims, tuning
from sass_jax.data import synthetic
from sass_jax.train import loop

SMALL = dict(num_rows=5000, num_users=300, num_items=200, chunk_rows=2048, seed=3)


def _digest(out: Path) -> str:
  h = hashlib.sha256()
  for p in sorted(Path(out).rglob("*.npy")):
    h.update(p.name.encode())
    h.update(np.load(p).tobytes())
  return h.hexdigest()


def _inter(out: Path) -> dict:
  return {
    c: np.load(Path(out) / "interactions" / f"{c}.npy")
    for c in ("user", "item", "scenario", "label", "split")
  }


def test_default_knobs_leave_the_data_unchanged(tmp_path):
  """Every column (interactions, users, items) of a default data set has the bytes the generator
  wrote before the claims knobs existed (digest taken then), and so has the manifest's options."""
  out = synthetic.prepare(SMALL, tmp_path / "a")
  assert _digest(out) == "3a19a886bb50c47de1a65c3b5852129fac6e8c9f58a0bb13e65bd9c9bbc142e8"
  explicit = dict(
    SMALL,
    scenario_weights=None,
    item_scenario_strength=None,
    scenario_strength_scale=None,
    exposure_signal=0.0,
    label_fraction=1.0,
  )
  out2 = synthetic.prepare(explicit, tmp_path / "b")
  assert _digest(out2) == _digest(out)
  gen = json.loads((Path(out) / "manifest.json").read_text())["generator"]
  assert not set(synthetic.KNOB_DEFAULTS) & set(gen["resolved_options"])


@pytest.mark.parametrize(
  "key,value",
  [
    ("scenario_weights", (1.0, 2.0)),
    ("scenario_weights", (1.0, 0.0, 1.0)),
    ("scenario_weights", "abc"),
    ("item_scenario_strength", -1.0),
    ("scenario_strength_scale", (1.0, 1.0)),
    ("scenario_strength_scale", (1.0, -1.0, 1.0)),
    ("scenario_strength_scale", "abc"),
    ("exposure_signal", -0.5),
    ("exposure_signal", float("nan")),
    ("exposure_candidates", 1),
    ("label_fraction", 0.0),
    ("label_fraction", 1.5),
    ("label_fraction", (0.5, 1.0)),
  ],
)
def test_knob_validation_names_the_key(tmp_path, key, value):
  with pytest.raises(ValueError, match=rf"^config\.data\.{key}=") as e:
    synthetic.prepare(dict(SMALL, **{key: value}), tmp_path / "x")
  assert "\n" not in str(e.value)


def test_knobs_change_what_they_say(tmp_path):
  base = _inter(synthetic.prepare(SMALL, tmp_path / "base"))
  # scenario_weights: the row share follows the weights
  w = _inter(synthetic.prepare(dict(SMALL, scenario_weights=(0.1, 1.0, 1.0)), tmp_path / "w"))
  share = np.bincount(w["scenario"], minlength=3) / len(w["scenario"])
  share0 = np.bincount(base["scenario"], minlength=3) / len(base["scenario"])
  assert share[0] < 0.5 * share0[0]
  # label_fraction: only training clicks are hidden (here in s0 only), other rows untouched
  h = _inter(synthetic.prepare(dict(SMALL, label_fraction=(0.2, 1.0, 1.0)), tmp_path / "h"))
  for c in ("user", "item", "scenario", "split"):
    np.testing.assert_array_equal(h[c], base[c])
  changed = h["label"] != base["label"]
  assert changed.any() and (base["label"][changed] == 1).all()
  assert (base["split"][changed] == 0).all() and (base["scenario"][changed] == 0).all()
  kept = h["label"][(base["split"] == 0) & (base["scenario"] == 0) & (base["label"] == 1)].mean()
  assert 0.05 < kept < 0.4
  # exposure_signal: the exposed item depends on the user (the click rate target still holds)
  e = synthetic.prepare(dict(SMALL, exposure_signal=2.0), tmp_path / "e")
  ei = _inter(e)
  assert (ei["item"] != base["item"]).mean() > 0.5
  assert abs(ei["label"].mean() - 0.1) < 0.03
  gen = json.loads((Path(e) / "manifest.json").read_text())["generator"]
  assert gen["resolved_options"]["exposure_signal"] == 2.0


def test_scenario_strength_scale_makes_a_scenario_share_the_global_preference(tmp_path):
  """scenario_strength_scale 0 for s0: a user's preference in s0 is the shared <a_u, b_i> (its
  planted click model has no scenario part); the other scenarios and the random stream keep
  theirs, so the same users, scenarios and exposures are drawn."""
  base = synthetic.prepare(SMALL, tmp_path / "base")
  out = synthetic.prepare(dict(SMALL, scenario_strength_scale=(0.0, 1.0, 1.0)), tmp_path / "s")
  b, s = _inter(base), _inter(out)
  np.testing.assert_array_equal(s["user"], b["user"])
  np.testing.assert_array_equal(s["scenario"], b["scenario"])
  k0 = b["scenario"] == 0
  # popularity exposure does not depend on the preference: the items agree too
  np.testing.assert_array_equal(s["item"], b["item"])
  # labels differ in s0 (another click model) far more than elsewhere (there only through the
  # click-rate offset beta, fitted on a pilot of all scenarios)
  assert (s["label"][k0] != b["label"][k0]).mean() > 2 * (s["label"][~k0] != b["label"][~k0]).mean()
  gen = json.loads((Path(out) / "manifest.json").read_text())["generator"]
  assert gen["resolved_options"]["scenario_strength_scale"] == [0.0, 1.0, 1.0]


def test_exposure_signal_puts_preference_into_exposures(tmp_path):
  """With exposure_signal the exposed items score higher under the planted preference than
  under popularity alone (mean standardised score 0), more so for a larger signal."""
  means = []
  for es in (1.0, 2.0):
    out = synthetic.prepare(dict(SMALL, exposure_signal=es), tmp_path / f"e{es}")
    means.append(
      json.loads((Path(out) / "manifest.json").read_text())["generator"]["exposure_score_mean"]
    )
  assert 0.5 < means[0] < means[1], means


def _small_model(cfg, tmp_path):
  """(data, model, example features, initialised params) of ``cfg`` on 5,000 planted rows."""
  cfg.data.num_rows = 5000
  data = loop.prepare(cfg, tmp_path)
  model = loop.build_model(cfg, data)
  feats = loop.example_batch(data)
  params = model.init(jax.random.key(0), feats["user"], feats["item"], feats["scenario"])
  return data, model, feats, params


def test_agnostic_item_tower_has_one_vector_for_all_scenarios(tmp_path):
  claim = claims.CLAIMS["c"]
  cfg = claims.run_config(claim, claim.settings[0], claim.variants[1], 0, "small")
  assert cfg.model.item_scenario == "agnostic" and cfg.pretrain.num_steps == 0
  data, model, feats, params = _small_model(cfg, tmp_path)
  v = np.asarray(model.apply(params, feats["item"], None, method="encode_item"))  # [B, K, D]
  assert v.shape == (2, data.num_scenarios, cfg.model.out_dim)
  for k in range(1, data.num_scenarios):
    np.testing.assert_array_equal(v[:, k], v[:, 0])
  for k in range(data.num_scenarios):  # the per-row layout agrees with the all-scenarios one
    sel = np.asarray(
      model.apply(params, feats["item"], np.full(2, k, np.int32), method="encode_item")
    )
    np.testing.assert_allclose(sel, v[:, k], rtol=1e-5, atol=1e-6)
  views = np.asarray(
    model.apply(params, feats["item"], np.array([[0, 2], [1, 0]], np.int32), method="encode_item")
  )
  np.testing.assert_allclose(views, v[:, :2], rtol=1e-5, atol=1e-6)
  # the specific tower (default) differs across scenarios
  spec = claims.run_config(claim, claim.settings[0], claim.variants[0], 0, "small")
  m2 = loop.build_model(spec, data)
  v2 = np.asarray(m2.apply(params, feats["item"], None, method="encode_item"))
  assert not np.allclose(v2[:, 0], v2[:, 1])


def test_agnostic_user_tower_has_one_vector_for_all_scenarios(tmp_path):
  """model.user_scenario='agnostic' (the Amazon cold-start study): one user vector in every
  layout, items still scenario-specific; a bad value is one line naming the key."""
  claim = claims.CLAIMS["c"]
  cfg = claims.run_config(claim, claim.settings[0], claim.variants[0], 0, "small")
  cfg.model.user_scenario = "agnostic"
  data, model, feats, params = _small_model(cfg, tmp_path)
  u = np.asarray(model.apply(params, feats["user"], None, method="encode_user"))  # [B, K, D]
  for k in range(data.num_scenarios):
    np.testing.assert_array_equal(u[:, k], u[:, 0])
    sel = np.asarray(
      model.apply(params, feats["user"], np.full(2, k, np.int32), method="encode_user")
    )
    np.testing.assert_allclose(sel, u[:, k], rtol=1e-5, atol=1e-6)
  i = np.asarray(model.apply(params, feats["item"], None, method="encode_item"))
  assert not np.allclose(i[:, 0], i[:, 1])
  assert tuning.VARIANTS["sass_agnostic_both"]["model.user_scenario"] == "agnostic"
  from sass_jax.model.towers import SASS

  cfg.model.user_scenario = "never"
  (msg,) = SASS.config_problems(cfg.model)
  assert msg.startswith("config.model.user_scenario='never': expected one of")


def test_item_scenario_is_checked_and_a_variant():
  assert tuning.VARIANTS["sass_agnostic_items"]["model.item_scenario"] == "agnostic"
  from sass_jax.model.towers import SASS

  cfg = claims.base_config("small")
  cfg.model.item_scenario = "sometimes"
  (msg,) = SASS.config_problems(cfg.model)
  assert msg.startswith("config.model.item_scenario='sometimes': expected one of")


# ---- the claims, trained (size 'small', 2 seeds, shared across assertions) ------------------
# Margins and tolerances come from the paired differences measured at size 'small' over seeds
# 0 and 1 (and results/claims.md at size 'full', 5 seeds); only effects that held there with
# room are asserted. Not asserted (not held, or not with a margin, at both sizes;
# results/claims.md has the full-size numbers): claim (a) at all (gates on minus off in s0,
# full size, 10 seeds: -0.0003 +- 0.0223; five other settings within noise too:
# results/claim_a_gates.md), the smaller gain of (c) at out_dim 16.
# Claim c's settings pin their own data size and steps, so its small runs are the full ones.

RUN = {"b": ("labels_0.05", "labels_1"), "c": ("items_own_narrow", "control_items_same")}


@pytest.fixture(scope="module")
def claim_results(tmp_path_factory):
  wd = tmp_path_factory.mktemp("claims")
  return {
    k: claims.run_claims(wd, (k,), seeds=2, size="small", only=only)["claims"][k]
    for k, only in RUN.items()
  }


def _setting(res, name):
  return next(s for s in res["settings"] if s["setting"] == name)


def _paired(setting, a, b):
  sc = setting["scenario"]
  return np.array([x[sc] - y[sc] for x, y in zip(setting["runs"][a], setting["runs"][b])])


def test_claim_b_gain_shrinks_as_labels_grow(claim_results):
  """With the fine-tuning length chosen on validation, pre-training's gain at 5% of the clicks
  exceeds its gain at 100% in every seed (small, grid without 25: +0.067 vs +0.007; the few
  labels pick the shortest fine-tuning, all labels 200-400 steps)."""
  d = {
    name: _paired(_setting(claim_results["b"], name), "sass", "sass_base")
    for name in ("labels_0.05", "labels_1")
  }
  assert (d["labels_0.05"] - d["labels_1"] > 0.02).all(), d
  steps = {
    name: _setting(claim_results["b"], name)["table"]["sass_base"]["steps"]
    for name in ("labels_0.05", "labels_1")
  }
  assert max(steps["labels_0.05"]) < min(steps["labels_1"]), steps


def test_claim_b_pretraining_helps_with_few_labels(claim_results):
  """5% of the training clicks, exposures carrying preference: pre-trained SASS beats SASS-Base
  (small: +0.046 / +0.034 overall)."""
  s = _setting(claim_results["b"], "labels_0.05")
  d = s["paired_differences"]["sass - sass_base"]
  assert d["mean"] > 0.015, (d, s["table"])


def test_claim_c_scenario_specific_item_vectors_win_where_one_vector_is_too_narrow(claim_results):
  """Items with an own part per scenario and out_dim 4: one vector per scenario beats one for
  all scenarios in every seed (5 seeds: +0.022 to +0.050 overall, results/claims.md)."""
  s = _setting(claim_results["c"], "items_own_narrow")
  d = _paired(s, "sass_base", "sass_base_agnostic_items")
  assert (d > 0.01).all(), (d, s["table"])


def test_claim_c_control_is_level(claim_results):
  """Items with no scenario-specific appeal: one item vector for all scenarios is as good as
  one per scenario (within 0.03; 5 seeds: -0.002 +- 0.017, seeds 0 / 1: -0.027 / +0.006)."""
  s = _setting(claim_results["c"], "control_items_same")
  d = s["paired_differences"]["sass_base - sass_base_agnostic_items"]
  assert abs(d["mean"]) < 0.03, (d, s["table"])


def test_merge_previous_keeps_the_claims_not_rerun(tmp_path):
  """``--claims c`` replaces claim c in an earlier claims.json of the same size and seeds and
  keeps a and b; a file of another size is ignored."""
  old = {"size": "full", "seeds": [0, 1], "wall_s": 9.0, "claims": {k: {"old": k} for k in "abc"}}
  path = tmp_path / "claims.json"
  path.write_text(json.dumps(old))
  new = {"size": "full", "seeds": [0, 1], "wall_s": 2.0, "claims": {"c": {"new": 1, "wall_s": 2.0}}}
  got = claims.merge_previous(json.loads(json.dumps(new)), path)
  assert list(got["claims"]) == ["a", "b", "c"]
  assert got["claims"]["a"] == {"wall_s": None, "old": "a"}
  assert got["claims"]["c"] == {"new": 1, "wall_s": 2.0} and got["wall_s"] == 2.0
  path.write_text(json.dumps(dict(old, size="small")))
  assert list(claims.merge_previous(json.loads(json.dumps(new)), path)["claims"]) == ["c"]
  assert list(claims.merge_previous(new, tmp_path / "missing.json")["claims"]) == ["c"]


def test_markdown_says_which_claims_were_kept_from_an_earlier_run():
  res = {"size": "full", "sizes": {}, "seeds": [0], "metric": claims.METRIC, "wall_s": 3.0}
  res["claims"] = {
    "a": {"title": "ta", "note": "na", "settings": [], "wall_s": None},
    "c": {"title": "tc", "note": "nc", "settings": [], "wall_s": 3.0},
  }
  md = claims.markdown(res)
  assert "na. Kept from an earlier run of this file" in md
  assert "nc. Wall time 3 s." in md


def test_markdown_shows_no_std_for_one_seed():
  """With one seed there is no std: the tables show the mean alone, not '± 0.0000'."""
  claim = claims.CLAIMS["b"]
  runs = {"sass": [{"overall": 0.3, "steps": 25}], "sass_base": [{"overall": 0.25, "steps": 50}]}
  res = {"size": "small", "sizes": {}, "seeds": [0], "metric": claims.METRIC, "wall_s": 1.0}
  res["claims"] = {
    "b": {
      "title": "t",
      "note": "n",
      "wall_s": 1.0,
      "settings": [claims.summarise(claim, claim.settings[0], runs)],
    }
  }
  md = claims.markdown(res)
  assert "± 0.0000" not in md and "| sass | 0.3000 | 0.3000 | 25 |" in md, md
  assert "| sass - sass_base | +0.0500 | 1/1 |" in md, md
  res["seeds"] = [0, 1]
  assert "| sass | 0.3000 ± 0.0000 |" in claims.markdown(res)


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--claims", ""], "--claims '': expected a non-empty subset of ['a', 'b', 'c']"),
    (["--claims", ","], "--claims ',': expected a non-empty subset"),
    (["--claims", "z"], "--claims 'z': expected a non-empty subset"),
    (["--claims", "a,,b"], "--claims 'a,,b': expected a non-empty subset"),
    (["--claims", "a,b,"], "--claims 'a,b,': expected a non-empty subset"),
    (["--claims", "a,a"], "--claims 'a,a': expected a non-empty subset"),
    (["--seeds", "0"], "--seeds 0: expected an integer >= 1"),
  ],
)
def test_cli_rejects_bad_arguments_and_writes_nothing(tmp_path, capsys, argv, msg):
  """An empty --claims once ran nothing and overwrote results/claims.*; a bad --seeds was blamed
  on --claims; an empty element ('a,,b') or a repeated one was silently dropped."""
  with pytest.raises(SystemExit) as e:
    claims.main(["--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), *argv])
  assert e.value.code == 2
  assert msg in capsys.readouterr().err
  assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_cli_help_describes_each_claim(capsys):
  """--help named the claims a, b, c without saying what each tests."""
  with pytest.raises(SystemExit) as e:
    claims.main(["--help"])
  assert e.value.code == 0
  out = " ".join(capsys.readouterr().out.split())
  for k, c in claims.CLAIMS.items():
    assert f"{k} = {c.title}" in out, (k, out)
    for s in c.settings:
      assert s.name in out, (s.name, out)


@pytest.mark.parametrize(
  "argv,msg",
  [
    (["--data", "label_fraction"], "--data 'label_fraction': expected KEY=VALUE"),
    (["--data", "no_such_key=1"], "--data 'no_such_key=1': unknown key 'no_such_key'"),
    (["--data", "num_rows=8000", "--data", "num_rows=9000"], "'num_rows' given twice"),
    (["--claims", "a,b", "--data", "num_rows=8000"], "--data with --claims 'a,b': expected one"),
    (["--data", "num_rows=8000", "--setting", "a/b"], "--setting 'a/b': expected a name of"),
    (["--data", "num_rows=8000", "--setting", ".."], "--setting '..': expected a name of"),
    (["--setting", "x"], "--setting 'x' without --data"),
    (["--data", "seed=5"], "--data 'seed=5': unknown key 'seed'"),
    (["--data", "label_fraction=abc"], "'abc' is not a Python literal"),
    (["--data", "num_rows=8000.5"], "--data num_rows=8000.5: Could not override field"),
    (["--data", "num_rows=-5"], "config.data.num_rows=-5: expected an integer in [1000,"),
    (["--data", "scenario_weights=(1,2)"], "config.data.scenario_weights=(1, 2): expected"),
    (["--data", "scenario_strength_scale=(0,-1,1)"], "config.data.scenario_strength_scale="),
  ],
)
def test_cli_data_rejects_bad_items_and_writes_nothing(tmp_path, capsys, argv, msg):
  """Found by a fresh-user check: bad values failed only when the first run prepared its data
  (a traceback and a stray run directory); a non-literal was taken as a string; '..' passed
  the name check; --setting without --data was ignored; --data seed=N was overridden."""
  argv = ["--claims", "a", *argv] if "--claims" not in argv else argv
  with pytest.raises(SystemExit) as e:
    claims.main(["--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert msg in err, err
  assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_cli_data_runs_one_claim_on_its_own_setting(tmp_path, monkeypatch, capsys):
  """--data replaces the claim's settings by one setting of the user's (literal values; the
  data reach the run's config) and writes claims_<setting>.*, leaving claims.* alone."""
  seen = []

  def fake_run_one(claim, setting, variant, seed, size, workdir):
    cfg = claims.run_config(claim, setting, variant, seed, size)
    seen.append((setting.name, tuple(cfg.data.label_fraction), cfg.data.num_rows, seed))
    return {"s0": 0.1 + 0.01 * (variant[0] == "sass_base"), "overall": 0.2, "steps": 25}

  monkeypatch.setattr(claims, "run_one", fake_run_one)
  (tmp_path / "r").mkdir()
  (tmp_path / "r" / "claims.md").write_text("kept")
  claims.main(
    [
      "--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--claims", "a",
      "--seeds", "2", "--data", "label_fraction=(0.03, 1, 1)", "--data", "num_rows=12000",
      "--setting", "lf03",
    ]
  )  # fmt: skip
  assert {s for s in seen} == {("lf03", (0.03, 1, 1), 12000, 0), ("lf03", (0.03, 1, 1), 12000, 1)}
  assert len(seen) == 2 * len(claims.CLAIMS["a"].variants)
  assert (tmp_path / "r" / "claims.md").read_text() == "kept"
  md = (tmp_path / "r" / "claims_lf03.md").read_text()
  assert "--data 'label_fraction=(0.03, 1, 1)' --data 'num_rows=12000' --setting lf03" in md
  res = json.loads((tmp_path / "r" / "claims_lf03.json").read_text())
  (s,) = res["claims"]["a"]["settings"]
  assert s["setting"] == "lf03" and s["data"]["num_rows"] == 12000


def test_cli_refuses_to_relabel_a_finished_run_of_other_settings(tmp_path, monkeypatch, capsys):
  """A finished run is re-read only when it was made with the same settings: re-running with
  other --data (or another --size) re-read the old numbers under the new settings' label
  (found by a fresh-user check). Runs from before the config record are checked against
  their data manifest. Nothing is trained and nothing is written when a run does not match."""
  claim = claims.CLAIMS["a"]
  setting = claims.Setting("tiny", {"num_rows": 8000})
  wd = tmp_path / "w" / "a" / "tiny" / claim.variants[0][0] / "seed0"
  wd.mkdir(parents=True)
  (wd / "metrics.json").write_text("{}")
  cfg = claims.run_config(claim, setting, claim.variants[0], 0, "small")
  (wd / claims.RUN_CONFIG).write_text(json.dumps(claims._plain_config(cfg)))
  claims.check_finished_run(wd, cfg)  # the same settings: fine
  trained = []
  monkeypatch.setattr(claims, "_train_selecting_steps", lambda *a: trained.append(a))
  base = ["--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--claims", "a"]
  for extra in (["--data", "num_rows=9000"], ["--data", "num_rows=8000", "--size", "full"]):
    with pytest.raises(SystemExit) as e:
      claims.main([*base, *extra, "--setting", "tiny", "--seeds", "1"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished run made with other settings" in err[0], err
    assert ("num_rows: 8000 there, 9000 now" in err[0]) == (extra[1] == "num_rows=9000"), err
  assert not trained and not (tmp_path / "r").exists()
  # an older run (no config record): its data manifest decides
  (wd / claims.RUN_CONFIG).unlink()
  (wd / "data").mkdir()
  options = json.loads(json.dumps(cfg.data.to_dict()))  # what a prepared store records
  (wd / "data" / "manifest.json").write_text(json.dumps({"options": options}))
  claims.check_finished_run(wd, cfg)
  with pytest.raises(claims.StaleRunError, match="num_rows: 8000 there, 9000 now"):
    claims.check_finished_run(
      wd,
      claims.run_config(
        claim, claims.Setting("tiny", {"num_rows": 9000}), claim.variants[0], 0, "small"
      ),
    )


def test_rerun_says_which_runs_were_read_back_and_their_own_time(tmp_path, monkeypatch):
  """A call that only reads back finished runs took about 0 s; claims.md said just that
  (found by a fresh-user check). Each run now records its own seconds, and the markdown
  says how many runs were read back and what their training took."""
  setting = claims.Setting("tiny", {"num_rows": 8000})

  def fake_train(claim, cfg, wd):
    m = {"scenarios": {"s0": {claims.METRIC: 0.1}}, "overall": {claims.METRIC: 0.2}}
    m["checkpoint_step"] = 25
    (wd / "metrics.json").write_text(json.dumps(m))
    return m

  monkeypatch.setattr(claims, "_train_selecting_steps", fake_train)
  first = claims.run_claims(tmp_path, ("a",), seeds=1, size="small", settings=(setting,))
  c = first["claims"]["a"]
  n = len(claims.CLAIMS["a"].variants)
  assert (c["runs"], c["runs_reread"]) == (n, 0) and c["runs_train_s"] >= 0
  assert "read back" not in claims.markdown(first)
  # the record of one run's own time, made bigger so that it shows in the sum
  one = claims.run_dir(tmp_path, claims.CLAIMS["a"], setting, claims.CLAIMS["a"].variants[0], 0)
  (one / claims.RUN_SECONDS).write_text(json.dumps({"train_s": 500.0}))
  again = claims.run_claims(tmp_path, ("a",), seeds=1, size="small", settings=(setting,))
  c = again["claims"]["a"]
  assert (c["runs"], c["runs_reread"]) == (n, n) and c["runs_train_s"] >= 500.0
  md = claims.markdown(again)
  assert f"{n} of its {n} runs were read back from earlier calls" in md, md
  assert "the runs' own training took 50" in md, md
  # what the runs were made with, the setting's own rows over the size's 40,000
  assert "Ran with 8,000 rows, 600 users, 400 items; fine-tuning steps [25, 50" in md, md
  # a run made before the record existed: its time is unknown, so no sum is claimed
  (one / claims.RUN_SECONDS).unlink()
  c = claims.run_claims(tmp_path, ("a",), seeds=1, size="small", settings=(setting,))
  assert c["claims"]["a"]["runs_train_s"] is None
  assert "own training" not in claims.markdown(c) and "read back" in claims.markdown(c)
