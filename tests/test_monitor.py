"""TensorBoard events, SIGTERM watch and finiteness helper of sass_jax.train.monitor.

Event files are read back without TensorFlow / tensorboard: the TFRecord framing (length,
masked CRC32C of the length, data, masked CRC32C of the data) is parsed here and each record
decoded with tensorboardX's ``event_pb2.Event``.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from configs import test as test_config
from sass_jax.train import loop, monitor

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"


def read_events(logdir: Path) -> list:
  """Every Event of every ``events.out.tfevents.*`` file directly in ``logdir``."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    buf, i = path.read_bytes(), 0
    while i < len(buf):
      header = buf[i : i + 8]
      (n,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", buf[i + 8 : i + 12])[0] == masked_crc32c(header)
      data = buf[i + 12 : i + 12 + n]
      assert struct.unpack("<I", buf[i + 12 + n : i + 16 + n])[0] == masked_crc32c(data)
      ev = event_pb2.Event()
      ev.ParseFromString(data)
      events.append(ev)
      i += 16 + n
  return events


def scalars(events) -> dict[str, dict[int, float]]:
  out: dict[str, dict[int, float]] = {}
  for ev in events:
    for v in ev.summary.value:
      if v.WhichOneof("value") == "simple_value":
        out.setdefault(v.tag, {})[ev.step] = v.simple_value
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("tb")
  cfg = test_config.get_config("sass_base")
  cfg.data.dir = str(DATA)
  cfg.train.num_steps = 12
  cfg.train.log_every = 2
  cfg.checkpoint.every_steps = 6
  metrics = loop.train(cfg, wd, show_progress=False)
  return cfg, wd, metrics


def test_training_scalars_equal_the_jsonl_log(run):
  cfg, wd, _ = run
  logged = [json.loads(l) for l in (wd / "finetune_log.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [2, 4, 6, 8, 10, 12]
  sc = scalars(read_events(wd / "tb" / "finetune"))
  for key in ("loss", "learning_rate", "grad_norm", "param_norm", "samples_per_s"):
    tb = sc[f"train/{key}"]
    assert sorted(tb) == [2, 4, 6, 8, 10, 12], key
    for m in logged:
      assert np.float32(m[key]) == np.float32(tb[m["step"]]), (key, m["step"])
  # learning rate of each step's update: linear warm-up over 5 updates to 1e-3, then cosine.
  lr = {m["step"]: m["learning_rate"] for m in logged}
  assert lr[2] == pytest.approx(1e-3 * 1 / 5) and lr[4] == pytest.approx(1e-3 * 3 / 5)
  assert lr[6] == pytest.approx(1e-3)
  assert 1e-4 <= lr[12] < lr[8] < 1e-3
  assert len({round(m["loss"], 6) for m in logged}) == len(logged)  # really per-step values


def test_eval_metrics_per_scenario(run):
  cfg, wd, metrics = run
  sc = scalars(read_events(wd / "tb" / "finetune"))
  on_disk = json.loads((wd / "metrics.json").read_text())
  assert set(on_disk["scenarios"]) == {"age_under25", "age_25_34", "age_35plus"}
  for name, block in [*on_disk["scenarios"].items(), ("overall", on_disk["overall"])]:
    for m in ("recall@50", "ndcg@50", "hitrate@20", "auc"):
      # TensorBoard tags allow [A-Za-z0-9_./-]: tensorboardX writes 'recall@50' as 'recall_50'.
      tag = f"eval/{name}/{m.replace('@', '_')}"
      assert sc[tag] == {cfg.train.num_steps: np.float32(block[m])}, tag


def test_config_logged_once_as_text_and_hparams(run):
  cfg, wd, _ = run
  events = read_events(wd / "tb" / "finetune")
  texts = [v for ev in events for v in ev.summary.value if v.tag.startswith("config")]
  assert len(texts) == 1
  body = texts[0].tensor.string_val[0].decode()
  assert json.loads(body.strip("`\n"))["train"]["num_steps"] == 12
  plugins = {v.metadata.plugin_data.plugin_name for ev in events for v in ev.summary.value}
  assert "hparams" in plugins


def test_resumed_writer_purges_later_events(tmp_path):
  with monitor.Monitor(tmp_path, "pretrain", start_step=7, config={"a": 1}) as mon:
    mon.log(8, {"loss": 1.5, "step": 8, "flag": True})
  events = read_events(tmp_path / "tb" / "pretrain")
  starts = [
    ev.step
    for ev in events
    if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START
  ]
  assert starts == [7]
  assert scalars(events) == {"train/loss": {8: 1.5}}  # no 'step' / bool scalar, no config
  assert not any(v.tag == "config" for ev in events for v in ev.summary.value)


def test_undefined_eval_metric_left_out(tmp_path):
  """AUC is NaN on implicit data (no negatives): no NaN scalar is written, the rest are."""
  metrics = {
    "scenarios": {"sports": {"recall@50": 0.25, "auc": float("nan"), "num_users": 3}},
    "overall": {"recall@50": 0.5, "auc": float("nan")},
  }
  with monitor.Monitor(tmp_path, "finetune", config={"a": 1}) as mon:
    mon.log_eval(10, metrics)
  assert scalars(read_events(tmp_path / "tb" / "finetune")) == {
    "eval/sports/recall_50": {10: 0.25},
    "eval/sports/num_users": {10: 3.0},
    "eval/overall/recall_50": {10: 0.5},
  }


def test_first_nonfinite():
  assert monitor.first_nonfinite({"loss": 1.0, "grad_norm": 2.0, "param_norm": 3.0}) is None
  assert monitor.first_nonfinite({"loss": 1.0, "grad_norm": float("inf")}) == "grad_norm"
  assert monitor.first_nonfinite({"loss": float("nan"), "grad_norm": float("nan")}) == "loss"
  assert monitor.first_nonfinite({"other": float("nan")}) is None


def test_preemption_watch_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  watch = monitor.PreemptionWatch()
  with watch:
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the watch
    assert watch.should_stop(2) and watch.flag
  assert signal.getsignal(signal.SIGTERM) is before
