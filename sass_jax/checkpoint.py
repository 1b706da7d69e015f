"""Checkpointing of training state with orbax-checkpoint.

Source: docs/design.md §6, "Checkpoints with orbax-checkpoint: parameters,
optimizer state, step, data-iterator state and config; restore for evaluation
(parameters only) and restore onto a different mesh".

One :class:`Checkpointer` manages one training-stage directory (e.g.
``runs/exp1/pretrain``).  Every saved step is a subdirectory ``<dir>/<step>/``
holding three orbax items, written through ``ocp.CheckpointManager`` with
``ocp.args.Composite``:

``state``
    The training-state pytree (``ocp.args.PyTreeSave``), e.g. a
    ``flax.struct.PyTreeNode`` with fields ``step`` (int32 ``[]``), ``params``
    (nested dict of arrays), ``opt_state`` (optax tuples / namedtuples) and
    ``rng`` (uint32 ``[2]`` key data).  Leaves may be ``jax.Array`` (possibly
    sharded over a ``Mesh``; each process writes only its own shards),
    ``np.ndarray``, numpy scalars or Python scalars.
``metadata``
    A JSON dict (``ocp.args.JsonSave``), e.g. ``{'stage': 'finetune',
    'config': {...}}``.
``data_state``
    Optional JSON dict with the input-iterator state (e.g. a grain
    ``DataLoaderIterator.get_state()`` decoded to JSON-compatible values).
    Only written when given.

JSON items round-trip through ``json``: tuples come back as lists, dict keys
as strings, numpy scalars as Python scalars; other values must be
JSON-serialisable.

Atomicity: orbax writes every step into a temporary directory
(``<dir>/<step>.orbax-checkpoint-tmp-*``) and renames it to ``<dir>/<step>``
only after all items are written and finalised.  An interrupted save (crash,
preemption) therefore never shows up in :meth:`Checkpointer.all_steps` and
never becomes :meth:`Checkpointer.latest_step`; leftover temporary
directories are ignored (and removed on the next manager start-up).

Fallback: a committed step that cannot be read (files deleted or truncated
after the rename, a disk error) does not block a restore. With ``step=None``
the restore methods try the latest step, log a warning naming it and the
error, and try the next older step, until one restores; they raise the
latest step's error only if none does. :attr:`Checkpointer.unreadable_steps`
lists the steps skipped; :meth:`Checkpointer.set_aside_unreadable` renames
them to ``<step>.unreadable`` so that training can save those steps again.
A step whose only unreadable item is its JSON ``metadata`` is not skipped:
:meth:`Checkpointer.restore` returns its state with metadata ``{}`` and warns
that the metadata is unreadable. :attr:`Checkpointer.restored_step` is the
step the last restore read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "CheckpointMismatchError"]

log = logging.getLogger("sass_jax")

_STATE = "state"
_METADATA = "metadata"
_DATA_STATE = "data_state"
_PARAMS = "params"


def _abstractify(tree: Any) -> Any:
  """Normalise a restore target to ShapeDtypeStructs with shardings.

  * concrete ``jax.Array`` -> ShapeDtypeStruct with the array's sharding;
  * ``jax.ShapeDtypeStruct`` with ``.sharding`` -> unchanged;
  * ``jax.ShapeDtypeStruct`` without sharding (e.g. from a plain
    ``jax.eval_shape``) -> placed on ``jax.local_devices()[0]``
    (``SingleDeviceSharding``);
  * ``np.ndarray`` / scalars -> unchanged (restored as that type).
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree.map(one, tree)


