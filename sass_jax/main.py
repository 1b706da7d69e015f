"""Command line: ``python -m sass_jax.main --config configs/movielens.py --workdir DIR --mode M``.

Modes: prepare, pretrain, finetune, train (pretrain + finetune + eval), eval, bench_input
(input pipeline vs fine-tune step throughput, ``sass_jax.bench``). Any config value
can be overridden with ``--config.<path>=<value>``; the config is locked, so a misspelt key is
an error. This module only parses and dispatches; the logic lives in ``sass_jax.train.loop``.
"""
from __future__ import annotations

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from sass_jax import bench
from sass_jax.eval.evaluate import markdown_table
from sass_jax.train import loop

MODES = ("prepare", "pretrain", "finetune", "train", "eval", "bench_input")
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: data, checkpoints, logs, metrics.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "orbax", "jax._src"):  # orbax logs every save/restore at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/movielens.py")
  if mode == "prepare":
    loop.prepare(cfg, workdir, force=True)
    return
  if mode == "bench_input":
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(json.dumps(bench.bench_input(cfg, workdir, config_name=name), indent=2))
    return
  if mode in ("pretrain", "finetune"):
    loop.train(cfg, workdir, stages=(mode,), evaluate=False)
    return
  metrics = loop.train(cfg, workdir) if mode == "train" else loop.evaluate_workdir(cfg, workdir)
  print(f"\n## {metrics['model']} on {metrics['dataset']} ({metrics['split']} split)\n")
  print(markdown_table(metrics))
  print(f"\nmetrics written to {workdir}/metrics.json")


if __name__ == "__main__":
  app.run(main)
