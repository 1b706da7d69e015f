"""Command line: ``python -m sass_jax.main --config configs/movielens.py --workdir DIR --mode M``.

Modes: prepare, pretrain, finetune, train (pretrain + finetune + eval), eval, bench (step,
input, loop and evaluation throughput, ``sass_jax.bench``), bench_input
(input pipeline vs fine-tune step throughput, ``sass_jax.bench``), export (item vectors and
the serialised user tower) and recommend (top-K of one user), both ``sass_jax.export``, and
compile (per-chip memory, FLOPs and collectives of the steps compiled for a device topology
that need not be present, ``sass_jax.aot``). Any
config value can be overridden with ``--config.<path>=<value>``; the config is locked, so a
misspelt key is an error. This module only parses and dispatches; the logic lives in
``sass_jax.train.loop``.

User errors (an invalid value, a missing file or checkpoint, bad input data, an unknown id;
``USER_ERRORS``) print one ``error: <message>`` to stderr and exit with code 1; set
``SASS_JAX_DEBUG=1`` for the full traceback. SIGTERM or Ctrl-C during training finishes the
step, saves a checkpoint and exits 0 (rerun the same command to resume).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from sass_jax import bench, config_check, distributed, export
from sass_jax.data.store import DataError
from sass_jax.eval.evaluate import markdown_table
from sass_jax.train import loop, monitor

MODES = ("prepare", "pretrain", "finetune", "train", "eval", "bench", "bench_input", "compare",
         "export", "recommend", "compile")
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: data, checkpoints, logs, metrics.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
# Multi-process runs (sass_jax.distributed; SLURM / Cloud TPU are detected without these).
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0's jax.distributed coordinator.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
# User errors: printed as one 'error: <message>' line, exit code 1 (full traceback with
# SASS_JAX_DEBUG=1). DataError and UnknownIdError are ValueErrors; listed for the reader.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, DataError,
               export.UnknownIdError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before any other JAX call: jax.distributed.initialize() when the run has several processes.
  multi = distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
  tag = f" [process {jax.process_index()}/{jax.process_count()}]" if multi else ""
  logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{tag} %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):  # orbax logs every save/restore at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/movielens.py")
  debug = os.environ.get("SASS_JAX_DEBUG", "") not in ("", "0")
  try:
    _dispatch(cfg, workdir, mode)
  except monitor.Preempted as e:   # SIGTERM / Ctrl-C: the step reached was checkpointed; exit 0
    logging.warning("%s", e)
  except USER_ERRORS as e:         # the message only, exit code 1 (traceback: SASS_JAX_DEBUG=1)
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  except KeyboardInterrupt:        # Ctrl-C outside a training loop (or pressed twice)
    if debug:
      raise
    print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    raise SystemExit(130) from None


def _dispatch(cfg, workdir: str, mode: str) -> None:
  """Validate the config, then run ``mode`` (the module docstring lists them)."""
  if mode == "compile":   # validated inside, against the mesh of config.compile.topology
    from sass_jax import aot
    res = aot.compile_workdir(cfg, workdir)
    print("\n" + aot.summary_table(res))
    print(f"\nwritten to {workdir}/compile.json")
    return
  config_check.validate(cfg, workdir=workdir, stages={   # every value checked before any work
      "pretrain": ("pretrain",), "finetune": ("finetune",), "train": loop.STAGES}.get(mode, ()))
  if mode == "prepare":
    loop.prepare(cfg, workdir, force=True)
    return
  if mode == "bench":   # step / input / loop / eval throughput (sass_jax.bench, issue 6)
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    res = bench.bench(cfg, workdir, config_name=name)
    print(json.dumps(res, indent=2))
    print("\n" + bench.summary_table(res))
    print(f"\nwritten to {workdir}/bench.json")
    return
  if mode == "bench_input":
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(json.dumps(bench.bench_input(cfg, workdir, config_name=name), indent=2))
    return
  if mode == "compare":
    from sass_jax import compare
    cmd = "python -m sass_jax.main " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = compare.compare(cfg, workdir, command=cmd)
    print(compare.markdown(res))
    print(f"\nresults written to {cfg.compare.results_dir}/{res['name']}.{{md,json,png}}")
    return
  if mode == "export":
    print(f"exported to {export.export_workdir(cfg, workdir)}")
    return
  if mode == "recommend":
    print(export.format_recommendations(export.recommend(cfg, workdir)))
    return
  if mode in ("pretrain", "finetune"):
    loop.train(cfg, workdir, stages=(mode,), evaluate=False)
    return
  metrics = loop.train(cfg, workdir) if mode == "train" else loop.evaluate_workdir(cfg, workdir)
  print(f"\n## {metrics['model']} on {metrics['dataset']} ({metrics['split']} split, "
        f"fine-tuning step {metrics['checkpoint_step']})\n")
  print(markdown_table(metrics))
  print(f"\nmetrics written to {workdir}/metrics.json")


if __name__ == "__main__":
  app.run(main)
