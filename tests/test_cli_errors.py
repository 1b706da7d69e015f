"""User errors end cleanly and never damage a trained workdir (new-user trial findings).

One tiny run (configs/test.py:sass_base, 20 fine-tuning steps, checkpoints at 10 and 20) is
shared by the module; tests that could change it work on copies. CLI subprocesses are used only
where the command line itself is what is tested (exit codes, stderr, signals).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from configs import test as test_config
from sass_jax import compare, config_check, export
from sass_jax.checkpoint import Checkpointer
from sass_jax.data import store
from sass_jax.partition import Partitioner
from sass_jax.train import loop, monitor, steps
from test_monitor import read_events, scalars
from test_resume import EVERY, NUM_STEPS, _ckpt_dir, _start_and_wait, _state, _steps_on_disk

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"
RATINGS = "ratings_sample_100k.dat"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # sass_jax.main's logging format


def _cfg(**data):
  cfg = test_config.get_config("sass_base")
  cfg.data.dir = str(DATA)
  cfg.train.num_steps = 20
  for k, v in data.items():
    cfg.data[k] = v
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, metrics) of a finished tiny run: finetune checkpoints at steps 10 and 20."""
  wd = tmp_path_factory.mktemp("trained")
  metrics = loop.train(_cfg(), wd, show_progress=False)
  assert loop.saved_steps(wd) == {"finetune": [10, 20]}
  return wd, metrics


@pytest.fixture
def changed_data(tmp_path) -> Path:
  """A copy of the MovieLens sample with the rating of the first row changed."""
  d = tmp_path / "ml_changed"
  shutil.copytree(DATA, d)
  lines = (d / RATINGS).read_text().splitlines(keepends=True)
  u, i, r, t = lines[0].split("::")
  lines[0] = "::".join([u, i, "1" if r != "1" else "5", t])
  (d / RATINGS).write_text("".join(lines))
  return d


def _copy_run(trained, tmp_path) -> Path:
  wd = tmp_path / "wd"
  shutil.copytree(trained[0], wd)
  return wd


# --------------------------------------------------------------------- 1. data under checkpoints


def test_eval_with_other_data_dir_refuses_to_replace_the_trained_data(trained, changed_data):
  wd = trained[0]
  manifest = (wd / "data" / "manifest.json").read_bytes()
  metrics = (wd / "metrics.json").read_bytes()
  before = sorted(p.name for p in wd.iterdir())
  with pytest.raises(ValueError) as ei:
    loop.evaluate_workdir(_cfg(dir=str(changed_data)), wd)
  msg = str(ei.value)
  assert f"config.data.dir: '{DATA}' -> '{changed_data}'" in msg, msg
  assert f"checkpoints in {wd / 'checkpoints'} (finetune steps [10, 20])" in msg
  assert "Use a new --workdir for the new data, or restore the original values." in msg
  assert (wd / "data" / "manifest.json").read_bytes() == manifest
  assert (wd / "metrics.json").read_bytes() == metrics
  assert sorted(p.name for p in wd.iterdir()) == before  # no half-written store left


def test_other_data_options_name_every_differing_field(trained):
  with pytest.raises(
    ValueError,
    match=re.escape(
      "config.data.min_count: 1 -> 2; config.data.split_seed: 42 -> 7. Preparing again"
    ),
  ):
    loop.prepare(_cfg(min_count=2, split_seed=7), trained[0])


def test_forced_prepare_refuses_changed_source_files(trained, tmp_path, changed_data):
  wd = _copy_run(trained, tmp_path)
  # The store as if it had been prepared from changed_data before the rating changed.
  man = json.loads((wd / "data" / "manifest.json").read_text())
  man["options"]["dir"] = str(changed_data)
  (wd / "data" / "manifest.json").write_text(json.dumps(man))
  manifest = (wd / "data" / "manifest.json").read_bytes()
  cfg = _cfg(dir=str(changed_data))
  # Same options, but the source changed since: not reused (it used to be, silently).
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{changed_data / RATINGS}: changed since {wd / 'data'} was prepared from it"),
  ):
    loop.prepare(cfg, wd)
  with pytest.raises(
    ValueError,
    match=re.escape(
      f"the config differs from it: source file {RATINGS} (changed at config.data.dir="
    ),
  ):
    loop.prepare(cfg, wd, force=True)
  assert (wd / "data" / "manifest.json").read_bytes() == manifest


