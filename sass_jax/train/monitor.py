"""Watching a training stage: TensorBoard events, preemption (SIGTERM) and non-finite numbers.

- :class:`Monitor` writes TensorBoard event files (tensorboardX, no TensorFlow) to
  ``WORKDIR/tb/<stage>``: every logged training metric as ``train/<name>`` (loss, learning_rate,
  grad_norm, param_norm, samples_per_s, ...), the config once (text ``config`` and the HParams
  plugin's session) and evaluation metrics as ``eval/<scenario>/<metric>`` (TensorBoard tags
  allow ``[A-Za-z0-9_./-]``: tensorboardX writes ``recall@50`` as ``recall_50``). Only process 0
  writes; on the other processes every method is a no-op. A resumed stage opens its writer with
  ``purge_step`` = the resumed step, so TensorBoard drops the events an interrupted run wrote
  after its last checkpoint.
- :class:`PreemptionWatch` turns SIGTERM and SIGINT (Ctrl-C) into "stop after this step": the
  loop finishes the step, saves a checkpoint and raises :class:`Preempted` (``sass_jax.main``
  exits 0); a second Ctrl-C stops at once (KeyboardInterrupt).
- :func:`first_nonfinite` names the first non-finite quantity of a step's metrics.

View with ``tensorboard --logdir WORKDIR/tb`` (``pip install tensorboard``; not a dependency).
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import numpy as np

log = logging.getLogger("sass_jax")

FINITE_KEYS = ("loss", "grad_norm", "param_norm")
# Characters TensorBoard does not allow in a tag (tensorboardX's rule; they become '_').
_BAD_TAG_CHARS = re.compile(r"[^-/\w.]")


def clean_tag(tag: str) -> str:
  """``tag`` with every character outside ``[-/\\w.]`` replaced by '_' and leading '/'
  stripped, e.g. 'eval/overall/recall@50' -> 'eval/overall/recall_50' (what tensorboardX would
  write, without its INFO log line per tag)."""
  return _BAD_TAG_CHARS.sub("_", tag).lstrip("/")


class Preempted(Exception):
  """Raised by ``loop.train_stage`` after it saved a checkpoint at ``step`` because of SIGTERM,
  SIGINT (Ctrl-C) or a preemption notice all processes agreed on. Rerun the same command to
  continue. ``cause`` completes "stopped ... after step N" (:attr:`PreemptionWatch.cause`)."""

  def __init__(self, stage: str, step: int, directory, cause: str = "by a preemption signal"):
    super().__init__(
      f"{stage}: stopped {cause} after step {step}; checkpoint "
      f"saved in {directory}. Rerun the same command to continue from it."
    )
    self.stage, self.step, self.directory, self.cause = stage, int(step), directory, cause


def first_nonfinite(metrics: Mapping[str, float], keys: Iterable[str] = FINITE_KEYS) -> str | None:
  """The first of ``keys`` present in ``metrics`` whose value is NaN or +-Inf, else None."""
  for k in keys:
    if k in metrics and not math.isfinite(float(metrics[k])):
      return k
  return None


def _flat_hparams(tree: Any, prefix: str = "") -> dict:
  """Config dict -> {'model.embed_dim': 16, ...}; values bool/int/float/str (others as text)."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flat_hparams(v, name + "."))
    elif isinstance(v, (bool, int, float, str)):
      out[name] = v
    else:
      out[name] = json.dumps(v, default=str)
  return out


