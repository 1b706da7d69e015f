"""Command line: ``python -m sass_jax.main --config configs/movielens.py --workdir DIR --mode M``.

Modes: prepare, pretrain, finetune, train (pretrain + finetune + eval), eval, bench (step,
input, loop and evaluation throughput, ``sass_jax.bench.throughput``), bench_input
(input pipeline vs fine-tune step throughput, the same module), export (item vectors and
the serialised user tower) and recommend (top-K of one user), both ``sass_jax.export``, and
compile (per-chip memory, FLOPs and collectives of the steps compiled for a device topology
that need not be present, ``sass_jax.aot``). Any
config value can be overridden with ``--config.<path>=<value>``; the config is locked, so a
misspelt key is an error. This module only parses and dispatches; the logic lives in
``sass_jax.train.loop``.

User errors (an invalid value, a missing file or checkpoint, bad input data, an unknown id,
a misspelt ``--config.<key>``; ``USER_ERRORS``) and file-system failures (disk full, file too
large, read-only or not permitted; ``sass_jax.workdir.os_error_message``) print one
``error: <message>`` to stderr and exit with code 1; set ``SASS_JAX_DEBUG=1`` for the full
traceback. Every mode that writes to the workdir (all but recommend) first takes its lock
(``sass_jax.workdir.lock``): a second run on the same workdir fails at once with
``error: WORKDIR is in use by pid N``. SIGTERM or Ctrl-C during training finishes the
step, saves a checkpoint and exits 0 (rerun the same command to resume).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from sass_jax import config_check, distributed, export, hostmem
from sass_jax import workdir as workdir_lib
from sass_jax.bench import throughput
from sass_jax.data.store import DataError
from sass_jax.eval.evaluate import markdown_table
from sass_jax.train import loop, monitor
from sass_jax.train.stages import STAGES

MODES = (
  "prepare",
  "pretrain",
  "finetune",
  "train",
  "eval",
  "bench",
  "bench_input",
  "compare",
  "export",
  "recommend",
  "compile",
)
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "runs/default", "Run directory: data, checkpoints, logs, metrics."
)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
# Multi-process runs (sass_jax.distributed; SLURM / Cloud TPU are detected without these).
_COORD = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0's jax.distributed coordinator."
)
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
# User errors: printed as one 'error: <message>' line, exit code 1 (full traceback with
# SASS_JAX_DEBUG=1). DataError and UnknownIdError are ValueErrors; listed for the reader.
USER_ERRORS = (
  ValueError,
  FileNotFoundError,
  NotADirectoryError,
  DataError,
  export.UnknownIdError,
  workdir_lib.WorkdirError,
)
# Modes that write to the workdir, and so take its lock (recommend only reads).
WRITING_MODES = tuple(m for m in MODES if m != "recommend")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  kept = hostmem.keep_freed_memory_or_exit()  # before JAX starts its threads
  # Before any other JAX call: jax.distributed.initialize() when the run has several processes.
  multi = distributed.maybe_initialize(_COORD.value, _NPROC.value, _PID.value)
  tag = f" [process {jax.process_index()}/{jax.process_count()}]" if multi else ""
  logging.basicConfig(
    level=logging.INFO,
    format=f"%(asctime)s{tag} %(levelname)s %(message)s",
    datefmt="%H:%M:%S",
    force=True,
  )
  for noisy in ("absl", "orbax", "jax._src"):  # orbax logs every save/restore at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.info(
    "host memory: %s", "freed memory kept (sass_jax/hostmem.py)" if kept else "malloc as is"
  )
  cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/movielens.py")
  debug = os.environ.get("SASS_JAX_DEBUG", "") not in ("", "0")
  # A disk-full / read-only failure inside orbax or tensorstore makes their threads log the
  # same error many times over; keep those echoes quiet (remembered) and report it once below.
  quiet = None if debug else workdir_lib.quiet_os_error_echoes()
  try:
    _dispatch(cfg, workdir, mode)
  except monitor.Preempted as e:  # SIGTERM / Ctrl-C: the step reached was checkpointed; exit 0
    logging.warning("%s", e)
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (or pressed twice)
    if debug:
      raise
    print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
    raise SystemExit(130) from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    # Disk full, file too large, read-only, no permission (possibly wrapped by orbax /
    # tensorstore): one line naming the path and the cause. Then user errors: the message.
    if debug:
      raise
    # A DataError already names the file and says what was (not) written; other errors
    # caused by a disk-full / read-only OSError get the one line built from the OSError.
    if not isinstance(e, DataError) and (msg := workdir_lib.os_error_message(e, workdir)):
      _exit_after_os_error(msg)
    if not isinstance(e, USER_ERRORS):
      raise
    # The message only, exit code 1. Without the interpreter's shutdown: the coroutines and
    # threads of a failed orbax read would print 'Exception ignored in ...' / 'Event loop is
    # closed' tracebacks of the failure just reported.
    # (Several processes: a normal exit, so that jax.distributed shuts down in order.)
    if jax.process_count() == 1:
      _exit_after_os_error(str(e))
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  if quiet is not None and quiet.seen:  # a background write failed: never exit 0 after that
    _exit_after_os_error(quiet.seen[0])


def _exit_after_os_error(msg: str) -> None:
  """Print ``error: <msg>`` and end the process with exit code 1, without running the exit
  handlers of libraries whose background readers / writers failed (on a full or read-only
  disk, or an unreadable checkpoint): their reports would follow the one line."""
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  workdir_lib.remove_unused_workdirs()  # os._exit skips atexit: a new workdir holding only .lock
  os._exit(1)


def _unknown_key_message(error: BaseException, argv) -> str | None:
  """One line for ml_collections' error about a ``--config.<path>`` that is not in the
  config (a KeyError, raised as an AttributeError, whose text holds a 'Did you mean' hint);
  None for any other error."""
  e = error
  while (
    isinstance(e, (AttributeError, KeyError)) and e.args and isinstance(e.args[0], BaseException)
  ):
    e = e.args[0]
  if not isinstance(e, (AttributeError, KeyError)) or not e.args:
    return None
  text = str(e.args[0])
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if not lines:
    return None
  key = lines[0].strip("'\"")
  hint = next((l for l in lines[1:] if l.lower().startswith("did you mean")), "")
  given = next(
    (
      a.split("=", 1)[0]
      for a in argv[1:]
      if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")[1:]
    ),
    None,
  )
  if given is None:
    return None
  if hint:
    hint = hint[0].lower() + hint[1:]
  else:
    hint = _nearby_keys_hint(error, key)
  return f"{given}: the config has no key {key!r}; {hint}"


def _nearby_keys_hint(error: BaseException, key: str) -> str:
  """'did you mean ...' for ``key`` among the keys of the ConfigDict in which the lookup
  failed (found on the error's traceback), at a looser cutoff than ml_collections' own 0.75
  (which misses transpositions such as 'tua' for 'tau'); else that dict's keys when there
  are at most 40; else a pointer to the config file."""
  parent = None
  tb = error.__traceback__
  while tb is not None:  # the innermost ConfigDict method on the stack is the failed lookup
    obj = tb.tb_frame.f_locals.get("self")
    if isinstance(obj, ml_collections.ConfigDict):
      parent = obj
    tb = tb.tb_next
  if parent is None:
    return "see the config file for the keys it has"
  keys = sorted(str(k) for k in parent.keys())
  close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
  if close:
    return f'did you mean "{close[0]}" instead of "{key}"?'
  if len(keys) <= 40:
    return "its keys there: " + ", ".join(keys)
  return "see the config file for the keys it has"


def parse_flags(argv):
  """absl's flag parsing, with a misspelt ``--config.<key>`` reported as one ``error:`` line
  (exit code 1) instead of ml_collections' traceback, and a value of the wrong type (absl's
  ``flags.Error``, e.g. ``--config.train.batch_size=abc``) as one ``error:`` line instead of
  absl's two ('FATAL Flags parsing error' and a usage hint); ``--help`` / ``--helpfull``
  unchanged."""
  debug = os.environ.get("SASS_JAX_DEBUG", "") not in ("", "0")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if debug:
      raise
    msg = " ".join(str(e).split())
    print(f"error: {msg} (--helpfull lists the flags)", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
  except (AttributeError, KeyError) as e:
    msg = _unknown_key_message(e, argv)
    if msg is None or debug:
      raise
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def _dispatch(cfg, workdir: str, mode: str) -> None:
  """Validate the config, then run ``mode`` (the module docstring lists them)."""
  if mode == "compile":  # validated inside, against the mesh of config.compile.topology
    from sass_jax import aot

    if jax.process_index() == 0:
      workdir_lib.lock(workdir)  # compile.json is written there
    res = aot.compile_workdir(cfg, workdir)
    print("\n" + aot.summary_table(res))
    print(f"\nwritten to {workdir}/compile.json")
    return
  stages = {"pretrain": ("pretrain",), "finetune": ("finetune",), "train": STAGES}.get(mode, ())
  config_check.validate(cfg, stages=stages)  # every value checked before any work
  if mode in ("eval", "export"):
    loop.require_finetune_checkpoint(workdir)  # no checkpoint: nothing is created
  if mode == "finetune":
    loop.require_pretrained(cfg, workdir, ("finetune",))  # nothing to start from: the same
  # One run per workdir (writable, checked now), before anything opens its checkpoints: even
  # opening them removes what looks like an interrupted save, i.e. another run's save.
  if mode in WRITING_MODES and jax.process_index() == 0:
    workdir_lib.lock(workdir)
  config_check.validate(cfg, workdir=workdir, stages=stages)  # against the saved checkpoints
  if mode == "prepare":
    loop.prepare(cfg, workdir, force=True)
    return
  if mode == "bench":  # step / input / loop / eval throughput (sass_jax.bench.throughput)
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    res = throughput.bench(cfg, workdir, config_name=name)
    print(json.dumps(res, indent=2))
    print("\n" + throughput.summary_table(res))
    print(f"\nwritten to {workdir}/bench.json")
    return
  if mode == "bench_input":
    name = config_flags.get_config_filename(flags.FLAGS["config"])
    print(json.dumps(throughput.bench_input(cfg, workdir, config_name=name), indent=2))
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
  print(
    f"\n## {metrics['model']} on {metrics['dataset']} ({metrics['split']} split, "
    f"fine-tuning step {metrics['checkpoint_step']})\n"
  )
  print(markdown_table(metrics))
  print(f"\nmetrics written to {workdir}/metrics.json")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
