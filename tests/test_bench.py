"""``bench_input`` (--mode bench_input) on a tiny synthetic config: the JSON's shape, not speed."""

import json
import math

import pytest

from configs import synthetic
from sass_jax.bench import throughput as bench


def _tiny_cfg():
  c = synthetic.get_config("sass")
  c.data.num_rows, c.data.num_users, c.data.num_items = 2_000, 100, 80
  c.model.embed_dim, c.model.scenario_dim, c.model.widths = 4, 4, (16, 8)
  c.model.out_dim, c.model.bias_hidden = 8, 4
  c.train.batch_size, c.train.num_steps, c.train.warmup_steps = 16, 50, 2
  return c


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  wd = tmp_path_factory.mktemp("bench")
  out = bench.bench_input(_tiny_cfg(), wd, num_batches=5, warmup=2, repeats=2, config_name="tiny")
  return wd, out


def test_json_written_and_returned(result):
  wd, out = result
  assert json.loads((wd / "bench_input.json").read_text()) == json.loads(json.dumps(out))


def test_every_field_present_and_positive(result):
  _, out = result
  assert out["config"] == "tiny" and out["batch_size"] == 16 and out["num_batches"] == 5
  assert out["data"]["rows"] == 2_000 and out["data"]["name"] == "synthetic"
  m = out["machine"]
  for k in ("platform", "device_kind", "jax_version"):
    assert isinstance(m[k], str) and m[k]
  assert m["cpu_count"] >= 1 and m["num_devices"] >= 1
  for k in (
    "input_samples_per_s",
    "input_placed_samples_per_s",
    "step_samples_per_s",
    "input_over_step",
    "input_placed_over_step",
    "step_compile_s",
  ):
    assert _positive(out[k]), k
  assert math.isfinite(out["step_final_loss"])
  assert isinstance(out["input_ge_2x_step"], bool)
  assert out["input_ge_2x_step"] == (out["input_over_step"] >= 2.0)
  # Both streams for the input measurements (3 scenarios), the fine-tune stream for the step.
  assert set(out["input"]) == set(out["input_placed"]) == {"finetune", "pretrain"}
  assert set(out["step"]) == {"finetune"}


def test_stats_consistent(result):
  _, out = result
  bs = out["batch_size"]
  for section in ("input", "input_placed", "step"):
    for stream, s in out[section].items():
      b, sp = s["batches_per_s"], s["samples_per_s"]
      assert len(b["runs"]) == len(sp["runs"]) == out["repeats"]
      for k in ("median", "min", "max"):
        assert _positive(b[k]) and _positive(sp[k]), (section, stream, k)
        assert sp[k] == pytest.approx(b[k] * bs, rel=1e-12)
      assert b["min"] <= b["median"] <= b["max"]
      for rb, rs in zip(b["runs"], sp["runs"]):
        assert _positive(rb) and rs == pytest.approx(rb * bs, rel=1e-12)
  assert out["input_samples_per_s"] == out["input"]["finetune"]["samples_per_s"]["median"]
  assert out["step_samples_per_s"] == out["step"]["finetune"]["samples_per_s"]["median"]
  assert out["input_over_step"] == pytest.approx(
    out["input_samples_per_s"] / out["step_samples_per_s"]
  )


def test_rejects_bad_counts(tmp_path):
  with pytest.raises(ValueError, match="num_batches"):
    bench.bench_input(_tiny_cfg(), tmp_path, num_batches=0)


# ---- --mode bench ------------------------------------------------------------------
BENCH_FLAGS = [
  "--config.bench.steps=2",
  "--config.bench.repeats=2",
  "--config.bench.warmup=1",
  "--config.bench.batches=2",
  "--config.bench.loop_steps=2",
  "--config.bench.input_batches=2",
  "--config.bench.eval_items=256",
  "--config.bench.eval_users=128",
  "--config.bench.full_eval_max_pairs=0",
  "--config.bench.probe_matmul_n=128",
  "--config.bench.probe_bytes=1000000",
  "--config.bench.embedding_optimizers=('dense','lazy_adam')",
]


def _stat(s, lo=0.0):
  assert set(s) == {"median", "min", "max", "runs"}
  assert s["min"] <= s["median"] <= s["max"] and all(_positive(x) for x in s["runs"])
  return s["median"]


