"""``bench_input`` (--mode bench_input) on a tiny synthetic config: the JSON's shape, not speed."""
import json
import math

import pytest

from configs import synthetic
from sass_jax import bench


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
  out = bench.bench_input(_tiny_cfg(), wd, num_batches=5, warmup=2, repeats=2,
                          config_name="tiny")
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
  for k in ("input_samples_per_s", "input_placed_samples_per_s", "step_samples_per_s",
            "input_over_step", "input_placed_over_step", "step_compile_s"):
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
      out["input_samples_per_s"] / out["step_samples_per_s"])


def test_rejects_bad_counts(tmp_path):
  with pytest.raises(ValueError, match="num_batches"):
    bench.bench_input(_tiny_cfg(), tmp_path, num_batches=0)
