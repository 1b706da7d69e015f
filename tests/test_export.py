"""Export (item vectors, serialised user tower, manifest) and recommend on a trained tiny run."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest

from configs import test as test_config
from sass_jax import export
from sass_jax.schema import FieldSpec
from sass_jax.eval.evaluate import encode_all
from sass_jax.eval.retrieval import topk_scores
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.partition import Partitioner
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg():
  c = test_config.get_config()
  c.data.dir = str(DATA)
  c.pretrain.num_steps = 10
  c.train.num_steps = 20
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Trained tiny SASS run, exported to WORKDIR/export; with the restored variables."""
  wd = tmp_path_factory.mktemp("export_run")
  cfg = _cfg()
  loop.train(cfg, wd, show_progress=False)
  out = export.export_workdir(cfg, wd)
  data = loop.prepare(cfg, wd)
  model = loop.build_model(cfg, data)
  variables = loop.restore_variables(cfg, wd, "finetune", model, Partitioner(cfg.mesh), data)
  return dict(cfg=cfg, wd=wd, out=out, data=data, model=model, variables=variables)


def _apply_user(run, rows, scenario):
  d = run["data"]
  feats = {f: jnp.asarray(np.asarray(c)[rows]) for f, c in d.users.items()}
  feats.update({f"{f}_mask": jnp.asarray(np.asarray(m)[rows]) for f, m in d.user_masks.items()})
  return np.asarray(
    run["model"].apply(
      run["variables"], feats, jnp.asarray(scenario, jnp.int32), method="encode_user"
    )
  )


def test_layout_and_manifest(run):
  out, data, cfg = run["out"], run["data"], run["cfg"]
  assert out == run["wd"] / "export"
  m = json.loads((out / "manifest.json").read_text())
  assert m["model"] == "sass" and m["checkpoint"]["step"] == cfg.train.num_steps
  assert m["embedding_dim"] == cfg.model.out_dim and m["num_items"] == data.num_items
  assert m["scenario_names"] == ["age_under25", "age_25_34", "age_35plus"]
  feats = m["user_encoder"]["inputs"]["features"]
  assert list(feats) == [s.name for s in data.user_specs]  # MovieLens: no multi-hot user field
  for s in data.user_specs:
    assert feats[s.name] == {"shape": ["b"], "dtype": "int32", "vocab_size": s.vocab_size}
  assert m["user_encoder"]["output"] == {"shape": ["b", cfg.model.out_dim], "dtype": "float32"}
  for sc in m["scenarios"]:
    assert (out / sc["item_embeddings"]).is_file() and (out / sc["item_parquet"]).is_file()
  np.testing.assert_array_equal(np.load(out / "item_ids.npy"), data.item_raw_ids.astype(str))


