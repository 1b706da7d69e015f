"""Labelled negatives of the entire space in fine-tuning (``config.train.labelled_weight``;
docs/design.md §2, stage 2): the BCE against NumPy, the loss and batch unchanged at weight 0,
the labelled sub-batch of the pipeline, the row-sparse path, a sharded step and a tiny run
that logs both parts and resumes bitwise."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from sass_jax import config_check
from sass_jax.data import pipeline
from sass_jax.model.towers import SASS
from sass_jax.train import losses, loop, sparse, steps
from sass_jax.train.stages import labelled_batch_size

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
TAU, ALPHA = 0.2, 1.0
FINETUNE_KEYS = {"user", "item", "scenario", "user_index", "item_index", "item_logq"}


def test_labelled_bce_matches_numpy():
  rng = np.random.default_rng(0)
  u = rng.normal(size=(7, 5)).astype(np.float32)
  i = rng.normal(size=(7, 5)).astype(np.float32)
  y = np.array([1, 0, 0, 1, 1, 0, 1], np.float32)
  s = (u * i).sum(-1) / TAU
  p = 1.0 / (1.0 + np.exp(-s.astype(np.float64)))
  want = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  got = float(losses.labelled_bce(jnp.asarray(u), jnp.asarray(i), jnp.asarray(y), TAU))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # large logits stay finite (softplus form)
  big = float(losses.labelled_bce(jnp.asarray(u) * 1e3, jnp.asarray(i), jnp.asarray(y), TAU))
  assert np.isfinite(big)


def _tiny_batch(tiny_features, b=8, bl=6, seed=0):
  r = np.random.default_rng(seed)
  user, item = tiny_features(b, seed)
  lu, li = tiny_features(bl, seed + 100)
  batch = {
    "user": user,
    "item": item,
    "scenario": r.integers(0, 3, b).astype(np.int32),
    "user_index": user["user_id"].copy(),
    "item_index": item["movie_id"].copy(),
    "item_logq": np.log(r.uniform(0.01, 0.1, b)).astype(np.float32),
  }
  lab = {
    "user": lu,
    "item": li,
    "scenario": r.integers(0, 3, bl).astype(np.int32),
    "label": (r.random(bl) < 0.5).astype(np.float32),
  }
  return batch, lab


def test_finetune_loss_adds_the_weighted_bce(tiny_cfg, tiny_features):
  model = SASS(tiny_cfg())
  batch, lab = _tiny_batch(tiny_features)
  params = model.init(jax.random.key(0), batch["user"], batch["item"], batch["scenario"])["params"]
  rng = jax.random.key_data(jax.random.key(1))
  old, (extra0, _) = steps.finetune_loss(model, params, batch, rng, TAU, ALPHA)
  # weight 0: the old loss and no extras, even with a 'labelled' batch present
  w0, (extra_w0, _) = steps.finetune_loss(
    model, params, {**batch, "labelled": lab}, rng, TAU, ALPHA, None, "all", 0.0
  )
  assert extra0 == {} and extra_w0 == {}
  assert float(w0) == float(old)
  w = 0.7
  loss, (extra, _) = steps.finetune_loss(
    model, params, {**batch, "labelled": lab}, rng, TAU, ALPHA, None, "all", w
  )
  assert set(extra) == {"softmax_loss", "labelled_bce"}
  assert float(extra["softmax_loss"]) == float(old)
  u = model.apply({"params": params}, lab["user"], lab["scenario"], method="encode_user")
  i = model.apply({"params": params}, lab["item"], lab["scenario"], method="encode_item")
  bce = float(losses.labelled_bce(u, i, jnp.asarray(lab["label"]), TAU))
  np.testing.assert_allclose(float(extra["labelled_bce"]), bce, rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(old) + w * bce, rtol=1e-6)
  assert abs(float(loss) - float(old)) > 1e-3  # the feature changes the loss
  with pytest.raises(ValueError, match="labelled"):
    steps.finetune_loss(model, params, batch, rng, TAU, ALPHA, None, "all", w)


def test_sparse_step_with_labelled_ids_matches_masked_reference(tiny_cfg, tiny_features):
  """lazy_adam with a labelled sub-batch: the labelled rows are updated (dedup with the main
  batch's), exactly as the dense masked reference does."""
  model = SASS(tiny_cfg())
  batch, lab = _tiny_batch(tiny_features, seed=3)
  batch["user"]["user_id"] = np.arange(8, dtype=np.int32) % 5  # users 0..4
  lab["user"]["user_id"] = 5 + np.arange(6, dtype=np.int32) % 5  # users 5..9: labelled only
  batch = jax.tree.map(jnp.asarray, {**batch, "labelled": lab})
  scfg = test_config.get_config().train
  scfg.warmup_steps = 0  # a non-zero learning rate at the first update
  tx = steps.make_optimizer(scfg, 10)

  def run(masked):
    opts = sparse.SparseOptions("lazy_adam", steps.make_schedule(scfg, 10), masked=masked)
    init = sparse.make_init_fn(model, tx, opts, batch, seed=0)
    state = jax.jit(lambda: nn.meta.unbox(init()))()
    step = jax.jit(sparse.make_finetune_step(model, tx, opts, TAU, ALPHA, "all", 0.5))
    return state, step(state, batch)

  s0, (s1, m1) = run(False)
  _, (s2, m2) = run(True)
  assert "labelled_bce" in m1 and "softmax_loss" in m1
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  jax.tree.map(close, jax.device_get(s1.params), jax.device_get(s2.params))
  assert int(m1["touched_rows"]) == int(m2["touched_rows"])
  # a user id only in the labelled batch is a touched (changed) row
  only = set(lab["user"]["user_id"].tolist()) - set(np.asarray(batch["user"]["user_id"]).tolist())
  assert only, "the fixture should have a user only in the labelled batch"
  t0 = np.asarray(s0.params["user_tower"]["embed"]["user_id"])
  t1 = np.asarray(s1.params["user_tower"]["embed"]["user_id"])
  for r in only:
    assert not np.array_equal(t0[r], t1[r])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  c = test_config.get_config("sass_base")
  c.data.dir = str(DATA)
  wd = tmp_path_factory.mktemp("lab_data")
  return c, loop.prepare(c, wd)


def test_pipeline_labelled_sub_batch(prepared):
  _, data = prepared
  plain = pipeline.BatchFn(data, "finetune", 32, seed=5)
  assert set(plain(3)) == FINETUNE_KEYS  # weight 0: the batch keys of before
  fn = pipeline.BatchFn(data, "finetune", 32, seed=5, labelled=48)
  b = fn(3)
  assert set(b) == FINETUNE_KEYS | {"labelled"}
  for k in FINETUNE_KEYS:  # the main batch is unchanged
    jax.tree.map(np.testing.assert_array_equal, b[k], plain(3)[k])
  lab = b["labelled"]
  assert set(lab) == {"user", "item", "scenario", "label"}
  assert lab["label"].dtype == np.float32 and lab["label"].shape == (48,)
  assert lab["scenario"].dtype == np.int32
  # all labelled training rows, both labels: over one epoch every training row appears once
  n = len(data.rows("train"))
  labels = np.concatenate([fn(i)["labelled"]["label"] for i in range(n // 48)])
  want = np.asarray(data.inter["label"])[data.rows("train")]
  assert 0 < labels.mean() < 1
  np.testing.assert_allclose(labels.mean(), want.mean(), atol=0.01)
  # a pure function of (seed, index); processes split the global labelled batch
  jax.tree.map(np.testing.assert_array_equal, fn(3)["labelled"], lab)
  halves = [
    pipeline.BatchFn(data, "finetune", 32, seed=5, process_index=p, process_count=2, labelled=48)(
      3
    )["labelled"]
    for p in (0, 1)
  ]
  jax.tree.map(
    lambda a, x, y: np.testing.assert_array_equal(a, np.concatenate([x, y])), lab, *halves
  )
  with pytest.raises(ValueError, match="fine-tune"):
    pipeline.BatchFn(data, "pretrain", 32, seed=5, labelled=8)


def test_config_keys_and_checks():
  c = test_config.get_config()
  assert c.train.labelled_weight == 0.0 and c.train.labelled_batch_size == 0
  assert labelled_batch_size(c) == 0
  c.train.labelled_weight = 0.5
  assert labelled_batch_size(c) == c.train.batch_size
  assert labelled_batch_size(c, "pretrain") == 0
  c.train.labelled_batch_size = 128
  assert labelled_batch_size(c) == 128
  config_check.validate(c, stages=("finetune",))
  for key, bad in (("labelled_weight", -1.0), ("labelled_batch_size", -2)):
    c2 = test_config.get_config()
    c2.train[key] = bad
    with pytest.raises(ValueError, match=rf"config\.train\.{key}="):
      config_check.validate(c2, stages=("finetune",))
  c3 = test_config.get_config()
  c3.train.labelled_weight, c3.train.resident_on_device = 1.0, True
  with pytest.raises(ValueError, match="resident_on_device"):
    config_check.validate(c3, stages=("finetune",))


def test_tiny_run_logs_both_parts_and_resumes(tmp_path):
  c = test_config.get_config("sass_base")
  c.data.dir = str(DATA)
  c.train.labelled_weight, c.train.labelled_batch_size = 0.5, 32
  c.train.num_steps, c.train.warmup_steps = 6, 0
  c.train.log_every, c.checkpoint.every_steps = 2, 2
  c.model.dropout = 0.1  # the saved rng matters
  data = loop.prepare(c, tmp_path / "a")
  model = loop.build_model(c, data)
  from sass_jax.partition import Partitioner

  part = Partitioner(c.mesh)
  straight = loop.train_stage("finetune", c, data, model, part, tmp_path / "a", show_progress=False)
  log = [json.loads(x) for x in (tmp_path / "a" / "finetune_log.jsonl").read_text().splitlines()]
  assert [x["step"] for x in log] == [2, 4, 6]
  for x in log:
    assert np.isfinite(x["labelled_bce"]) and np.isfinite(x["softmax_loss"])
    np.testing.assert_allclose(x["loss"], x["softmax_loss"] + 0.5 * x["labelled_bce"], rtol=1e-5)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "finetune" / "6")
  resumed = loop.train_stage("finetune", c, data, model, part, tmp_path / "b", show_progress=False)
  assert int(resumed.step) == 6
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(straight.params), jax.device_get(resumed.params)
  )
  # the labelled batch is part of the step: without it the run ends elsewhere
  c0 = test_config.get_config("sass_base")
  c0.data.dir = str(DATA)
  c0.train.num_steps, c0.train.warmup_steps = 6, 0
  c0.train.log_every, c0.checkpoint.every_steps = 2, 2
  c0.model.dropout = 0.1
  plain = loop.train_stage("finetune", c0, data, model, part, tmp_path / "c", show_progress=False)
  log0 = [json.loads(x) for x in (tmp_path / "c" / "finetune_log.jsonl").read_text().splitlines()]
  assert "labelled_bce" not in log0[0] and "softmax_loss" not in log0[0]
  a, b = jax.device_get(straight.params), jax.device_get(plain.params)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from configs import test as test_config
    from sass_jax.data import pipeline
    from sass_jax.partition import Partitioner
    from sass_jax.train import loop, steps

    cfg = test_config.get_config("sass_base")
    cfg.data.dir = sys.argv[1]
    data = loop.prepare(cfg, sys.argv[2])
    model = loop.build_model(cfg, data)
    mk = lambda d: cfg.mesh.__class__({"data": d, "model": 1, "shard_min_rows": 0,
                                       "table_layout": "auto"})

    def run(part):
        tx = steps.make_optimizer(cfg.train, 100)
        state, sh = part.init(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
        fn = part.compile_step(steps.make_finetune_step(model, tx, 0.2, 1.0, "all", 0.5), sh)
        it = pipeline.BatchIterator(pipeline.BatchFn(data, "finetune", 32, 0, labelled=16))
        out = []
        for _ in range(3):
            b = part.shard_batch(next(it))
            assert b["labelled"]["label"].sharding.spec == P("data"), b["labelled"]["label"].sharding
            state, m = fn(state, b)
            out.append((float(m["softmax_loss"]), float(m["labelled_bce"])))
        return out

    one = run(Partitioner(mk(1), devices=jax.devices()[:1]))
    four = run(Partitioner(mk(4)))
    np.testing.assert_allclose(one, four, rtol=2e-4)
    print("OK")
""")


def test_sharded_labelled_batch_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run(
    [sys.executable, "-c", SHARDED, str(DATA), str(tmp_path / "wd")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")
