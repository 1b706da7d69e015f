"""The benchmark scripts of sass_jax/bench beyond --mode bench: the scenario-scaling sweep and the
config loading that the PyTorch comparison shares (BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest

from sass_jax.bench import scaling, vs_pytorch

SMALL = ["data.num_rows=4000", "data.num_users=300", "data.num_items=200"]


def test_load_config_applies_overrides_and_names_a_missing_field():
  cfg = vs_pytorch.load_config("configs/synthetic.py", 128, SMALL + ["model.tau=0.3"])
  assert cfg.train.batch_size == cfg.pretrain.batch_size == 128
  assert cfg.data.num_rows == 4000 and cfg.model.tau == 0.3
  with pytest.raises(KeyError, match="model.tua"):
    vs_pytorch.load_config("configs/synthetic.py", None, ["model.tua=1"])


def test_scaling_flops_only_counts_each_scenario_path(tmp_path):
  """With negatives 'all' every in-batch item is encoded in each of the K scenarios, so SASS's
  flops per sample grow with K; with 'same_scenario' each item is encoded once."""
  args = ["--workdir", str(tmp_path), "--ks", "2,4", "--models", "sass", "--batch_size", "64"]
  args += ["--flops_only"] + [x for o in SMALL for x in ("--override", o)]
  scaling.main(args)
  out = json.loads((tmp_path / "scaling.json").read_text())
  got = {(r["k"], r["negatives"]): r["flops_per_sample"] for r in out["rows"]}
  assert set(got) == {(2, "all"), (2, "same_scenario"), (4, "all"), (4, "same_scenario")}
  assert got[(4, "all")] > 1.3 * got[(2, "all")]
  assert got[(4, "same_scenario")] < 1.1 * got[(2, "same_scenario")]
  assert got[(4, "same_scenario")] < got[(4, "all")]