class Monitor:
  """TensorBoard writer of one stage: ``WORKDIR/tb/<stage>``.

  Args:
    workdir: run directory.
    stage: 'pretrain', 'finetune' (or any subdirectory name, e.g. for evaluation).
    start_step: the step the stage (re)starts from; > 0 purges later events of earlier runs.
    config: the run's config as a dict; written once (only when ``start_step == 0``) as a text
      summary and as TensorBoard HParams.

  Usable as a context manager; :meth:`close` flushes and closes the event file.
  """

  def __init__(
    self, workdir: str | Path, stage: str, start_step: int = 0, config: Mapping | None = None
  ):
    self.logdir = Path(workdir) / "tb" / stage
    self._w = None
    if jax.process_index() != 0:
      return
    from tensorboardX import SummaryWriter  # imported here: process 0 only

    self.logdir.mkdir(parents=True, exist_ok=True)
    self._w = SummaryWriter(str(self.logdir), purge_step=int(start_step) or None, flush_secs=30)
    if config is not None and int(start_step) == 0:
      self.log_config(config)

  @property
  def enabled(self) -> bool:
    """True on the process that writes (process 0)."""
    return self._w is not None

  def log_config(self, config: Mapping) -> None:
    """Write the config: text ``config`` (JSON) and an HParams session of its flat values."""
    if self._w is None:
      return
    from tensorboardX.summary import hparams

    cfg = json.loads(json.dumps(dict(config), default=str))
    self._w.add_text("config", "```\n" + json.dumps(cfg, indent=2) + "\n```", 0)
    flat = _flat_hparams(cfg)
    for summary in hparams(flat, {"train/loss": 0.0}):
      self._w.file_writer.add_summary(summary)

  def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """Scalars ``<prefix>/<name>`` at ``step`` for every numeric entry but 'step'."""
    if self._w is None:
      return
    for k, v in metrics.items():
      if k != "step" and isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        self._w.add_scalar(clean_tag(f"{prefix}/{k}"), float(v), int(step))

  def log_eval(self, step: int, metrics: Mapping, prefix: str = "eval") -> None:
    """Evaluation metrics (``eval.evaluate`` output): ``<prefix>/<scenario>/<metric>`` for
    every scenario and ``<prefix>/overall/<metric>``; numeric values only (e.g. recall@50,
    auc, num_users). A metric that is undefined for the data (NaN, e.g. AUC on implicit
    data without negatives) is left out rather than written as NaN. ``loop.evaluate_workdir``
    uses prefix 'eval' for the test split and 'eval_valid' for the validation split."""
    if self._w is None:
      return
    blocks = dict(metrics.get("scenarios", {}))
    if "overall" in metrics:
      blocks["overall"] = metrics["overall"]
    for name, block in blocks.items():
      self.log(
        step,
        {k: v for k, v in block.items() if isinstance(v, (int, float)) and math.isfinite(v)},
        prefix=f"{prefix}/{name}",
      )

  def flush(self) -> None:
    if self._w is not None:
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()
      self._w = None

  def __enter__(self) -> "Monitor":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionWatch:
  """SIGTERM or SIGINT (Ctrl-C) -> a step after which every process saves and stops.

  Enter it (``with watch:``) around the training loop and call :meth:`should_stop` on every
  process after every step (the same step numbers everywhere):

  - one process: a Python SIGTERM handler sets :attr:`flag`; ``should_stop`` returns it.
  - several processes with JAX's preemption service (``jax.distributed.initialize`` with
    ``jax_enable_preemption_service``, the default): no Python handler is installed, so JAX's
    own SIGTERM notifier stays in place and the coordination service spreads the notice;
    ``should_stop`` is orbax's ``reached_preemption`` (``multihost_utils.
    reached_preemption_sync_point``), True on every process at the same step.
  - several processes without that service: the Python handler sets the flag and, every
    ``sync_every`` steps, ``should_stop`` takes the max of all processes' flags
    (``multihost_utils.process_allgather``), so all save the same step and stop together.

  With JAX's preemption service no SIGINT handler is installed either (Ctrl-C then raises
  KeyboardInterrupt as usual). A second SIGINT while a stop is pending raises
  KeyboardInterrupt (stop at once, without the checkpoint). The previous handler is restored
  on exit (one installed outside Python -- not visible to ``signal.getsignal`` -- comes back as
  the default action); nothing is installed outside the main thread.

  Args:
    checkpointer: object with ``reached_preemption(step)`` (a ``Checkpointer``), or None.
    sync_every: steps between flag all-reduces (several processes, no preemption service).
    signals: signals that request a stop.
  """

  def __init__(
    self,
    checkpointer=None,
    sync_every: int = 10,
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
  ):
    self._ckpt = checkpointer
    self.sync_every = max(1, int(sync_every))
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._service = False
    self.flag = False
    self.signum: int | None = None  # the first signal received

  @property
  def cause(self) -> str:
    """Why the stage stops, for :class:`Preempted`: 'on request (SIGINT / Ctrl-C)' after a
    SIGINT, else 'by a preemption signal'."""
    if self.signum == signal.SIGINT:
      return "on request (SIGINT / Ctrl-C)"
    return "by a preemption signal"

  def _handler(self, signum, frame):
    del frame
    if self.flag and signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # Ctrl-C twice: stop now
    if not self.flag:
      self.signum = signum
      extra = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
      log.warning(
        "received %s: stopping after the current step (checkpoint first)%s",
        signal.Signals(signum).name,
        extra,
      )
    self.flag = True

  def __enter__(self) -> "PreemptionWatch":
    self._service = (
      jax.process_count() > 1
      and self._ckpt is not None
      and bool(jax.config.jax_enable_preemption_service)
    )
    if self._service:
      log.info("SIGTERM is handled by JAX's preemption service (all processes stop together)")
    elif threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._previous[s] = signal.signal(s, self._handler)
    else:
      log.info("not in the main thread: SIGTERM keeps its default handler")
    return self

  def __exit__(self, *exc) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h if h is not None else signal.SIG_DFL)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after ``step`` (see the class docstring)."""
    if jax.process_count() == 1:
      return self.flag
    if self._service:
      return bool(self._ckpt.reached_preemption(step))
    if step % self.sync_every:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(self.flag)], np.int32))
    return bool(np.max(flags))