def test_without_checkpoints_other_data_is_prepared_again(tmp_path, changed_data):
  wd = tmp_path / "wd"
  first = loop.prepare(_cfg(), wd).manifest
  second = loop.prepare(_cfg(dir=str(changed_data)), wd).manifest
  assert first["options"]["dir"] == str(DATA)
  assert second["options"]["dir"] == str(changed_data)
  assert second["sources"][RATINGS]["sha256"] != first["sources"][RATINGS]["sha256"]


# --------------------------------------------------------------------- 2. no checkpoint yet


def test_eval_export_recommend_without_checkpoint_create_nothing(tmp_path):
  wd = tmp_path / "wd"
  msg = (
    f"no fine-tuned checkpoint in {wd}/checkpoints/finetune; run --mode train (or finetune) first"
  )
  cfg = _cfg()
  cfg.recommend.user, cfg.recommend.scenario = "1", "age_under25"
  for run in (
    lambda: loop.evaluate_workdir(cfg, wd),
    lambda: export.export_workdir(cfg, wd),
    lambda: export.recommend(cfg, wd),
  ):
    with pytest.raises(FileNotFoundError) as ei:
      run()
    assert str(ei.value) == msg
    assert not wd.exists()
  wd.mkdir()
  (wd / "checkpoints" / "finetune" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no fine-tuned checkpoint"):  # interrupted save
    loop.evaluate_workdir(cfg, wd)
  assert sorted(p.name for p in wd.iterdir()) == ["checkpoints"]


# --------------------------------------------------------------------- 3. clean CLI errors


def _cli(env, workdir, *args, debug=False):
  e = dict(env, SASS_JAX_DEBUG="1" if debug else "0")
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py:sass_base",
      "--workdir",
      str(workdir),
      f"--config.data.dir={DATA}",
      *args,
    ],
    cwd=REPO,
    env=e,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _non_log_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.strip() and not LOG_LINE.match(l)]


def test_missing_data_dir_leaves_no_new_workdir_behind(env, tmp_path):
  """A run that fails before writing anything (here: no data directory) removes the workdir
  it created for its lock; an existing workdir stays (found by a fresh-user check: a new
  workdir holding only .lock was left behind)."""
  missing = tmp_path / "no_such_data"
  r = _cli(env, tmp_path / "new" / "wd", "--mode", "train", f"--config.data.dir={missing}")
  assert r.returncode == 1, r.stderr[-3000:]
  assert str(missing) in r.stderr
  assert not (tmp_path / "new" / "wd").exists()
  old = tmp_path / "old"
  old.mkdir()
  r = _cli(env, old, "--mode", "train", f"--config.data.dir={missing}")
  assert r.returncode == 1 and old.is_dir()


def test_cli_unknown_compare_model_is_one_error_line(env, tmp_path):
  r = _cli(
    env, tmp_path / "wd", "--mode", "compare", "--config.compare.models=('dssm_single','sas')"
  )
  assert r.returncode == 1, r.stderr[-3000:]
  assert _non_log_lines(r.stderr) == [
    "error: config.compare.models has 'sas'; expected names from "
    f"{sorted(compare.known_variants())}"
  ], r.stderr[-3000:]


def test_cli_one_bad_config_value_is_one_error_line(env, tmp_path):
  """One invalid config value took two lines ('invalid config:' and a bullet); two problems
  still get one line each under the header. Nothing is left behind."""
  r = _cli(env, tmp_path / "wd", "--mode", "train", "--config.model.tau=-1.0")
  assert r.returncode == 1, r.stderr[-3000:]
  (line,) = _non_log_lines(r.stderr)
  assert line.startswith("error: invalid config: config.model.tau=-1.0"), line
  assert not (tmp_path / "wd").exists()
  r = _cli(
    env, tmp_path / "wd", "--mode", "train", "--config.model.tau=-1.0", "--config.eval.split=dev"
  )
  assert r.returncode == 1
  lines = _non_log_lines(r.stderr)
  assert lines[0] == "error: invalid config:" and len(lines) == 3, lines


