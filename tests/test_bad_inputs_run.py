"""Nothing silently wrong on the run side: workdir lock, atomic export, strict evaluation step,
evaluation protocol holes, and file-system failures as one clear line.

One tiny run (configs/test.py:sass_base, 20 fine-tuning steps, checkpoints at 10 and 20) is
shared by the module; tests that change it work on copies. Faults are run as subprocesses of
``python -m sass_jax.main`` where the command line (exit code, stderr) is what is tested.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from sass_jax import config_check, export
from sass_jax.data.store import PreparedData
from sass_jax.eval import evaluate as ev
from sass_jax.eval import metrics as M
from sass_jax.train import loop
from test_eval_corpus import Lookup

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # sass_jax.main's logging format
PROGRESS = re.compile(r"^\s*(pretrain|finetune):\s+\d+%")  # tqdm lines


def _cfg(arg="sass_base"):
  cfg = test_config.get_config(arg)
  cfg.data.dir = str(DATA)
  cfg.train.num_steps = 20
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
  """A finished tiny run: fine-tuning checkpoints at steps 10 and 20, metrics.json."""
  wd = tmp_path_factory.mktemp("trained")
  loop.train(_cfg(), wd, show_progress=False)
  assert loop.saved_steps(wd) == {"finetune": [10, 20]}
  return wd


def _copy(trained, tmp_path) -> Path:
  wd = tmp_path / "wd"
  shutil.copytree(trained, wd)
  return wd


def _ckpt_dir(wd) -> Path:
  return Path(wd) / "checkpoints" / "finetune"


def _snapshot(root) -> dict[str, str]:
  """relative path -> sha256 of every file under ``root`` (directories as '<dir>')."""
  root = Path(root)
  out = {}
  for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
  return out


def _cli(env, workdir, *args, config="configs/test.py:sass_base", max_file_size=None):
  """Run the CLI; ``max_file_size``: cap every file it writes at that many bytes
  (RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail with EFBIG; both survive exec)."""
  pre = [sys.executable]
  if max_file_size:
    pre += [
      "-c",
      "import os, resource, signal, sys; "
      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
      f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_size}, {max_file_size})); "
      "os.execv(sys.executable, [sys.executable] + sys.argv[1:])",
    ]
  return subprocess.run(
    [
      *pre,
      "-m",
      "sass_jax.main",
      "--config",
      config,
      "--workdir",
      str(workdir),
      f"--config.data.dir={DATA}",
      *args,
    ],
    cwd=REPO,
    env=dict(env, SASS_JAX_DEBUG="0"),
    capture_output=True,
    text=True,
    timeout=300,
  )


_LOOP_CLOSED = "RuntimeError: Event loop is closed"


def _non_log_lines(stderr: str) -> list[str]:
  """stderr's lines that are neither log records nor progress bars, without the tracebacks
  that end in 'Event loop is closed' (orbax's background threads calling into an asyncio loop
  that the failed step closed; they carry no information for the user, and whether they
  appear depends on thread timing). Any other traceback line is kept, so it fails the test."""
  lines = [
    l for l in stderr.splitlines() if l.strip() and not LOG_LINE.match(l) and not PROGRESS.match(l)
  ]
  out, block = [], []
  for l in lines:
    if l.startswith(
      (
        "Traceback (most recent call last)",
        "Exception in thread",
        "Exception ignored in",
        "During handling of the above exception",
        "The above exception was the direct cause",
      )
    ) or l.startswith((" ", "\t")):
      block.append(l)
      continue
    if l.strip() == _LOOP_CLOSED and block:
      block = []  # the whole traceback was this echo
      continue
    out += block + [l]
    block = []
  return out + block


# --------------------------------------------------------------------- atomic export


def test_export_cut_short_leaves_the_previous_export_whole(trained, tmp_path, monkeypatch):
  wd = _copy(trained, tmp_path)
  cfg = _cfg()
  # The previous export is of step 10 (step 20 moved away meanwhile).
  shutil.move(_ckpt_dir(wd) / "20", tmp_path / "step20")
  out = export.export_workdir(cfg, wd)
  shutil.move(tmp_path / "step20", _ckpt_dir(wd) / "20")
  assert json.loads((out / "manifest.json").read_text())["checkpoint"]["step"] == 10
  before = _snapshot(out)
  calls = []
  real = export.write_items_parquet

  def disk_full_on_second_scenario(*a, **k):
    calls.append(1)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(*a, **k)

  monkeypatch.setattr(export, "write_items_parquet", disk_full_on_second_scenario)
  with pytest.raises(OSError, match="No space left"):
    export.export_workdir(cfg, wd)
  assert len(calls) == 2
  assert _snapshot(out) == before  # step 10's export, every byte; nothing of step 20
  assert sorted(p.name for p in wd.iterdir() if p.name.startswith(".export")) == []
  # What an export killed midway leaves (a temporary sibling) is removed by the next one.
  monkeypatch.setattr(export, "write_items_parquet", real)
  (wd / ".export.tmp-stale").mkdir()
  (wd / ".export.tmp-stale" / "manifest.json").write_text("{}")
  export.export_workdir(cfg, wd)
  assert json.loads((out / "manifest.json").read_text())["checkpoint"]["step"] == 20
  assert sorted(p.name for p in wd.iterdir() if p.name.startswith(".export")) == []


def test_exported_encoder_rejects_out_of_range_inputs(trained, tmp_path):
  cfg = _cfg()
  out = export.export_workdir(cfg, trained, tmp_path / "export")
  man = json.loads((out / "manifest.json").read_text())
  data = loop.prepare(cfg, trained)
  ranges = man["user_encoder"]["valid_ranges"]
  assert ranges["scenario"] == [0, 3]
  assert ranges["features"] == {s.name: [0, s.vocab_size] for s in data.user_specs}
  enc = export.load_user_encoder(out)
  feats = export.user_features(data, data.user_raw_ids[:2])
  assert np.isfinite(enc(feats, [0, 2])).all()
  vocab = {s.name: s.vocab_size for s in data.user_specs}["user_id"]
  bad = dict(feats, user_id=np.array([vocab, 1], np.int32))
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"user feature 'user_id' must lie in [0, {vocab}) (its vocabulary; 0 is the unknown "
      f"value), got {vocab} in row 0"
    ),
  ):
    enc(bad, [0, 0])
  # The serialised function itself never returns a normal-looking vector for such a row.
  args = {n: np.asarray(bad[n]) for n in enc.feature_names}
  raw = np.asarray(enc.exported.call(args, np.zeros(2, np.int32)))
  assert np.isnan(raw[0]).all() and np.isfinite(raw[1]).all()


# --------------------------------------------------------------------- workdir lock


def _last_logged_step(wd) -> int:
  p = Path(wd) / "finetune_log.jsonl"
  if not p.exists():
    return 0
  return max(
    (json.loads(l)["step"] for l in p.read_text().splitlines() if l.endswith("}")), default=0
  )


def test_second_run_on_a_busy_workdir_fails_at_once(env, tmp_path):
  wd = tmp_path / "wd"
  first = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py:sass_base",
      "--workdir",
      str(wd),
      f"--config.data.dir={DATA}",
      "--mode",
      "finetune",
      "--config.train.num_steps=100000",
      "--config.train.log_every=1",
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 240
    while _last_logged_step(wd) < 11:  # step 10 checkpointed: eval has a step to read
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline, "run too slow"
      time.sleep(0.05)
    assert (wd / ".lock").read_text().strip() == str(first.pid)
    for mode in ("prepare", "eval", "finetune"):
      r = _cli(env, wd, "--mode", mode)
      assert r.returncode == 1, (mode, r.stderr[-3000:])
      assert _non_log_lines(r.stderr) == [f"error: {wd} is in use by pid {first.pid}"], mode
      assert "prepar" not in r.stderr and "restored" not in r.stderr
  finally:
    first.send_signal(signal.SIGTERM)  # checkpoints and exits 0
    err = first.communicate(timeout=120)[1]
  assert first.returncode == 0, err[-3000:]
  assert "Traceback" not in err
  # The lock went with the process: the next run takes it.
  r = _cli(env, wd, "--mode", "eval", "--config.train.num_steps=100000")
  assert r.returncode == 0, r.stderr[-3000:]


# --------------------------------------------------------------------- eval never falls back


def test_eval_refuses_an_unreadable_latest_step(env, trained, tmp_path):
  wd = _copy(trained, tmp_path)
  metrics = (wd / "metrics.json").read_bytes()
  for f in (_ckpt_dir(wd) / "20" / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()  # step 20 committed, but its arrays are gone
  r = _cli(env, wd, "--mode", "eval")
  assert r.returncode == 1, r.stderr[-3000:]
  lines = _non_log_lines(r.stderr)
  assert len(lines) == 1, r.stderr[-3000:]
  d = _ckpt_dir(wd)
  assert lines[0].startswith(
    f"error: the latest finetune checkpoint, step 20 in {d}, cannot be read ("
  ), lines[0]
  assert (
    f"it was set aside as {d}/20.unreadable and nothing was evaluated. Evaluate an "
    "older step explicitly with --config.eval.step=N (saved: [10]) or let evaluation "
    "fall back with --config.eval.fallback=True"
  ) in lines[0]
  assert (wd / "metrics.json").read_bytes() == metrics
  assert sorted(p.name for p in d.iterdir()) == ["10", "20.unreadable"]
  # Rerunning does not quietly evaluate step 10 either; an explicit step or fallback does.
  cfg = _cfg()
  with pytest.raises(
    loop.UnreadableCheckpointError,
    match=re.escape(
      f"fine-tuning step(s) [20] in {d} were set aside as unreadable, so the latest readable "
      "step (10) is not the newest trained one; evaluate it explicitly with "
      "--config.eval.step=10"
    ),
  ):
    loop.evaluate_workdir(cfg, wd)
  assert (wd / "metrics.json").read_bytes() == metrics
  cfg.eval.step = 10
  assert loop.evaluate_workdir(cfg, wd)["checkpoint_step"] == 10
  cfg.eval.step, cfg.eval.fallback = 0, True
  assert loop.evaluate_workdir(cfg, wd)["checkpoint_step"] == 10
  assert json.loads((wd / "metrics.json").read_text())["checkpoint_step"] == 10
  cfg.eval.step = 30
  with pytest.raises(
    FileNotFoundError, match=re.escape("config.eval.step=30: no such fine-tuning checkpoint")
  ):
    loop.evaluate_workdir(cfg, wd)


def test_eval_step_and_fallback_in_every_config_and_validated():
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.name == "__init__.py":
      continue
    src = path.read_text()
    if "def get_config" not in src:
      continue
    mod = __import__(f"configs.{path.stem}", fromlist=["get_config"])
    c = mod.get_config()
    assert c.eval.step == 0 and c.eval.fallback is False, path.name
  cfg = _cfg()
  cfg.eval.step = -1
  with pytest.raises(ValueError) as ei:
    config_check.validate(cfg)
  assert "config.eval.step=-1: expected a fine-tuning step (int >= 1), or 0 for the latest" in str(
    ei.value
  )


# --------------------------------------------------------------------- evaluation protocol


def test_valid_split_with_train_valid_mask_is_rejected():
  cfg = _cfg()
  cfg.eval.split, cfg.eval.mask = "valid", "train_valid"
  with pytest.raises(ValueError) as ei:
    config_check.validate(cfg)
  assert str(ei.value) == (
    "invalid config: config.eval.split='valid' with config.eval.mask='train_valid' "
    "masks the very validation positives being scored (every metric would be 0); use "
    "config.eval.mask='train' to evaluate the valid split, or config.eval.split='test'"
  )


def test_retrieval_metrics_ignore_minus_inf_entries():
  # User 0 has one allowed item (5); the tail of its list is masked items at -inf, one of
  # which (3) is also a held-out positive: it was not retrieved.
  topk = np.array([[5, 3, 4], [7, 8, 9]])
  scores = np.array([[0.5, -np.inf, -np.inf], [0.9, 0.8, 0.7]], np.float32)
  pos = [np.array([3]), np.array([8])]
  m = M.retrieval_metrics(topk, pos, (1, 3), scores=scores)
  np.testing.assert_array_equal(m["recall@3"], [0.0, 1.0])
  np.testing.assert_array_equal(m["hitrate@1"], [0.0, 0.0])
  np.testing.assert_allclose(m["ndcg@3"], [0.0, 1 / np.log2(3)])
  with pytest.raises(ValueError, match="scores must have the shape of topk_items"):
    M.retrieval_metrics(topk, pos, (1,), scores=scores[:, :2])


# user, item, scenario, label, split (0 train, 2 test)
ROWS = np.array(
  [
    (0, 0, 0, 1, 0),
    (0, 1, 0, 1, 0),
    (0, 2, 0, 1, 0),
    (0, 2, 0, 1, 2),  # test positive that is also a training positive: masked, unreachable
    (1, 3, 0, 1, 0),
    (1, 4, 0, 1, 2),
    (0, 7, 1, 1, 0),
    (1, 5, 1, 1, 0),
    (1, 6, 1, 1, 2),  # item 6 is in scenario 1's test rows only
  ]
)


def _store() -> PreparedData:
  cols = dict(zip(["user", "item", "scenario", "label", "split"], ROWS.T))
  inter = {
    "user": cols["user"].astype(np.int32),
    "item": cols["item"].astype(np.int32),
    "scenario": cols["scenario"].astype(np.int32),
    "label": cols["label"].astype(np.float32),
    "split": cols["split"].astype(np.int8),
  }
  return PreparedData(
    path=Path("."),
    manifest={"num_users": 2, "num_items": 8},
    scenario_names=["a", "b"],
    user_specs=[],
    item_specs=[],
    users={"id": np.arange(2, dtype=np.int32)},
    items={"id": np.arange(8, dtype=np.int32)},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=np.array(["u0", "u1"]),
    item_raw_ids=np.array([f"i{i}" for i in range(8)]),
  )


def _params():
  user = np.zeros((2, 2, 2), np.float32)
  user[:, :, 0] = 1.0
  item = np.zeros((8, 2, 2), np.float32)
  item[:, 0, 0] = [8, 7, 6, 5, 4, 3, 2, 1]
  item[:, 1, 0] = [8, 7, 6, 5, 4, 3, 2, 1]
  return {"user": jnp.asarray(user), "item": jnp.asarray(item)}


def test_masked_test_positives_are_counted_never_retrieved(caplog):
  with caplog.at_level(logging.WARNING, logger="sass_jax"):
    m = ev.evaluate(Lookup(), _params(), _store(), "test", ks=(1, 8), corpus="all")
  a = m["scenarios"]["a"]
  # a: user 0's only test positive (2) is masked -> recall 0 at every K (the masked items
  # fill ranks 6-8 at -inf); user 1 ranks 0,1,2,4 (3 masked): 4 at rank 4 -> recall@8 = 1.
  assert (a["recall@1"], a["recall@8"]) == (0.0, 0.5)
  assert a["test_positives_in_train"] == 1 and m["scenarios"]["b"]["test_positives_in_train"] == 0
  assert m["overall"]["test_positives_in_train"] == 1
  assert m["baselines"]["popularity"]["scenarios"]["a"]["recall@8"] == 0.5
  assert (
    "1 positive(s) of the test split are also training positives of the same (user, "
    "item, scenario) and are masked out of the ranking"
  ) in caplog.text
  assert "'a': 1, 'b': 0" in caplog.text


def test_scenario_corpus_comes_from_training_rows_only():
  d = _store()
  np.testing.assert_array_equal(ev.scenario_corpus(d, 0, "scenario"), [0, 1, 2, 3])
  np.testing.assert_array_equal(ev.scenario_corpus(d, 1, "scenario"), [5, 7])
  m = ev.evaluate(Lookup(), _params(), d, "test", ks=(1, 8), corpus="scenario")
  a, b = m["scenarios"]["a"], m["scenarios"]["b"]
  # a: user 0 can rank only item 3 (0-2 masked), user 1 items 0, 1, 2 (3 masked), and test
  # item 4 is not in a's catalogue: nothing retrieved, and no masked item counts.
  assert a["recall@8"] == 0.0 and a["test_positives_outside_corpus"] == 1
  # b: item 6 appears in b's test rows only: outside the corpus, counted.
  assert b["recall@8"] == 0.0 and b["test_positives_outside_corpus"] == 1
  assert m["overall"]["test_positives_outside_corpus"] == 2


# --------------------------------------------------------------------- one-line CLI errors


def test_misspelt_config_key_is_one_line(env, tmp_path):
  # ml_collections' own hint; a transposition, below its 0.75 cutoff, gets ours
  for path, key, meant in (
    ("train.num_stepz=3", "num_stepz", "num_steps"),
    ("model.tua=0.1", "tua", "tau"),
  ):
    r = _cli(env, tmp_path / "wd", "--mode", "train", f"--config.{path}")
    assert r.returncode == 1
    given = path.split("=")[0]
    assert _non_log_lines(r.stderr) == [
      f"error: --config.{given}: the config has no key '{key}'; did you mean "
      f'"{meant}" instead of "{key}"?'
    ], r.stderr[-3000:]
    assert not (tmp_path / "wd").exists()
  # a value of the wrong type: one line too (absl printed 'FATAL Flags parsing error' + a hint)
  r = _cli(env, tmp_path / "wd", "--mode", "train", "--config.train.batch_size=abc")
  assert r.returncode == 1
  assert _non_log_lines(r.stderr) == [
    "error: flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc' "
    "(--helpfull lists the flags)"
  ], r.stderr[-3000:]
  assert not (tmp_path / "wd").exists()
  r = _cli(env, tmp_path / "wd", "--helpfull")  # absl's help, as before (it exits 1)
  assert "--config" in r.stdout and "Traceback" not in r.stderr and "error:" not in r.stderr


def test_finetune_without_pretraining_says_what_to_run(env, tmp_path):
  wd = tmp_path / "wd"
  r = _cli(env, wd, "--mode", "finetune", config="configs/test.py")
  assert r.returncode == 1
  assert _non_log_lines(r.stderr) == [
    f"error: --mode finetune starts from the pre-trained sass model, but "
    f"{wd}/checkpoints/pretrain holds no pre-training checkpoint. Run --mode pretrain first, "
    "or --mode train (pre-training, then fine-tuning), or fine-tune without pre-training: the "
    "sass_base variant (e.g. --config configs/movielens.py:sass_base) or "
    "--config.pretrain.num_steps=0"
  ], r.stderr[-3000:]
  assert not wd.exists()


def test_workdir_that_is_a_file(env, tmp_path):
  f = tmp_path / "wd"
  f.write_text("not a directory\n")
  r = _cli(env, f, "--mode", "prepare")
  assert r.returncode == 1
  assert _non_log_lines(r.stderr) == [
    f"error: --workdir {f} is not a directory (a file is in the way); give a new directory "
    "or remove the file"
  ], r.stderr[-3000:]
  assert f.read_text() == "not a directory\n"


@contextlib.contextmanager
def _read_only(path: Path):
  """``path`` read-only: a read-only bind mount for root, removed write permission for anyone
  else. A root that may not mount fails the test (it must not pass unchecked)."""
  if os.geteuid() != 0:
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
      p.chmod(modes[p] & ~0o222)
    try:
      yield
    finally:
      for p, m in modes.items():
        p.chmod(m)
    return
  r = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
  assert r.returncode == 0, f"a read-only workdir as root needs a bind mount: {r.stderr!r}"
  try:
    r = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
    assert r.returncode == 0, f"cannot remount read-only: {r.stderr!r}"
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


def test_eval_on_a_read_only_workdir_fails_before_evaluating(env, trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _snapshot(wd)
  with _read_only(wd):
    r = _cli(env, wd, "--mode", "eval")
  assert r.returncode == 1, r.stderr[-3000:]
  assert _non_log_lines(r.stderr) == [
    f"error: cannot write to the workdir {wd}: "
    + ("read-only file system" if os.geteuid() == 0 else "permission denied")
  ], r.stderr[-3000:]
  assert "evaluated" not in r.stderr and "restored" not in r.stderr  # failed before any work
  assert _snapshot(wd) == before


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(
  env, trained, tmp_path
):
  """Files are capped at 200 kB (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG): the
  prepared data (already there) and the logs fit, a checkpoint's array file (about 420 kB)
  does not, so resuming from step 20 fails when step 30 is saved."""
  wd = _copy(trained, tmp_path)
  limit = 200_000
  biggest = max(p.stat().st_size for p in (_ckpt_dir(wd) / "20").rglob("*") if p.is_file())
  assert biggest > limit  # the next checkpoint cannot be written

  no_cache = {
    k: v
    for k, v in env.items()
    if not k.startswith("JAX_PERSISTENT_CACHE") and k != "JAX_COMPILATION_CACHE_DIR"
  }
  r = _cli(no_cache, wd, "--mode", "finetune", "--config.train.num_steps=30", max_file_size=limit)
  assert r.returncode == 1, r.stderr[-3000:]
  lines = _non_log_lines(r.stderr)
  assert len(lines) == 1, r.stderr[-5000:]
  assert lines[0].startswith(
    "error: file too large (the file-size limit or the file system's maximum was reached) "
    f"while writing {_ckpt_dir(wd)}/30/"
  ), lines[0]
  assert "Traceback" not in r.stderr
  assert sorted(p.name for p in _ckpt_dir(wd).iterdir()) == ["10", "20"]  # nothing half-written
  assert loop.saved_steps(wd) == {"finetune": [10, 20]}