@pytest.fixture(scope="module")
def bench_cli(tmp_path_factory, ml_sample_dir):
  """``python -m sass_jax.main --mode bench`` on the tiny MovieLens config, as a subprocess."""
  import os
  import subprocess
  import sys
  from pathlib import Path

  root = Path(__file__).resolve().parents[1]
  wd = tmp_path_factory.mktemp("bench_cli")
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(wd),
      "--mode",
      "bench",
      f"--config.data.dir={ml_sample_dir}",
    ]
    + BENCH_FLAGS,
    cwd=root,
    env={**os.environ, "PYTHONPATH": str(root)},
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads((wd / "bench.json").read_text()), p.stdout


def test_bench_cli_json_every_field(bench_cli):
  out, stdout = bench_cli
  assert out["config"].endswith("configs/test.py")
  assert out["data"]["name"] == "movielens" and out["data"]["scenarios"] == 3
  assert out["model"]["parameters"] > out["model"]["embedding_rows"] > 0
  assert out["settings"]["steps"] == 2 and out["settings"]["repeats"] == 2
  assert set(out["steps"]) == {"pretrain/dense", "finetune/dense", "finetune/lazy_adam"}
  for name, r in out["steps"].items():
    assert r["batch_size"] == 64, name
    ms, sps = _stat(r["step_ms"]), _stat(r["samples_per_s"])
    assert len(r["step_ms"]["runs"]) == 2
    # samples/s of each run = batch / seconds per step of that run
    for a, b in zip(r["step_ms"]["runs"], r["samples_per_s"]["runs"]):
      assert b == pytest.approx(64 / (a / 1e3), rel=1e-9)
    assert _positive(r["compile_s"]) and math.isfinite(r["final_loss"])
    assert _positive(r["cost"]["flops"]) and _positive(r["cost"]["bytes_accessed"])
    assert r["memory"]["argument_size_in_bytes"] > 0
    assert r["host_peak_rss_bytes"] > 0
    assert r["peak_device_bytes"] is None or r["peak_device_bytes"] > 0
    f = r["floor"]
    assert f["floor_ms"] == max(f["compute_ms"], f["state_ms"]) > 0 and f["xla_bytes_ms"] > 0
    assert f["bound"] == ("compute" if f["compute_ms"] >= f["state_ms"] else "memory")
    assert r["step_over_floor"] == pytest.approx(ms / f["floor_ms"])
    # The least traffic: arguments read + outputs written (fewer for the row-sparse tables).
    mem = r["memory"]
    full = mem["argument_size_in_bytes"] + mem["output_size_in_bytes"]
    if name.endswith("/dense"):
      assert f["state_bytes"] == full
    else:
      assert 0 < f["state_bytes"] < full
  assert out["steps"]["finetune/lazy_adam"]["touched_rows"] > 0
  assert set(out["sparse_speedup"]) == {"lazy_adam"} and _positive(
    out["sparse_speedup"]["lazy_adam"]
  )
  chk = out["sparse_check"]["lazy_adam"]
  assert chk["untouched_rows_unchanged"] is True and chk["untouched_rows_changed"] == 0
  assert chk["max_abs_diff_touched_rows"] <= 1e-5 and chk["max_abs_diff_other_params"] <= 1e-5
  assert chk["touched_rows"] > 0 and chk["equal_within_1e-5"] is True
  pr = out["probe"]
  for k in ("matmul_float32_flops_per_s", "matmul_bfloat16_flops_per_s", "copy_bytes_per_s"):
    assert _positive(pr[k])
  assert out["input_source"] == out["input"]["source"] == "grain"
  _stat(out["input"]["host"]), _stat(out["input"]["placed"])
  sps = out["steps"]["finetune/dense"]["samples_per_s"]["median"]
  assert out["input_over_step"] == pytest.approx(out["input"]["host"]["median"] / sps)
  assert out["loop"]["embedding_optimizer"] == "dense" and out["loop"]["steps"] == 2
  assert out["loop_over_step"] == pytest.approx(_stat(out["loop"]["samples_per_s"]) / sps)
  assert set(out["table_update"]) == {"rows", "ids", "dense", "lazy_adam"}
  assert out["table_update"]["rows"] == out["model"]["embedding_rows"]
  assert out["table_update"]["ids"] == 64 * 13  # 5 user fields + movie_id + 6 genres + year
  for o in ("dense", "lazy_adam"):
    _stat(out["table_update"][o]["update_ms"])
  assert out["table_update_speedup"]["lazy_adam"] == pytest.approx(
    out["table_update"]["dense"]["update_ms"]["median"]
    / out["table_update"]["lazy_adam"]["update_ms"]["median"]
  )
  ev = out["eval"]
  assert 1 <= ev["user_chunk"] <= 1024
  assert ev["encode_items"]["items"] == 256 and ev["encode_items"]["scenarios"] == 3
  assert ev["encode_users"]["users"] == 128 and ev["topk"]["k"] == 100
  assert ev["topk"]["users"] == 128 and ev["topk"]["corpus"] == out["data"]["items"]
  for k in ("encode_items", "encode_users", "topk"):
    assert _positive(ev[k]["items_per_s" if k == "encode_items" else "users_per_s"])
  assert ev["full_evaluate_s"] is None and "full_eval_max_pairs" in ev["full_evaluate_skipped"]
  m = out["machine"]
  assert m["platform"] == "cpu" and len(m["load_avg_start"]) == 3 and _positive(out["total_s"])
  assert "| finetune/lazy_adam | 64 |" in stdout and "dense / lazy_adam step time" in stdout