class CheckpointMismatchError(ValueError):
  """A saved array's shape differs from the one this run needs (another model or vocabulary):
  one line naming the checkpoint step, the leaf and both shapes. Never a reason to fall back
  to an older step: every step of the directory was written by the same run."""


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path of names: shape} of every leaf with a shape (arrays, ShapeDtypeStructs, orbax
  ArrayMetadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out[tuple(_key_name(k) for k in path)] = tuple(int(d) for d in shape)
  return out


def _fit_restore_args(target: Any, saved: Any, where: str) -> tuple[Any, list[str]]:
  """``_restore_args_for(target)``, allowing one difference from the ``saved`` tree's shapes
  (orbax metadata): an embedding table (or its optimiser moments) saved before large tables
  were padded to a multiple of 1024 rows (``sass_jax.model.embedding.padded_rows``). Such a
  leaf has the same trailing shape and a few more rows now (``embedding.repadded``); it is read
  with orbax's padding (``strict=False``), the added rows zero -- ids never address them.

  Returns (restore args, ["path: saved rows -> rows", ...] of the padded leaves). Raises
  CheckpointMismatchError for any other shape difference, naming ``where``, the leaf and both
  shapes."""
  from sass_jax.model.embedding import repadded

  args = _restore_args_for(target)
  have = _leaf_shapes(saved)
  grown = {}
  for path, shape in _leaf_shapes(target).items():
    old = have.get(path)
    if old is None or old == shape:
      continue
    name = "/".join(path)
    if len(old) == len(shape) >= 1 and old[1:] == shape[1:] and repadded(old[0], shape[0]):
      grown[path] = f"{name}: {old[0]:,} -> {shape[0]:,} rows"
      continue
    raise CheckpointMismatchError(
      f"{where}: {name} is saved with shape {old} but this run's model needs {shape}; the "
      "checkpoint was written for another model or vocabulary (use the config that wrote it, "
      "or a new workdir)"
    )
  if not grown:
    return args, []
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    args, is_leaf=lambda x: isinstance(x, ocp.RestoreArgs)
  )
  leaves = []
  for path, a in flat:
    if tuple(_key_name(k) for k in path) in grown and isinstance(a, ocp.ArrayRestoreArgs):
      a = dataclasses.replace(a, strict=False)
    leaves.append(a)
  return jax.tree_util.tree_unflatten(treedef, leaves), sorted(grown.values())


def _restore_args_for(target: Any) -> Any:
  """``ocp.ArrayRestoreArgs``/``RestoreArgs`` pytree matching `target`.

  Each sharded ShapeDtypeStruct leaf is restored as a ``jax.Array`` laid out
  with its sharding (any mesh: orbax/tensorstore reads only the slices each
  device needs, so the mesh used at save time is irrelevant); numpy / scalar
  leaves are restored as their own type.
  """
  return ocp.checkpoint_utils.construct_restore_args(target)