def test_cli_bad_host_malloc_setting_is_one_error_line(env, tmp_path):
  r = _cli(dict(env, SASS_JAX_MALLOC="jemalloc"), tmp_path / "wd", "--mode", "train")
  assert r.returncode == 1, r.stderr[-3000:]
  assert _non_log_lines(r.stderr) == [
    "error: SASS_JAX_MALLOC='jemalloc': expected 'keep' (the default) or 'system'"
  ], r.stderr[-3000:]
  assert not (tmp_path / "wd").exists()


def test_cli_recommend_k0_is_one_error_line_and_debug_keeps_the_traceback(env, trained):
  args = (
    "--mode",
    "recommend",
    "--config.recommend.k=0",
    "--config.recommend.user=1",
    "--config.recommend.scenario=age_under25",
  )
  r = _cli(env, trained[0], *args)
  assert r.returncode == 1, r.stderr[-3000:]
  assert _non_log_lines(r.stderr) == ["error: config.recommend.k=0; expected >= 1"]
  r = _cli(env, trained[0], *args, debug=True)
  assert r.returncode == 1
  assert "Traceback (most recent call last)" in r.stderr
  assert "ValueError: config.recommend.k=0; expected >= 1" in r.stderr


# --------------------------------------------------------------------- 4. checkpoint step


def test_metrics_name_the_evaluated_checkpoint_step(trained):
  wd, metrics = trained
  assert metrics["checkpoint_step"] == 20
  assert json.loads((wd / "metrics.json").read_text())["checkpoint_step"] == 20


def test_restored_step_is_the_step_read_not_the_latest(trained, tmp_path, caplog):
  wd = _copy_run(trained, tmp_path)
  for f in (_ckpt_dir(wd) / "20" / "state" / "ocdbt.process_0" / "d").iterdir():
    f.unlink()  # step 20's arrays gone: the restore falls back to step 10
  cfg = _cfg()
  data = loop.prepare(cfg, wd)
  model = loop.build_model(cfg, data)
  with caplog.at_level(logging.WARNING, logger="sass_jax"):
    _, step = loop.restore_variables_and_step(
      cfg, wd, "finetune", model, Partitioner(cfg.mesh), data
    )
  assert step == 10
  assert "falling back to step 10" in caplog.text


def test_unreadable_metadata_only_is_not_a_fallback(trained, tmp_path, caplog):
  wd = _copy_run(trained, tmp_path)
  meta = _ckpt_dir(wd) / "20" / "metadata" / "metadata"
  meta.write_bytes(meta.read_bytes()[:50])  # truncated JSON
  cfg = _cfg()
  data = loop.prepare(cfg, wd)
  model = loop.build_model(cfg, data)
  part = Partitioner(cfg.mesh)
  with caplog.at_level(logging.WARNING, logger="sass_jax"):
    config_check.validate(cfg, workdir=wd, stages=())  # reads the saved config (metadata)
    _, step = loop.restore_variables_and_step(cfg, wd, "finetune", model, part, data)
    init = steps.make_init_fn(
      model, steps.make_optimizer(cfg.train, 20), loop.example_batch(data), cfg.seed
    )
    abstract, _ = part.abstract_state(init)
    with Checkpointer(_ckpt_dir(wd)) as ck:
      state, metadata, data_state = ck.restore(abstract)
      assert ck.restored_step == 20 and ck.unreadable_steps == []
  assert step == 20 and int(state.step) == 20 and metadata == {} and data_state
  assert "falling back" not in caplog.text
  assert (
    f"the metadata of checkpoint step 20 in {_ckpt_dir(wd)} is unreadable (JSONDecodeError"
  ) in caplog.text
  assert "reading that of step 10 instead" in caplog.text
  assert "restored the step's state without it" in caplog.text


# --------------------------------------------------------------------- 5. Ctrl-C


