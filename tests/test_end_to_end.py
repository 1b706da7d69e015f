"""End to end on the real MovieLens sample: train, evaluate, restore, CLI (docs/design.md §2, §5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from sass_jax.data import store
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"


def _cfg(arg="sass"):
  c = test_config.get_config(arg)
  c.data.dir = str(DATA)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = tmp_path_factory.mktemp("e2e")
  cfg = _cfg()
  metrics = loop.train(cfg, wd, show_progress=False)
  return cfg, wd, metrics


def test_metrics_file_shape(trained):
  cfg, wd, metrics = trained
  on_disk = json.loads((wd / "metrics.json").read_text())
  assert on_disk == json.loads(json.dumps(metrics))
  assert on_disk["model"] == "sass"
  assert set(on_disk["scenarios"]) == {"age_under25", "age_25_34", "age_35plus"}
  for block in [*on_disk["scenarios"].values(), on_disk["overall"]]:
    for k in (20, 50, 100):
      for m in ("recall", "hitrate", "ndcg"):
        assert 0.0 <= block[f"{m}@{k}"] <= 1.0
    assert 0.0 < block["auc"] < 1.0
  pop = on_disk["baselines"]["popularity"]
  assert set(pop["scenarios"]) == set(on_disk["scenarios"]) and "recall@50" in pop["overall"]
  # Evaluated users per scenario = users with a test positive in that scenario.
  data = store.open_store(wd / "data")
  inter = {c: np.asarray(v) for c, v in data.inter.items()}
  for k, name in enumerate(data.scenario_names):
    sel = (inter["split"] == 2) & (inter["label"] > 0.5) & (inter["scenario"] == k)
    assert on_disk["scenarios"][name]["num_users"] == len(np.unique(inter["user"][sel]))
    assert on_disk["scenarios"][name]["num_exposures"] == int(
      ((inter["split"] == 2) & (inter["scenario"] == k)).sum()
    )
  # Both stages ran and logged; fine-tuning started from the pre-trained checkpoint.
  assert (wd / "checkpoints" / "pretrain").is_dir() and (wd / "checkpoints" / "finetune").is_dir()
  last = json.loads((wd / "finetune_log.jsonl").read_text().splitlines()[-1])
  assert last["step"] == cfg.train.num_steps and np.isfinite(last["loss"])


def test_restore_reproduces_metrics(trained):
  cfg, wd, metrics = trained
  again = loop.evaluate_workdir(cfg, wd)
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(metrics))


def test_rerun_resumes_instead_of_retraining(trained):
  cfg, wd, metrics = trained
  before = (wd / "finetune_log.jsonl").read_text()
  again = loop.train(cfg, wd, show_progress=False)  # both stages already at num_steps
  assert (wd / "finetune_log.jsonl").read_text() == before
  assert again["overall"] == metrics["overall"]


def test_short_run_learns_beyond_random(tmp_path):
  """Overall Recall@50 at least 3x the expected Recall@50 of a random ranking."""
  cfg = _cfg("sass_base")
  cfg.train.num_steps = 300
  cfg.train.batch_size = 256
  metrics = loop.train(cfg, tmp_path, show_progress=False)
  data = store.open_store(tmp_path / "data")
  inter = {c: np.asarray(v) for c, v in data.inter.items()}
  pos = inter["label"] > 0.5
  expected = []
  for k in range(data.num_scenarios):
    test = (inter["split"] == 2) & pos & (inter["scenario"] == k)
    train = (inter["split"] == 0) & pos & (inter["scenario"] == k)
    for u in np.unique(inter["user"][test]):
      p = set(inter["item"][test & (inter["user"] == u)])
      masked = set(inter["item"][train & (inter["user"] == u)])
      n = data.num_items - len(masked)
      # A random ranking of n candidates puts each positive in the top 50 w.p. 50 / n.
      expected.append(min(1.0, 50 / n) * len(p - masked) / len(p))
  random_recall = float(np.mean(expected))
  assert 0.01 < random_recall < 0.02
  assert metrics["overall"]["recall@50"] >= 3 * random_recall, (metrics["overall"], random_recall)


def test_cli_rejects_unknown_key(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(tmp_path),
      "--mode",
      "prepare",
      "--config.train.num_stepz=3",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode != 0
  assert "num_stepz" in r.stderr
  assert not (tmp_path / "data").exists()


def test_cli_prepare_writes_manifest(tmp_path):
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(tmp_path),
      "--mode",
      "prepare",
      f"--config.data.dir={DATA}",
    ],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=str(REPO)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  m = json.loads((tmp_path / "data" / "manifest.json").read_text())
  assert m["rows_read"]["ratings_sample_100k.dat"] == 100_000
  assert m["rows_kept"] == {"ratings": 100_000, "users": 5958, "movies": 3312}
  assert m["split_counts"] == {"train": 80_000, "valid": 10_000, "test": 10_000}
  assert set(m["sources"]) == {"users.dat", "movies.dat", "ratings_sample_100k.dat"}