def _jsonable(obj: Any) -> Any:
  """Make `obj` acceptable to ``json.dumps``: numpy scalars/arrays ->
  Python scalars/lists, tuples -> lists, paths -> str, dict keys -> str.
  Anything else is passed through (``json`` raises TypeError on it)."""
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, (np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  return obj


class Checkpointer:
  """Orbax CheckpointManager wrapper for one training stage directory.

  Args:
    directory: Stage directory; created if missing.  Step ``s`` lives in
      ``<directory>/<s>/{state,metadata,data_state}``.
    max_to_keep: Keep at most this many most-recent steps; older ones are
      deleted after each successful save.  ``None`` keeps all.
    save_interval_steps: :meth:`save` only writes when
      ``step % save_interval_steps == 0`` (unless ``force=True``).
    async_save: If True, array data is written in a background thread and
      :meth:`save` returns once device buffers are copied to host; call
      :meth:`wait_until_finished` (or :meth:`close`) before relying on the
      files.  :meth:`restore` / :meth:`restore_params` wait for pending
      saves first.

  Usable as a context manager (``with Checkpointer(d) as ckpt: ...``),
  which calls :meth:`close` on exit.
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    save_interval_steps: int = 1,
    async_save: bool = False,
  ):
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    # Steps skipped by the last restore with step=None because they could not be read.
    self.unreadable_steps: list[int] = []
    # The step the last successful restore read (None before any).
    self.restored_step: int | None = None
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      create=True,
      # Remove tmp dirs left behind by interrupted saves.
      cleanup_tmp_directories=True,
    )
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        _STATE: ocp.PyTreeCheckpointHandler(),
        _METADATA: ocp.JsonCheckpointHandler(),
        _DATA_STATE: ocp.JsonCheckpointHandler(),
      },
    )

  # ------------------------------------------------------------------ save
  def save(
    self,
    step: int,
    state: Any,
    *,
    metadata: dict | None = None,
    data_state: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Save `state` plus JSON `metadata` / `data_state` as step `step`.

    Args:
      step: Integer step number (directory name).  Must be greater than
        :meth:`latest_step` (orbax skips non-increasing steps unless
        ``force``; forcing an existing step raises).
      state: Pytree of ``jax.Array`` (possibly sharded over a Mesh),
        ``np.ndarray``, numpy or Python scalars -- typically a
        ``flax.struct.PyTreeNode`` with ``step``/``params``/``opt_state``/
        ``rng``.  Its top level must expose ``params`` (attribute or dict
        key) for :meth:`restore_params`.
      metadata: JSON-like dict (config, stage name, ...); ``{}`` is
        stored if None.  numpy scalars/arrays, tuples and paths are
        converted to JSON types first (so they come back as Python
        scalars / lists / str).
      data_state: Optional JSON-like input-iterator state (same
        conversion); not written if None.
      force: Save even if ``save_interval_steps`` says not to.

    Returns:
      True if a checkpoint was written (or, with ``async_save``, started).

    Raises:
      orbax ``StepAlreadyExistsError`` (a ValueError) if ``force`` and the
      step already exists; TypeError from ``json`` for non-serialisable
      metadata; whatever the write raised (e.g. a full disk), after the
      step's temporary directory has been removed (:meth:`discard_partial`).
    """
    items = {
      _STATE: ocp.args.PyTreeSave(state),
      _METADATA: ocp.args.JsonSave(_jsonable(dict(metadata or {}))),
    }
    if data_state is not None:
      items[_DATA_STATE] = ocp.args.JsonSave(_jsonable(data_state))
    try:
      return bool(self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force))
    except BaseException:
      self.discard_partial(step)
      raise

  def discard_partial(self, step: int) -> list[str]:
    """Remove the temporary directories of an interrupted save of ``step``
    (``<dir>/<step>.orbax-checkpoint-tmp*``; process 0), so that a failed
    save (disk full, ...) leaves nothing half-written. Returns their names."""
    if jax.process_index() != 0:
      return []
    gone = []
    for p in self.directory.glob(f"{int(step)}.orbax-checkpoint-tmp*"):
      shutil.rmtree(os.fspath(p), ignore_errors=True)
      gone.append(p.name)
    return gone

  # ----------------------------------------------------------------- query
  def _refresh(self) -> None:
    """Re-read the step list from disk (sees steps written by other
    processes), unless an async save of ours is in flight -- reloading
    then would drop that step from orbax's bookkeeping."""
    if not self._mngr.is_saving_in_progress():
      self._mngr.reload()

  def latest_step(self) -> int | None:
    """Largest saved step in the directory, or None if there is none.

    With ``async_save`` this includes a step whose write is still in
    flight; :meth:`restore` waits for it.  Interrupted saves never count.
    """
    self._refresh()
    step = self._mngr.latest_step()
    return None if step is None else int(step)

  def all_steps(self) -> list[int]:
    """Sorted list of saved steps (same caveat as :meth:`latest_step`)."""
    self._refresh()
    return sorted(int(s) for s in self._mngr.all_steps())

  def _candidates(self, step: int | None) -> list[int]:
    """Wait for pending saves, then the steps to try: ``[step]`` if given
    (FileNotFoundError naming the directory if it does not exist), else
    every saved step, newest first (FileNotFoundError if none)."""
    self._mngr.wait_until_finished()
    self._mngr.reload()
    steps = sorted(int(s) for s in self._mngr.all_steps())
    if step is None:
      if not steps:
        raise FileNotFoundError(f"No checkpoint found in directory {self.directory}")
      return steps[::-1]
    step = int(step)
    if step not in steps:
      raise FileNotFoundError(
        f"No checkpoint for step {step} in directory {self.directory} (available steps: {steps})"
      )
    return [step]

  def _restore_with_fallback(
    self,
    step: int | None,
    restore_one: Callable[[int], Any],
    metadata_only: bool = False,
  ) -> Any:
    """``restore_one(s)`` for the requested step; with ``step=None`` for
    the newest step that restores, warning about each newer one that fails.
    Sets :attr:`restored_step` to the step that restored.

    ``metadata_only``: ``restore_one`` reads only the JSON metadata; a
    failure is then reported as unreadable metadata (the step's state may
    be fine) and does not count in :attr:`unreadable_steps`.

    Raises the newest step's error if no step restores (an explicit
    ``step`` is never replaced by another).
    """
    candidates = self._candidates(step)
    failed: list[tuple[int, Exception]] = []
    for i, s in enumerate(candidates):
      try:
        out = restore_one(s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-exception-caught
        if step is not None:
          raise
        failed.append((s, e))
        more = i + 1 < len(candidates)
        why = (type(e).__name__, (str(e).splitlines() or [""])[0][:300])
        if metadata_only:
          log.warning(
            "the metadata of checkpoint step %d in %s is unreadable (%s: %s); %s",
            s,
            self.directory,
            *why,
            f"reading that of step {candidates[i + 1]} instead" if more else "no older step left",
          )
        else:
          log.warning(
            "checkpoint step %d in %s could not be restored (%s: %s); %s",
            s,
            self.directory,
            *why,
            f"falling back to step {candidates[i + 1]}" if more else "no older step left",
          )
        continue
      if not metadata_only:
        self.unreadable_steps = [f for f, _ in failed]
      self.restored_step = s
      return out
    raise failed[0][1]

  def set_aside_unreadable(self) -> list[int]:
    """Rename the steps the last restore skipped (:attr:`unreadable_steps`)
    to ``<dir>/<step>.unreadable`` (kept for inspection, invisible to
    orbax), so that those step numbers can be saved again.  Process 0
    renames; every process must call this.  Returns the steps moved."""
    moved = sorted(self.unreadable_steps)
    if moved and jax.process_index() == 0:
      for s in moved:
        src = self._step_dir(s)
        dst = self.directory / f"{s}.unreadable"
        n = 1
        while dst.exists():
          dst = self.directory / f"{s}.unreadable.{n}"
          n += 1
        if src.exists():
          src.rename(dst)
          log.warning("moved unreadable checkpoint %s to %s", src, dst)
    if moved and jax.process_count() > 1:
      ocp.multihost.sync_global_processes("sass_jax_set_aside_unreadable")
    self.unreadable_steps = []
    self._mngr.reload()
    return moved

  def reached_preemption(self, step: int) -> bool:
    """True when JAX's preemption service (multi-process runs started with
    ``jax.distributed.initialize``) has been notified of a preemption and
    ``step`` is the sync point every process agrees to stop at; False
    otherwise (always False in a single process)."""
    return bool(self._mngr.reached_preemption(int(step)))

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # --------------------------------------------------------------- restore
  def _fitted_args(self, step: int, target: Any) -> Any:
    """Restore args of ``target`` checked against step ``step``'s saved shapes
    (``_fit_restore_args``; warns about re-padded tables). Without readable metadata the plain
    args (orbax then reports any mismatch itself)."""
    try:
      saved = self._mngr.item_metadata(step)[_STATE]
      saved = getattr(saved, "tree", saved)
    except Exception:  # pylint: disable=broad-exception-caught
      return _restore_args_for(target)
    args, grown = _fit_restore_args(target, saved, f"checkpoint step {step} in {self.directory}")
    if grown:
      log.warning(
        "checkpoint step %d in %s was saved before tables of >= 65,536 rows were padded to a "
        "multiple of 1024; restoring %s with the added rows zero (no id addresses them)",
        step,
        self.directory,
        "; ".join(grown),
      )
    return args

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict | None]:
    """Restore the full state, metadata and data-iterator state.

    Args:
      abstract_state: Pytree with the structure of the saved state (e.g.
        the same ``flax.struct`` dataclass) whose leaves are
        ``jax.ShapeDtypeStruct`` -- each with ``.sharding`` (e.g. a
        ``NamedSharding`` on the *current* mesh, which may differ from the
        mesh used at save time; without sharding the leaf goes to the
        first local device) -- or concrete arrays whose shardings are
        used (their values are ignored).
        Typical: ``jax.eval_shape(init_fn)`` with shardings attached.
      step: Step to restore; None -> :meth:`latest_step`, falling back
        to older steps (with a warning) if it cannot be read.

    Returns:
      ``(state, metadata, data_state)``: ``state`` has the pytree
      structure (dataclass type included) of ``abstract_state`` with
      arrays of the saved values, shapes and dtypes laid out as
      requested; ``metadata`` is the saved dict; ``data_state`` is the
      saved dict or None if none was saved.

    Raises:
      FileNotFoundError: no checkpoint (at `step`) in the directory; the
        message names the directory.
      CheckpointMismatchError: a saved array's shape differs from the
        target's (other than a re-padded table, restored zero-padded).
      ValueError: `abstract_state` structure does not match the saved tree.
    """
    abstract_state = _abstractify(abstract_state)

    def restore_one(step):
      items = {
        _STATE: ocp.args.PyTreeRestore(
          item=abstract_state,
          restore_args=self._fitted_args(step, abstract_state),
        ),
        _METADATA: ocp.args.JsonRestore(),
      }
      has_data_state = (self._step_dir(step) / _DATA_STATE).exists()
      if has_data_state:
        items[_DATA_STATE] = ocp.args.JsonRestore()
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        metadata = restored[_METADATA]
      except Exception as e:  # pylint: disable=broad-exception-caught
        # Only the metadata unreadable? Then restore the step without it.
        del items[_METADATA]
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        log.warning(
          "the metadata of checkpoint step %d in %s is unreadable (%s: %s); "
          "restored the step's state without it",
          step,
          self.directory,
          type(e).__name__,
          (str(e).splitlines() or [""])[0][:300],
        )
        metadata = {}
      data_state = restored[_DATA_STATE] if has_data_state else None
      return restored[_STATE], dict(metadata or {}), data_state

    return self._restore_with_fallback(step, restore_one)

  def restore_metadata(self, step: int | None = None) -> dict:
    """The JSON ``metadata`` dict saved with a step (None -> latest, with
    the same fallback as :meth:`restore`); nothing else is read.

    Raises:
      FileNotFoundError: no checkpoint (at `step`) in the directory.
    """

    def restore_one(step):
      restored = self._mngr.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
      )
      return dict(restored[_METADATA] or {})

    return self._restore_with_fallback(step, restore_one, metadata_only=True)

  def restore_fields(self, abstract_fields: dict, step: int | None = None) -> dict:
    """Restore only the named top-level fields of the saved state.

    ``abstract_fields`` maps field names (e.g. ``'params'``, ``'model_state'``) to
    pytrees of abstract leaves as in :meth:`restore`. Uses orbax partial restore, so
    nothing else is read from disk. Returns a dict with the same keys. Empty fields
    (e.g. ``model_state={}``) are returned as given without reading.

    Raises:
      FileNotFoundError: no checkpoint (at `step`) in the directory.
      ValueError: structure mismatch with the saved state.
    """
    wanted = {k: v for k, v in abstract_fields.items() if jax.tree.leaves(v)}
    out = {k: v for k, v in abstract_fields.items() if k not in wanted}
    if not wanted:
      # FileNotFoundError if there is no such step
      self.restored_step = self._candidates(step)[0]
      return out
    item = {k: _abstractify(v) for k, v in wanted.items()}

    def restore_one(step):
      restored = self._mngr.restore(
        step,
        args=ocp.args.Composite(
          **{
            _STATE: ocp.args.PyTreeRestore(
              item=item,
              restore_args=self._fitted_args(step, item),
              partial_restore=True,
            )
          }
        ),
      )
      st = restored[_STATE]
      return {k: st[k] if isinstance(st, dict) else getattr(st, k) for k in wanted}

    return {**out, **self._restore_with_fallback(step, restore_one)}

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Restore only ``state.params`` (for evaluation).

    Uses orbax partial restore (``ocp.args.PyTreeRestore(item=
    {'params': abstract_params}, partial_restore=True)``): only the
    ``params`` leaves are read from disk; optimiser state, step and rng
    are never read.

    Args:
      abstract_params: Pytree with the structure of the saved
        ``state.params`` (nested dict), leaves as in :meth:`restore`
        (ShapeDtypeStruct with/without sharding or concrete arrays).
      step: Step to restore; None -> latest (falling back to older steps
        with a warning if it cannot be read).

    Returns:
      The params pytree (structure of `abstract_params`).

    Raises:
      FileNotFoundError: no checkpoint (at `step`) in the directory.
      ValueError: structure mismatch with the saved ``params``.
    """
    return self.restore_fields({_PARAMS: abstract_params}, step)[_PARAMS]

  # ------------------------------------------------------------- lifecycle
  def wait_until_finished(self) -> None:
    """Block until any in-flight (async) save is finalised."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Wait for pending saves and release orbax resources."""
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close()

  def __repr__(self) -> str:
    return f"Checkpointer({str(self.directory)!r})"