def test_sigint_during_training_checkpoints_and_exits_zero(env, tmp_path):
  proc = _start_and_wait(tmp_path, env, 2 * EVERY)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  stopped = _steps_on_disk(tmp_path)[-1]
  assert 2 * EVERY <= stopped < NUM_STEPS
  assert (
    f"finetune: stopped on request (SIGINT / Ctrl-C) after step {stopped}; checkpoint "
    f"saved in {_ckpt_dir(tmp_path)}. Rerun the same command to continue from it."
  ) in err
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  assert [p.name for p in _ckpt_dir(tmp_path).iterdir() if not p.name.isdigit()] == []
  assert int(_state(tmp_path)["step"]) == stopped


def test_preemption_watch_sigint_then_second_sigint_interrupts():
  before = signal.getsignal(signal.SIGINT)
  watch = monitor.PreemptionWatch()
  with watch:
    assert watch.cause == "by a preemption signal"
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.should_stop(1) and watch.cause == "on request (SIGINT / Ctrl-C)"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------- 6. TensorBoard tags


def test_eval_tags_are_clean_and_nothing_is_logged(tmp_path, caplog):
  with caplog.at_level(logging.DEBUG), monitor.Monitor(tmp_path, "finetune") as mon:
    mon.log_eval(3, {"overall": {"recall@50": 0.5}, "scenarios": {"age 25+": {"ndcg@10": 0.25}}})
  assert "illegal" not in caplog.text
  assert scalars(read_events(tmp_path / "tb" / "finetune")) == {
    "eval/overall/recall_50": {3: 0.5},
    "eval/age_25_/ndcg_10": {3: 0.25},
  }
  assert monitor.clean_tag("/eval/a b/recall@50") == "eval/a_b/recall_50"


# --------------------------------------------------------------------- 7. silently accepted values


def test_unknown_export_platform_is_rejected_before_any_work(trained, tmp_path):
  cfg = _cfg()
  cfg.export.platforms = ("cpu", "gpux")
  with pytest.raises(ValueError) as ei:
    export.export_workdir(cfg, trained[0], tmp_path / "export")
  assert str(ei.value) == (
    "config.export.platforms=('cpu', 'gpux'): unknown platform(s) ['gpux']; expected names "
    "from ('cpu', 'cuda', 'rocm', 'tpu') (empty = the current backend only)"
  )
  assert not (tmp_path / "export").exists()
  assert export.check_platforms(("cpu", "rocm")) == ("cpu", "rocm")
  assert export.check_platforms(()) is None


SPLIT_CASES = [
  (
    (0.9, 0.1, 0.0),
    "test",
    "config.data.split=(0.9, 0.1, 0.0): the test fraction is 0, so "
    "the evaluation (config.eval.split='test') would have no rows; give it a share, e.g. "
    "(0.8, 0.1, 0.1)",
  ),
  (
    (0.9, 0.0, 0.1),
    "valid",
    "config.data.split=(0.9, 0.0, 0.1): the valid fraction is 0, so "
    "the evaluation (config.eval.split='valid') would have no rows; give it a share, e.g. "
    "(0.8, 0.1, 0.1)",
  ),
  (
    (0.0, 0.5, 0.5),
    "test",
    "config.data.split=(0.0, 0.5, 0.5): the train fraction is 0, so "
    "there is nothing to train on; give it most of the rows, e.g. (0.8, 0.1, 0.1)",
  ),
]


@pytest.mark.parametrize(
  "split,eval_split,message", SPLIT_CASES, ids=[f"{c[0]}-{c[1]}" for c in SPLIT_CASES]
)
def test_empty_split_fraction_is_rejected(split, eval_split, message):
  cfg = _cfg(split=split)
  cfg.eval.split = eval_split
  with pytest.raises(ValueError, match=r"invalid config:( |\n(.*\n)*  - )" + re.escape(message)):
    config_check.validate(cfg)


def test_empty_split_that_is_not_evaluated_is_allowed():
  cfg = _cfg(split=(0.9, 0.1, 0.0))
  cfg.eval.split = "valid"
  config_check.validate(cfg)
