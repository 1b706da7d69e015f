"""Ahead-of-time compilation and the memory preflight (sass_jax/aot.py), the all-device table
layout (sass_jax/partition.py) and the mesh-independent padding of large tables.

- ``--mode compile`` of a tiny data-free config for a TPU v5e 2x2 topology (libtpu, no TPU):
  the report's fields, per-chip table bytes = table bytes / shards, no table all-gathered;
- a real run whose compiled step needs more than ``config.mesh.memory_limit_bytes`` stops
  with one ``error:`` line before anything is written; under the limit it trains;
- on 8 fake CPU devices the tables split over all of them give the losses and parameters of
  one device, for both stages and every embedding optimiser.

The multi-device parts run in subprocesses (the device count is fixed when JAX starts).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"

TINY_CONFIG = textwrap.dedent("""
    from configs import test as base

    def get_config(arg="sass"):
      c = base.get_config(arg)
      c.model.widths = (16,)
      c.compile.user_fields = (("user_id", 6041, 0), ("gender", 3, 0))
      c.compile.item_fields = (("movie_id", 3707, 0), ("genres", 19, 4))
      c.compile.num_scenarios = 3
      c.compile.topology = "v5e:2x2"
      c.compile.stages = ("finetune",)
      c.compile.embedding_optimizers = ("dense", "lazy_adam")
      c.mesh.shard_min_rows = 1000
      return c