def test_bench_rejects_bad_settings(tmp_path):
  from configs import test as test_cfg

  c = test_cfg.get_config()
  c.bench.embedding_optimizers = ("dense", "sgd")
  with pytest.raises(ValueError, match="config.bench.embedding_optimizers"):
    bench.bench(c, tmp_path)
  c = test_cfg.get_config()
  c.bench.steps = 0
  with pytest.raises(ValueError, match="config.bench.steps"):
    bench.bench(c, tmp_path)


# ---- the PyTorch reference computes the same model ---------------------------------------------
def test_torch_reference_same_losses_and_adamw_step():
  """Same params and batch: the torch reference's losses equal sass_jax's, and one AdamW step
  of each (weight decay on, mid-warm-up learning rate) moves the params to the same values."""
  pytest.importorskip("torch")
  import flax.linen as nn
  import jax
  import ml_collections
  import numpy as np

  from sass_jax.bench import torch_reference as tr
  from sass_jax.train import steps
  from test_sparse import _batch, _model  # tests/ is on sys.path (pytest rootdir-less import)

  model = _model()
  sc = ml_collections.ConfigDict({"learning_rate": 0.05, "warmup_steps": 4, "weight_decay": 0.1})
  tx = steps.make_optimizer(sc, 20)
  init = steps.make_init_fn(model, tx, _batch(0), seed=1)
  state = jax.jit(lambda: nn.meta.unbox(init()))()
  params = jax.device_get(state.params)
  tm = tr.TorchSASS.from_model_config(model.cfg)
  tm.load_flax_params(params)
  pb = _batch(2, "pretrain")
  for pairs in ("scenario_views", "user_item"):
    lj = steps.pretrain_loss(model, state.params, pb, state.rng, 0.1, pairs)[0]
    lt = tr.pretrain_loss(tm, tr.to_torch(jax.device_get(pb)), 0.1, pairs)
    np.testing.assert_allclose(float(lt.detach()), float(lj), rtol=1e-5)
  # Two fine-tune steps each (the first at learning rate 0 of the warm-up).
  jstep = jax.jit(steps.make_finetune_step(model, tx, 0.2, 1.0))
  tstep = tr.make_step(tm, "finetune", 0.2, 0.05, 20, 4, 0.1, 1.0)
  for i in range(2):
    b = _batch(3 + i)
    state, m = jstep(state, b)
    lt = tstep(tr.to_torch(jax.device_get(b)))
    np.testing.assert_allclose(float(lt), float(m["loss"]), rtol=1e-5)
  moved = jax.device_get(state.params)
  got = {
    "scenario_embedding": tm.scenario_embedding,
    "user_tower/embed/user_id": tm.user_tower.embed["user_id"],
    "item_tower/mlsat_1/update_gate/kernel": tm.item_tower.layers[1].update_gate.kernel,
    "user_tower/mlsat_0/scenario/kernel": tm.user_tower.layers[0].scenario.kernel,
    "item_tower/bias_out/bias": tm.item_tower.bias_out.bias,
  }
  for path, t in got.items():
    want = moved
    for k in path.split("/"):
      want = want[k]
    before = params
    for k in path.split("/"):
      before = before[k]
    assert np.abs(np.asarray(want) - np.asarray(before)).max() > 1e-3, path  # it moved
    np.testing.assert_allclose(t.detach().numpy(), want, rtol=1e-4, atol=1e-6, err_msg=path)