def test_user_encoder_matches_model(run):
  enc = export.load_user_encoder(run["out"])
  data = run["data"]
  # Parameters are baked in: the only inputs are the features and the scenario.
  assert len(enc.exported.in_avals) == len(data.user_specs) + 1
  rng = np.random.default_rng(0)
  rows = np.concatenate([[0, data.num_users - 1], rng.choice(data.num_users, 5, replace=False)])
  feats = export.user_features(data, data.user_raw_ids[rows])
  by_scenario = []
  for k in range(data.num_scenarios):
    got = enc(feats, np.full(len(rows), k, np.int32))
    want = _apply_user(run, rows, np.full(len(rows), k))
    assert got.shape == (len(rows), run["cfg"].model.out_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    by_scenario.append(got)
  # The scenario input matters (scenario-aware tower), and per-row scenarios are honoured.
  assert np.abs(by_scenario[0] - by_scenario[1]).max() > 1e-3
  mixed = np.arange(len(rows)) % data.num_scenarios
  np.testing.assert_allclose(enc(feats, mixed), _apply_user(run, rows, mixed), atol=1e-6, rtol=0)
  # Symbolic batch: a batch of one works with the same artifact.
  one = export.user_features(data, data.user_raw_ids[rows[:1]])
  np.testing.assert_allclose(enc(one, [2]), by_scenario[2][:1], atol=1e-6, rtol=0)
  with pytest.raises(KeyError, match="zip"):
    enc({k: v for k, v in feats.items() if k != "zip"}, mixed)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    enc(feats, np.full(len(rows), 3))


def test_item_matrices_match_encode_all(run):
  out, data, model, variables = run["out"], run["data"], run["model"], run["variables"]
  m = json.loads((out / "manifest.json").read_text())
  mats = []
  for sc in m["scenarios"]:
    got = np.load(out / sc["item_embeddings"])
    want = encode_all(model, variables, data.items, data.item_masks, "encode_item", sc["index"])
    assert got.shape == (data.num_items, m["embedding_dim"]) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    mats.append(got)
  assert np.abs(mats[0] - mats[2]).max() > 1e-3


def test_parquet_round_trip(run):
  out, data = run["out"], run["data"]
  m = json.loads((out / "manifest.json").read_text())
  for sc in m["scenarios"]:
    idx, ids, emb = export.read_items_parquet(out / sc["item_parquet"])
    np.testing.assert_array_equal(idx, np.arange(data.num_items))
    np.testing.assert_array_equal(ids, data.item_raw_ids.astype(str))
    np.testing.assert_array_equal(emb, np.load(out / sc["item_embeddings"]))
    schema = pq.read_schema(out / sc["item_parquet"])
    assert str(schema.field("item_id").type) == "string"
    assert schema.field("embedding").type.list_size == m["embedding_dim"]
    assert str(schema.field("embedding").type.value_type) == "float"


def _independent_topk(run, row, k, top, mask_splits, also_exclude=()):
  """Top-``top`` items by direct model.apply vectors and topk_scores with the user's positives
  of ``mask_splits`` in scenario k excluded (or none), and the items ``also_exclude``."""
  data, model, variables = run["data"], run["model"], run["variables"]
  n = data.num_items
  items = {f: jnp.asarray(np.asarray(c)) for f, c in data.items.items()}
  items.update({f"{f}_mask": jnp.asarray(np.asarray(m)) for f, m in data.item_masks.items()})
  ivec = np.asarray(model.apply(variables, items, jnp.full(n, k, jnp.int32), method="encode_item"))
  uvec = _apply_user(run, [row], [k])
  inter = {c: np.asarray(v) for c, v in data.inter.items()}
  sel = (
    (inter["user"] == row)
    & (inter["scenario"] == k)
    & (inter["label"] > 0.5)
    & np.isin(inter["split"], mask_splits)
  )
  seen = np.unique(inter["item"][sel])
  scores, idx = topk_scores(
    uvec, ivec, top, exclude=[np.union1d(seen, np.asarray(also_exclude, np.int64))]
  )
  return idx[0], scores[0], seen


def _busiest(run):
  """(user row, scenario) with the most training positives."""
  inter = {c: np.asarray(v) for c, v in run["data"].inter.items()}
  sel = (inter["split"] == 0) & (inter["label"] > 0.5)
  key = inter["user"][sel].astype(np.int64) * 10 + inter["scenario"][sel]
  best = np.bincount(key).argmax()
  return int(best // 10), int(best % 10)


def test_recommend_matches_evaluation_ranking(run):
  cfg, wd, data = run["cfg"], run["wd"], run["data"]
  row, k = _busiest(run)
  raw, name = str(data.user_raw_ids[row]), data.scenario_names[k]
  rec = export.recommend(cfg, wd, raw, name, 10)
  idx, scores, seen = _independent_topk(run, row, k, 10, [0])
  assert len(seen) > 5 and rec["num_excluded"] == len(seen)
  assert [r["item_index"] for r in rec["items"]] == idx.tolist()
  assert [r["item_id"] for r in rec["items"]] == data.item_raw_ids[idx].astype(str).tolist()
  np.testing.assert_allclose([r["score"] for r in rec["items"]], scores, atol=1e-5)
  assert [r["rank"] for r in rec["items"]] == list(range(1, 11))
  assert not set(idx) & set(seen)
  # exclude_seen=False: nothing masked; 'train_valid' also masks validation positives.
  kw = dict(data=data, model=run["model"], variables=run["variables"])
  plain = export.recommend(cfg, wd, raw, name, 10, exclude_seen=False, **kw)
  idx0, _, _ = _independent_topk(run, row, k, 10, [])
  assert plain["num_excluded"] == 0 and [r["item_index"] for r in plain["items"]] == idx0.tolist()
  cfg2 = copy.deepcopy(cfg)
  cfg2.eval.mask = "train_valid"
  tv = export.recommend(cfg2, wd, raw, name, 25, **kw)
  idx2, _, seen2 = _independent_topk(run, row, k, 25, [0, 1])
  assert tv["num_excluded"] == len(seen2)
  assert [r["item_index"] for r in tv["items"]] == idx2.tolist()
  # eval.corpus='scenario': only items seen in the scenario's training rows are candidates.
  cfg3 = copy.deepcopy(cfg)
  cfg3.eval.corpus = "scenario"
  sc = export.recommend(cfg3, wd, raw, name, 25, **kw)
  inter = {c: np.asarray(v) for c, v in data.inter.items()}
  others = np.setdiff1d(
    np.arange(data.num_items), inter["item"][(inter["scenario"] == k) & (inter["split"] == 0)]
  )
  assert len(others) > 0
  idx3, scores3, _ = _independent_topk(run, row, k, 25, [0], also_exclude=others)
  assert [r["item_index"] for r in sc["items"]] == idx3.tolist()
  np.testing.assert_allclose([r["score"] for r in sc["items"]], scores3, atol=1e-5)


def test_recommend_unknown_user_and_scenario(run):
  cfg, wd, data = run["cfg"], run["wd"], run["data"]
  with pytest.raises(export.UnknownIdError, match="'no-such-user' is not in the prepared data"):
    export.recommend(cfg, wd, "no-such-user", "age_25_34")
  with pytest.raises(export.UnknownIdError) as e:
    export.recommend(cfg, wd, str(data.user_raw_ids[0]), "teens")
  assert all(n in str(e.value) for n in data.scenario_names) and "teens" in str(e.value)
  with pytest.raises(export.UnknownIdError, match="config.recommend.user"):
    export.recommend(cfg, wd, "", "age_25_34")
  with pytest.raises(export.UnknownIdError, match="'x'"):
    export.user_rows(data, ["1", "x"])
  np.testing.assert_array_equal(export.user_rows(data, data.user_raw_ids[[7, 3, 7]]), [7, 3, 7])


def test_evaluation_wrote_plots(run):
  import matplotlib.image

  for name in ("training_curves.png", "scenario_metrics.png"):
    p = run["wd"] / "plots" / name
    assert p.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(p)
    assert img.ndim == 3 and min(img.shape[:2]) > 100


def _cli(run, *args):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(run["wd"]),
      f"--config.data.dir={DATA}",
      "--config.pretrain.num_steps=10",
      "--config.train.num_steps=20",
      *args,
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_recommend(run):
  data = run["data"]
  row, k = _busiest(run)
  raw, name = str(data.user_raw_ids[row]), data.scenario_names[k]
  r = _cli(
    run,
    "--mode",
    "recommend",
    f"--config.recommend.user={raw}",
    f"--config.recommend.scenario={name}",
    "--config.recommend.k=5",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  want = export.recommend(
    run["cfg"], run["wd"], raw, name, 5, data=data, model=run["model"], variables=run["variables"]
  )
  lines = [l for l in r.stdout.splitlines() if l.startswith("| ") and "rank" not in l]
  assert [l.split("|")[2].strip() for l in lines] == [x["item_id"] for x in want["items"]]
  r = _cli(
    run,
    "--mode",
    "recommend",
    f"--config.recommend.user={raw}",
    "--config.recommend.scenario=teens",
  )
  assert r.returncode != 0 and "age_under25" in r.stderr and "teens" in r.stderr


def test_cli_export_to_config_dir(run, tmp_path):
  r = _cli(
    run,
    "--mode",
    "export",
    f"--config.export.dir={tmp_path / 'x'}",
    "--config.export.platforms=('cpu',)",
  )
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / "x" / "manifest.json").read_text())
  assert m["user_encoder"]["platforms"] == ["cpu"]
  np.testing.assert_array_equal(
    np.load(tmp_path / "x" / m["scenarios"][1]["item_embeddings"]),
    np.load(run["out"] / m["scenarios"][1]["item_embeddings"]),
  )


def test_multi_hot_user_fields_and_out_of_range_ids():
  """A user tower with a multi-hot field (ids + bool mask), on a randomly initialised model."""
  specs = (FieldSpec("user_id", 10), FieldSpec("tags", 6, multi_hot=3))
  mc = ModelConfig(
    user_specs=specs,
    item_specs=(FieldSpec("item_id", 5),),
    num_scenarios=2,
    embed_dim=4,
    scenario_dim=4,
    widths=(8,),
    out_dim=5,
    bias_hidden=4,
  )
  model = SASS(mc)
  rng = np.random.default_rng(0)

  def feats(b):
    mask = rng.random((b, 3)) < 0.6
    mask[:, 0] = True
    return {
      "user_id": rng.integers(0, 10, b).astype(np.int32),
      "tags": rng.integers(0, 6, (b, 3)).astype(np.int32),
      "tags_mask": mask,
    }

  # Random values of the parameter shapes (cheaper than compiling model.init).
  shapes = nn.unbox(
    jax.eval_shape(
      model.init,
      jax.random.key(0),
      feats(2),
      {"item_id": np.zeros(2, np.int32)},
      np.zeros(2, np.int32),
    )
  )
  variables = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)
  blob = export.export_user_encoder(model, variables, specs, 2)
  ref = jax.jit(lambda f, sc: model.apply(variables, f, sc, method="encode_user"))
  exp = jax.export.deserialize(bytearray(blob))
  assert [str(a.shape) for a in exp.in_avals] == ["(b, 3)", "(b, 3)", "(b,)", "(b,)"]
  for b in (3, 6):
    f, sc = feats(b), rng.integers(0, 2, b).astype(np.int32)
    got = np.asarray(exp.call(f, sc))
    want = np.asarray(ref(f, sc))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # A row with an id outside the vocabulary (a multi-hot entry only where its mask is True) or
  # a bad scenario comes back as NaN, never as a normal-looking vector.
  f = feats(3)
  bad = dict(f, user_id=np.array([10, -1, 3], np.int32))
  out = np.asarray(exp.call(bad, np.zeros(3, np.int32)))
  assert np.isnan(out[:2]).all() and np.isfinite(out[2]).all()
  tags, mask = f["tags"].copy(), f["tags_mask"].copy()
  tags[:, 2], mask[0, 2], mask[1, 2] = 99, False, True  # row 0: masked out; row 1: used
  out = np.asarray(exp.call(dict(f, tags=tags, tags_mask=mask), np.zeros(3, np.int32)))
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
  out = np.asarray(exp.call(f, np.array([0, 2, 1], np.int32)))
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