""")


def _run_on_8_cpu_devices(script: str, *args: str):
  """Run ``script`` in a fresh process with 8 fake CPU devices; it must print OK last."""
  r = subprocess.run(
    [sys.executable, "-c", script, *args],
    cwd=REPO,
    env=_env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")


def _env(**kw):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  env.update(kw)
  return env


def test_padding_is_mesh_independent_and_splits_large_tables():
  from sass_jax.model.embedding import padded_rows

  assert padded_rows(1_000_001, 8) == 1_000_448  # 1,000,001-row table: a multiple of 1024
  assert all(padded_rows(1_000_001, 8) % n == 0 for n in (16, 256, 512, 1024))
  assert padded_rows(6041, 8) == 6048 and padded_rows(5, 8) == 8  # small tables as before
  assert padded_rows(65_536 * 3 + 1, 6) % 6 == 0 and padded_rows(65_536 * 3 + 1, 6) % 1024 == 0
  assert padded_rows(70_001, 1) == 70_001  # pad_to=1: exact (the row-sparse view)


def test_large_table_is_never_replicated():
  import jax
  from sass_jax.partition import Partitioner

  cfg = lambda layout, smr=10: ml_collections.ConfigDict(
    {"data": 1, "model": 1, "shard_min_rows": smr, "table_layout": layout}
  )
  p = Partitioner(cfg("auto"), devices=jax.devices()[:1])
  assert p.table_axes(12) == ()  # one device: nothing to split
  with pytest.raises(ValueError, match="table_layout"):
    Partitioner(cfg("rows"), devices=jax.devices()[:1])

  class Fake(Partitioner):  # the shape logic of a (4 x 4) mesh
    def __init__(self, layout, smr=100):
      self.shard_min_rows, self.table_layout = smr, layout
      self.mesh = type("M", (), {"shape": {"data": 4, "model": 4}, "size": 16})()

  assert Fake("auto").table_axes(1024) == ("data", "model")
  assert Fake("model").table_axes(1024) == ("model",)
  assert Fake("auto").table_axes(1020) == ("model",)  # 16 does not divide, 4 does
  assert Fake("auto").table_axes(99) == ()  # below shard_min_rows: replicated
  with pytest.raises(ValueError, match="never replicated.*vocab_pad_to to a multiple of 16"):
    Fake("all").table_axes(1_000_008, "the table user_tower/embed/user_id")
  with pytest.raises(ValueError, match="user_id has 1000002 rows"):
    Fake("auto").table_axes(1_000_002, "the table user_id")


def test_compile_mode_for_a_tpu_topology(tmp_path):
  pytest.importorskip("libtpu")
  (tmp_path / "tiny_compile.py").write_text(TINY_CONFIG)
  wd = tmp_path / "wd"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      str(tmp_path / "tiny_compile.py"),
      "--workdir",
      str(wd),
      "--mode",
      "compile",
    ],
    cwd=REPO,
    env=_env(PYTHONPATH=f"{REPO}:{tmp_path}"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert "| finetune | lazy_adam |" in r.stdout and "compile.json" in r.stdout
  rep = json.loads((wd / "compile.json").read_text())
  assert rep["num_devices"] == 4 and rep["device_kind"].startswith("TPU v5")
  assert rep["mesh"] == {"data": 4, "model": 1} and rep["hbm_bytes"] == 16 << 30
  assert rep["fields"]["source"] == "config.compile" and rep["fields"]["num_scenarios"] == 3
  assert [(s["stage"], s["embedding_optimizer"]) for s in rep["steps"]] == [
    ("finetune", "dense"),
    ("finetune", "lazy_adam"),
  ]
  for s in rep["steps"]:
    m = s["memory"]
    assert (
      m["total_bytes"]
      == (m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] - m["alias_bytes"])
      > 0
    )
    assert s["fits"] and 0 < s["headroom"] < 1 and s["cost"]["flops"] > 0
    assert s["compile_seconds"] > 0 and s["biggest_arrays"]
    assert s["collectives"]["all-reduce"]["count"] > 0  # the masked-gather reductions
    assert s["collective_bytes"] == sum(v["bytes"] for v in s["collectives"].values())
    assert s["table_all_gathers"] == []  # no table is ever all-gathered
    tables = {t["table"]: t for t in s["tables"]}
    assert set(tables) == {
      "user_tower/embed/user_id",
      "user_tower/embed/gender",
      "item_tower/embed/movie_id",
      "item_tower/embed/genres",
    }
    for name in ("user_tower/embed/user_id", "item_tower/embed/movie_id"):
      t = tables[name]  # split over all 4 chips
      assert t["shards"] == 4 and t["per_chip_bytes"] * 4 == t["bytes"], t
      # the compiled program takes the table and its two Adam moments as [rows / 4, 8]
      assert t["hlo_parameters_of_shard_shape"] >= 3, t
    assert tables["user_tower/embed/gender"]["shards"] == 1  # below shard_min_rows
    assert s["table_bytes_per_chip"] == sum(t["per_chip_bytes"] for t in tables.values())
    assert m["argument_bytes"] >= 3 * s["table_bytes_per_chip"]


def _tiny_ml_config(tmp_path, **mesh):
  from configs import test as test_config

  cfg = test_config.get_config()
  cfg.data.dir = str(DATA)
  cfg.pretrain.num_steps = 0
  cfg.train.num_steps, cfg.train.log_every, cfg.checkpoint.every_steps = 3, 1, 3
  for k, v in mesh.items():
    cfg.mesh[k] = v
  return cfg


def test_preflight_refuses_a_step_over_the_memory_limit(tmp_path):
  wd = tmp_path / "wd"
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(wd),
      "--mode",
      "finetune",
      f"--config.data.dir={DATA}",
      "--config.pretrain.num_steps=0",
      "--config.mesh.memory_limit_bytes=100000",
    ],
    cwd=REPO,
    env=_env(JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-5000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) == 1, r.stderr[-3000:]
  msg = err[0]
  assert "the finetune step needs" in msg and "GB per device" in msg and "0.00 GB" in msg
  assert "config.mesh.memory_limit_bytes" in msg and "biggest arrays: " in msg
  assert "lazy_adam" in msg and "config.train.batch_size" in msg
  assert not (wd / "checkpoints").exists()  # refused before anything ran

  # Under the limit the same run trains, on the preflight's compiled step.
  from sass_jax import aot
  from sass_jax.train import loop

  cfg = _tiny_ml_config(tmp_path, memory_limit_bytes=1 << 34)
  data = loop.prepare(cfg, wd)
  model = loop.build_model(cfg, data)
  part = loop.Partitioner(cfg.mesh)
  assert aot.memory_limit(cfg, part) == 1 << 34
  state = loop.train_stage("finetune", cfg, data, model, part, wd, show_progress=False)
  assert int(state.step) == 3
  log = [json.loads(l) for l in (wd / "finetune_log.jsonl").read_text().splitlines()]
  assert [x["step"] for x in log] == [1, 2, 3]


def test_abstract_batch_matches_the_pipeline(tmp_path):
  import numpy as np
  from sass_jax import aot
  from sass_jax.data import pipeline
  from sass_jax.train import loop

  cfg = _tiny_ml_config(tmp_path)
  data = loop.prepare(cfg, tmp_path / "wd")
  for stage in ("pretrain", "finetune"):
    real = pipeline.BatchFn(data, stage, 16, 0)(0)
    abst = aot.abstract_batch(data.user_specs, data.item_specs, stage, 16)
    flat = lambda t: {k: v for k, v in __import__("jax").tree_util.tree_flatten_with_path(t)[0]}
    a, b = flat(real), flat(abst)
    assert a.keys() == b.keys(), stage
    for k in a:
      assert (np.asarray(a[k]).shape, np.asarray(a[k]).dtype) == (b[k].shape, b[k].dtype), k


EQUALITY = textwrap.dedent("""
    import sys
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections
    from jax.sharding import PartitionSpec as P
    from configs import test as test_config
    from sass_jax import aot
    from sass_jax.schema import FieldSpec
    from sass_jax.model.towers import SASS, ModelConfig
    from sass_jax.partition import Partitioner

    assert jax.device_count() == 8
    opt = sys.argv[1]
    user = (FieldSpec("user_id", 200), FieldSpec("gender", 3))
    item = (FieldSpec("movie_id", 120), FieldSpec("genres", 9, multi_hot=3))
    K, B = 3, 32
    cfg = test_config.get_config()
    cfg.model.widths, cfg.model.embed_dim, cfg.model.out_dim = (8,), 4, 8
    cfg.pretrain.batch_size = cfg.train.batch_size = B
    cfg.pretrain.num_steps, cfg.train.num_steps = 10, 10
    cfg.train.embedding_optimizer = opt
    cfg.train.weight_decay = 0.01
    model = SASS(ModelConfig.from_config(cfg.model, user, item, K))

    def batch(stage, seed):
        r = np.random.default_rng(seed)
        u = {"user_id": r.integers(0, 200, B, dtype=np.int32),
             "gender": r.integers(0, 3, B, dtype=np.int32)}
        it = {"movie_id": r.integers(0, 120, B, dtype=np.int32),
              "genres": r.integers(0, 9, (B, 3), dtype=np.int32),
              "genres_mask": r.random((B, 3)) < 0.7}
        b = {"user": u, "item": it, "scenario": r.integers(0, K, B, dtype=np.int32),
             "user_index": u["user_id"].copy(), "item_index": it["movie_id"].copy()}
        if stage == "finetune":
            b["item_logq"] = np.log(r.uniform(0.01, 0.1, B)).astype(np.float32)
        else:
            a = r.integers(0, K, B)
            b["user_views"] = np.stack([a, (a + r.integers(1, K, B)) % K], 1).astype(np.int32)
            a = r.integers(0, K, B)
            b["item_views"] = np.stack([a, (a + r.integers(1, K, B)) % K], 1).astype(np.int32)
        return b

    def run(part, stage):
        fn, _, _, _, init_fn = aot.lower_stage(cfg, stage, model, part, user, item)
        state, _ = part.init(init_fn)
        losses = []
        for i in range(3):
            state, m = fn(state, part.shard_batch(batch(stage, i)))
            losses.append(float(m["loss"]))
        return state, losses

    mesh = lambda d, m, layout: ml_collections.ConfigDict(
        {"data": d, "model": m, "shard_min_rows": 100, "table_layout": layout})
    one = Partitioner(mesh(1, 1, "auto"), devices=jax.devices()[:1])
    eight = Partitioner(mesh(2, 4, "all"))
    for stage in ("pretrain", "finetune"):
        s1, l1 = run(one, stage)
        s8, l8 = run(eight, stage)
        for name, leaf in (("user_id", s8.params["user_tower"]["embed"]["user_id"]),
                           ("movie_id", s8.params["item_tower"]["embed"]["movie_id"])):
            assert leaf.sharding.spec == P(("data", "model"), None), (name, leaf.sharding)
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {leaf.shape[0] // 8}
            assert len(leaf.sharding.device_set) == 8
        for x in jax.tree.leaves(s8.opt_state):    # moments / accumulators split like the tables
            if x.ndim >= 1 and x.shape[0] in (200, 120):
                assert x.sharding.spec[0] == ("data", "model"), x.sharding
        assert s8.params["user_tower"]["embed"]["gender"].sharding.is_fully_replicated
        np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
        assert l1[0] != l1[-1]
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(s1.opt_state), jax.tree.leaves(s8.opt_state)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        print(opt, stage, "losses", l1, "match")
    print("OK")
""")


@pytest.mark.parametrize("optimizer", ["dense", "lazy_adam", "rowwise_adagrad"])
def test_all_device_tables_match_one_device(optimizer):
  _run_on_8_cpu_devices(EQUALITY, optimizer)


PER_CHIP_FLOPS = textwrap.dedent("""
    import jax, ml_collections
    from configs import pod_scale
    from sass_jax import aot
    from sass_jax.model import registry
    from sass_jax.partition import Partitioner

    assert jax.device_count() == 8
    cfg = pod_scale.get_config("sass,2048")
    user, item, k = aot.specs_from_config(cfg.compile)
    model = registry.build(cfg.model, user, item, k)
    mesh = lambda n: ml_collections.ConfigDict({**cfg.mesh.to_dict(), "data": n, "model": 1})
    for stage in ("pretrain", "finetune"):
      for opt in ("lazy_adam", "rowwise_adagrad"):
        flops = {}
        for n in (1, 8):
          part = Partitioner(mesh(n), devices=jax.devices()[:n])
          r = aot.compile_one(cfg, stage, opt, model, part, user, item, None)
          flops[n] = r["cost"]["flops"]
        print(stage, opt, flops)
        # each chip runs the towers on its 256 rows only: about 1/8 of one device's work on
        # the whole batch; with the ids' positions replicated (the global batch's towers on
        # every chip) finetune was 5x that
        assert 8 * flops[8] < 1.2 * flops[1], (stage, opt, flops)
    print("OK")
""")


def test_row_sparse_steps_run_the_towers_on_the_chips_share_of_the_batch():
  """Per-chip FLOPs of a row-sparse step on 8 devices ~ 1/8 of one device's, batch 2048."""
  _run_on_8_cpu_devices(PER_CHIP_FLOPS)