def test_torch_reference_bfloat16_runs_its_towers_under_autocast():
  """With model.compute_dtype='bfloat16' the reference's towers run under torch.autocast: its
  losses differ from its float32 losses and agree with sass_jax's bfloat16 losses within
  bfloat16 rounding (1%), so vs_pytorch compares mixed precision with mixed precision."""
  pytest.importorskip("torch")
  import dataclasses

  import flax.linen as nn
  import jax
  import ml_collections
  import numpy as np

  from sass_jax.bench import torch_reference as tr
  from sass_jax.model.towers import SASS
  from sass_jax.train import steps
  from test_sparse import _batch, _model

  m32 = _model()
  m16 = SASS(dataclasses.replace(m32.cfg, compute_dtype="bfloat16"))
  sc = ml_collections.ConfigDict({"learning_rate": 0.05, "warmup_steps": 4, "weight_decay": 0.1})
  init = steps.make_init_fn(m32, steps.make_optimizer(sc, 20), _batch(0), seed=1)
  state = jax.jit(lambda: nn.meta.unbox(init()))()
  params = jax.device_get(state.params)
  t32, t16 = tr.TorchSASS.from_model_config(m32.cfg), tr.TorchSASS.from_model_config(m16.cfg)
  assert (t32.compute_dtype, t16.compute_dtype) == ("float32", "bfloat16")
  for t in (t32, t16):
    t.load_flax_params(params)
  b = _batch(3)
  tb = tr.to_torch(jax.device_get(b))
  l32 = float(tr.finetune_loss(t32, tb, 0.2, 1.0).detach())
  l16 = float(tr.finetune_loss(t16, tb, 0.2, 1.0).detach())
  j16 = float(steps.finetune_loss(m16, state.params, b, state.rng, 0.2, 1.0)[0])
  assert l16 != l32
  np.testing.assert_allclose(l16, j16, rtol=1e-2)
  with pytest.raises(ValueError, match="compute_dtype"):
    tr.TorchSASS(*([None] * 4), 2, compute_dtype="float16")


# ---- device-resident data (config.train.resident_on_device) ----------------------------------
def test_resident_sampler_batches_match_the_data(tmp_path, ml_sample_dir):
  """Batches drawn on the device have BatchFn's keys, shapes and dtypes, are consistent with
  the store (features of the sampled user / item rows), cover every stream row once per epoch,
  and are a pure function of (seed, index)."""
  import jax
  import numpy as np

  from configs import test as test_cfg
  from sass_jax.data import pipeline
  from sass_jax.data.resident import ResidentSampler
  from sass_jax.train import loop

  c = test_cfg.get_config()
  c.data.dir = str(ml_sample_dir)
  data = loop.prepare(c, tmp_path)
  for stream in ("finetune", "pretrain"):
    ref = pipeline.BatchFn(data, stream, 512, 0)(0)
    s = ResidentSampler(data, stream, 512, seed=3)
    b = jax.device_get(s(0))
    assert jax.tree.structure(b) == jax.tree.structure(ref)
    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(ref)):
      assert x.shape == y.shape and x.dtype == y.dtype
    u, it = b["user_index"], b["item_index"]
    for f, col in data.users.items():
      np.testing.assert_array_equal(b["user"][f], np.asarray(col)[u])
    for f, col in data.items.items():
      np.testing.assert_array_equal(b["item"][f], np.asarray(col)[it])
    if stream == "finetune":
      np.testing.assert_array_equal(b["item_logq"], pipeline.item_logq(data)[it])
    else:
      v = b["user_views"]
      assert ((v >= 0) & (v < data.num_scenarios)).all() and (v[:, 0] != v[:, 1]).all()
    np.testing.assert_array_equal(
      jax.device_get(ResidentSampler(data, stream, 512, 3)(5))["item_index"],
      jax.device_get(s(5))["item_index"],
    )
  # One epoch of the fine-tune stream: every (user, item, scenario) row exactly once.
  rows = data.rows("train", labeled_positive=True)
  inter = {k: np.asarray(v)[rows] for k, v in data.inter.items()}
  bs = 97
  s = ResidentSampler(data, "finetune", bs, seed=1)
  n_batches = -(-len(rows) // bs)
  got = [jax.device_get(next(s)) for _ in range(n_batches)]
  assert s.get_state() == {"sampler": "resident", "next_index": n_batches}
  key = lambda u, i, k: np.asarray(u, np.int64) * 10**7 + np.asarray(i) * 10 + np.asarray(k)
  first_epoch = np.concatenate([key(g["user_index"], g["item_index"], g["scenario"]) for g in got])[
    : len(rows)
  ]
  np.testing.assert_array_equal(
    np.sort(first_epoch), np.sort(key(inter["user"], inter["item"], inter["scenario"]))
  )
