"""Stages, logging and checkpoint cadence: the library behind every CLI mode.

``prepare(cfg, workdir)`` -> prepared store; ``train_stage(...)`` runs one stage (pre-training or
fine-tuning) with resume from the stage's latest checkpoint; ``train(cfg, workdir)`` runs
pre-training (unless ``config.pretrain.num_steps == 0``, e.g. SASS-Base) then fine-tuning from
the pre-trained parameters, then evaluation; ``evaluate_workdir`` restores the latest
fine-tuned parameters and writes ``WORKDIR/metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from sass_jax import aot
from sass_jax import checkpoint as ckpt_lib
from sass_jax import config_check
from sass_jax.data import get_preparer, pipeline, store
from sass_jax.eval import evaluate as eval_lib
from sass_jax.model import registry
from sass_jax.model.protocol import TwoTowerModel
from sass_jax.partition import Partitioner
from sass_jax.train import monitor, sparse, steps
from sass_jax.train.stages import (
  STAGES,
  labelled_batch_size,
  stage_block,
  stage_config,
  stage_seed,
)

log = logging.getLogger("sass_jax")


def saved_steps(workdir: str | Path, stage: str | None = None) -> dict[str, list[int]]:
  """{stage: sorted saved steps} of ``WORKDIR/checkpoints/<stage>`` (every stage directory
  when ``stage`` is None), stages without a saved step left out. Reads directory names only
  (committed orbax steps are ``<step>/``; interrupted saves and set-aside steps are not counted)
  and creates nothing."""
  root = Path(workdir) / "checkpoints"
  dirs = [root / stage] if stage else (sorted(root.iterdir()) if root.is_dir() else [])
  out = {}
  for d in dirs:
    if d.is_dir():
      steps = sorted(int(x.name) for x in d.iterdir() if x.name.isdigit() and x.is_dir())
      if steps:
        out[d.name] = steps
  return out


def require_finetune_checkpoint(workdir: str | Path) -> None:
  """Raise FileNotFoundError unless ``WORKDIR/checkpoints/finetune`` holds a saved step
  (checked before any data is prepared; nothing is created)."""
  if not saved_steps(workdir, "finetune"):
    raise FileNotFoundError(
      f"no fine-tuned checkpoint in "
      f"{Path(workdir) / 'checkpoints' / 'finetune'}; run --mode train "
      "(or finetune) first"
    )


def require_pretrained(cfg, workdir: str | Path, stages=STAGES) -> None:
  """Raise FileNotFoundError, saying what to run instead, when ``stages`` fine-tune without
  pre-training first although the model is fine-tuned from pre-trained parameters
  (``config.pretrain.num_steps > 0``) and ``WORKDIR/checkpoints/pretrain`` holds no saved
  step. Reads directory names only; creates nothing."""
  if (
    cfg.pretrain.num_steps > 0
    and "finetune" in stages
    and "pretrain" not in stages
    and not saved_steps(workdir, "pretrain")
  ):
    raise FileNotFoundError(
      f"--mode finetune starts from the pre-trained {cfg.model.name} model, but "
      f"{Path(workdir) / 'checkpoints' / 'pretrain'} holds no pre-training checkpoint. Run "
      "--mode pretrain first, or --mode train (pre-training, then fine-tuning), or fine-tune "
      "without pre-training: the sass_base variant (e.g. --config configs/movielens.py:"
      "sass_base) or --config.pretrain.num_steps=0"
    )


def _source_changes(manifest: dict, data_dir) -> list[str]:
  """Keys of the source files of a prepared store whose bytes changed since it was prepared
  (``store.changed_sources``: size + mtime first, sha256 when they differ; a file found neither
  at ``data_dir`` nor where it was read is not compared)."""
  return [key for key, _ in store.changed_sources(manifest, data_dir)]


def _refuse_to_replace_trained_data(cfg, workdir: str | Path, force: bool) -> None:
  """Raise ValueError if preparing would replace ``WORKDIR/data`` under saved checkpoints:
  the store's ``config.data`` options differ from ``cfg.data`` (or, with ``force``, a source
  file changed). Nothing is touched."""
  out = Path(workdir) / "data"
  if not store.is_complete(out):
    return
  ckpts = saved_steps(workdir)
  if not ckpts:
    return
  try:
    manifest = json.loads((out / "manifest.json").read_text())
  except (OSError, ValueError):
    return  # unreadable manifest: open_store reports it
  now = store.data_options(cfg.data)
  saved = manifest.get("options")
  diffs = [
    f"config.data.{d}"
    for d in config_check.diff_configs(saved if isinstance(saved, dict) else {}, now, ())
  ]
  if force and not diffs:
    data_dir = cfg.data.get("dir")
    diffs = [
      f"source file {n} (changed at config.data.dir={data_dir!r})"
      if data_dir
      else f"source file {n} (changed)"
      for n in _source_changes(manifest, data_dir)
    ]
  if not diffs:
    return
  held = ", ".join(f"{st} steps {v}" for st, v in ckpts.items())
  raise ValueError(
    f"{out} holds the prepared data that the checkpoints in {Path(workdir) / 'checkpoints'} "
    f"({held}) were trained on, and the config differs from it: {'; '.join(diffs)}. "
    "Preparing again would replace the data under those checkpoints, so nothing was changed. "
    "Use a new --workdir for the new data, or restore the original values."
  )


def prepare(cfg, workdir: str | Path, force: bool = False) -> store.PreparedData:
  """Prepare ``config.data`` into ``WORKDIR/data`` (reused if its options are unchanged).

  With several processes only process 0 prepares; the others wait for it and then open the
  store (WORKDIR must be on a filesystem every process sees).
  Raises ValueError for an unknown ``config.data.name``, and -- without touching the store --
  when ``WORKDIR/checkpoints`` holds a saved step and the store was prepared with other
  ``config.data`` values (with ``force``, also when a source file changed): the message names
  the differing fields. Without checkpoints a changed config prepares the data again.
  Without ``force`` a store whose options match is reused only if its source files are
  unchanged (size + mtime, else sha256); a changed one raises store.DataError naming the file.
  Temporary copies of the store left by killed processes are removed first
  (``store.remove_stale_temps``).
  """
  _refuse_to_replace_trained_data(cfg, workdir, force)
  if jax.process_count() == 1:
    return _prepare_here(cfg, workdir, force)
  from jax.experimental import multihost_utils

  data = _prepare_here(cfg, workdir, force) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("sass_jax.loop.prepare")
  return data if data is not None else store.open_store(Path(workdir) / "data")


def _check_sources_unchanged(data: store.PreparedData, cfg, workdir) -> None:
  """Raise DataError naming a source file that changed since ``data`` was prepared from it."""
  changed = store.changed_sources(data.manifest, cfg.data.get("dir"))
  if not changed:
    return
  key, path = changed[0]
  more = (
    f" (and {len(changed) - 1} more: {', '.join(k for k, _ in changed[1:])})"
    if len(changed) > 1
    else ""
  )
  if saved_steps(workdir):
    todo = (
      f"the checkpoints in {Path(workdir) / 'checkpoints'} were trained on the data as it "
      "was, so use a new --workdir for the new data, or restore the original file"
    )
  else:
    todo = "run --mode prepare to prepare the data again, or use a new --workdir"
  raise store.DataError(
    f"{path}: changed since {data.path} was prepared from it (its size or "
    f"sha256 differ from the manifest's record){more}; {todo}"
  )


def _prepare_here(cfg, workdir: str | Path, force: bool = False) -> store.PreparedData:
  preparer = get_preparer(cfg.data.name)
  out = Path(workdir) / "data"
  store.remove_stale_temps(out)
  if not force and store.is_complete(out):
    data = store.open_store(out)
    if data.manifest.get("options") == store.data_options(cfg.data):
      _check_sources_unchanged(data, cfg, workdir)
      log.info("using prepared data at %s", out)
      return data
    log.info("config.data changed since %s was prepared; preparing again", out)
  t = time.time()
  preparer(cfg.data, out)
  data = store.open_store(out)
  m = data.manifest
  log.info(
    "prepared %s in %.1fs: %d interactions (split %s), %d users, %d items, rejected %s",
    cfg.data.name,
    time.time() - t,
    m["num_interactions"],
    m["split_counts"],
    m["num_users"],
    m["num_items"],
    m.get("rows_rejected") or "none",
  )
  return data


def build_model(cfg, data: store.PreparedData) -> TwoTowerModel:
  """The two-tower model named by ``config.model.name`` for the data's fields and scenarios
  (``registry.build``). Raises ValueError for an unknown name or option."""
  return registry.build(cfg.model, data.user_specs, data.item_specs, data.num_scenarios)


def example_batch(data: store.PreparedData) -> dict:
  """A 2-row batch of the data's shapes ({'user', 'item', 'scenario'}) for model.init."""
  rows = np.zeros(2, np.int64)
  return {
    "user": pipeline.gather_features(data.users, data.user_masks, rows),
    "item": pipeline.gather_features(data.items, data.item_masks, rows),
    "scenario": np.zeros(2, np.int32),
  }


def _checkpointer(cfg, workdir, stage) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(
    Path(workdir).absolute() / "checkpoints" / stage,
    max_to_keep=cfg.checkpoint.max_to_keep,
    save_interval_steps=max(1, cfg.checkpoint.every_steps),
  )


def _keep_log_until(path: Path, step: int) -> None:
  """Drop the lines of a ``<stage>_log.jsonl`` logged after ``step`` (by a run that was
  interrupted after its last checkpoint), so a resumed run does not log those steps twice."""
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a crash
  if len(keep) != len(lines):
    path.write_text("".join(keep))


def batch_source(
  cfg,
  data: store.PreparedData,
  stage: str,
  batch_size: int,
  seed: int,
  num_batches: int,
  part: Partitioner,
  kind: str | None = None,
  labelled: int = 0,
):
  """``(iterator, place)``: the stage's batches and the function that puts one on the mesh.

  ``kind`` None: 'resident' if ``config.train.resident_on_device`` else 'grain'.
  'grain': the grain pipeline (``pipeline.make_iterator``, this process's rows of each global
  batch) and ``part.shard_batch``. 'resident': ``data.resident.ResidentSampler`` (the stream's
  rows and the entity tables copied to the device once, each batch gathered there; single
  process only), whose batches are already placed, so ``place`` is the identity. The two
  samplers visit every row once per epoch but in different orders. 'numpy' (benchmarks where
  grain is not installed): the grain pipeline's batches from ``pipeline.BatchIterator``, one
  thread, without ``get_state``. Raises ValueError for another kind and as ``ResidentSampler``
  does (several processes, batch larger than the stream).
  ``labelled`` > 0 (fine-tuning with ``config.train.labelled_weight`` > 0,
  ``stages.labelled_batch_size``): each batch also carries ``batch['labelled']``, that many
  labelled exposures of the training split (``pipeline.BatchFn``); grain and 'numpy' only
  (the resident sampler raises ValueError; config_check rejects that combination first).
  """
  if kind is None:
    kind = "resident" if cfg.train.resident_on_device else "grain"
  if kind == "resident":
    from sass_jax.data.resident import ResidentSampler

    if labelled:
      raise ValueError(
        "config.train.labelled_weight > 0 needs the grain pipeline; set "
        "config.train.resident_on_device=False"
      )

    return ResidentSampler(data, stage, batch_size, seed, part.batch_sharding()), lambda b: b
  if kind == "grain":
    return (
      pipeline.make_iterator(
        data, stage, batch_size, seed, num_batches, *part.data_shard(), labelled=labelled
      ),
      part.shard_batch,
    )
  if kind == "numpy":
    return (
      pipeline.BatchIterator(
        pipeline.BatchFn(data, stage, batch_size, seed, *part.data_shard(), labelled=labelled)
      ),
      part.shard_batch,
    )
  raise ValueError(f"unknown input source {kind!r}; expected 'grain', 'resident' or 'numpy'")


def _resume_iterator(it, data_state, cfg, step: int) -> None:
  """Restore the data position; a checkpoint written by the other sampler is a clear error."""
  resident = bool(cfg.train.resident_on_device)
  saved_resident = isinstance(data_state, dict) and data_state.get("sampler") == "resident"
  if resident != saved_resident:
    raise ValueError(
      f"the checkpoint at step {step} was written with config.train.resident_on_device="
      f"{saved_resident}, and the two samplers order the rows differently; resume with "
      f"--config.train.resident_on_device={saved_resident} (or use a new workdir)"
    )
  it.set_state(data_state)


def _compiled_or_jitted(compiled, jitted):
  """A step that runs the preflight's compiled executable, or -- if the first real batch does
  not match the abstract batch it was compiled for (nothing has run then) -- the jitted step."""
  use = [compiled]

  def step(state, batch):
    if use[0] is compiled:
      try:
        return compiled(state, batch)
      except (TypeError, ValueError) as e:
        log.info("compiled step does not take this batch (%s); compiling it again", e)
        use[0] = jitted
    return use[0](state, batch)

  return step


def train_stage(
  stage: str,
  cfg,
  data: store.PreparedData,
  model: TwoTowerModel,
  part: Partitioner,
  workdir: str | Path,
  init_params=None,
  show_progress: bool = True,
):
  """Run one stage to ``num_steps``, resuming from its latest checkpoint if there is one.

  Writes checkpoints to ``WORKDIR/checkpoints/<stage>`` every ``config.checkpoint.every_steps``
  and at the end, metrics every ``log_every`` steps to ``WORKDIR/<stage>_log.jsonl`` and to
  TensorBoard (``WORKDIR/tb/<stage>``, ``monitor.Monitor``). Resuming restores params, optimiser
  state, step, rng, model_state and the data-iterator position, so an interrupted and resumed
  stage ends with bitwise the same parameters as an uninterrupted one; a latest checkpoint that
  cannot be read is set aside (``<step>.unreadable``) and the previous one is used.
  Returns the final TrainState (sharded on the partitioner's mesh).

  Raises:
    aot.MemoryPreflightError: (a ValueError) the stage's compiled step needs more memory per
      device than ``config.mesh.memory_limit_bytes`` or, when that is 0, the device's
      ``bytes_limit`` (CPU reports none: not checked); raised before anything is allocated.
    FloatingPointError: a step's loss, gradient norm or parameter norm is not finite
      (``config.train.nan_policy='raise'``), or ``config.train.max_skips`` consecutive steps
      were skipped (``'skip'``); the message names the stage, step and quantity. Nothing
      non-finite is saved: the last checkpoint is the last good state.
    monitor.Preempted: SIGTERM (or a preemption notice) arrived; the step reached was finished
      and checkpointed first.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  scfg = stage_config(cfg, stage)
  where = f"config.{stage_block(stage)}"
  num_steps, bs = int(scfg.num_steps), int(scfg.batch_size)
  part.check_batch_size(bs, f"{where}.batch_size")
  lbs = labelled_batch_size(cfg, stage)  # 0: no labelled sub-batch
  if lbs:
    part.check_batch_size(lbs, "config.train.labelled_batch_size (or batch_size)")
  tx = steps.make_optimizer(scfg, num_steps)
  lr_at = steps.make_schedule(scfg, num_steps)
  seed = stage_seed(cfg, stage)
  # config.train.embedding_optimizer: 'dense' -> steps.make_init_fn / make_*_step as before;
  # 'lazy_adam' / 'rowwise_adagrad' -> row-sparse table updates (sparse.py).
  init_fn, stage_step = sparse.build(
    cfg,
    stage,
    model,
    tx,
    example_batch(data),
    seed,
    num_steps,
    init_params,
    batch_sharding=part.batch_sharding(),
  )
  abstract, shardings = part.abstract_state(init_fn)
  policy = cfg.train.nan_policy
  step_fn = steps.with_nan_policy(stage_step, policy, int(cfg.train.debug_nan_at_step))
  step_fn = part.compile_step(step_fn, shardings)
  limit = aot.memory_limit(cfg, part)
  if limit:  # compile first; stop before allocating anything if the step cannot fit
    given = int(cfg.mesh.memory_limit_bytes) > 0
    compiled = aot.preflight(
      stage,
      step_fn,
      abstract,
      aot.abstract_batch(
        data.user_specs, data.item_specs, stage, bs, part.batch_sharding(), labelled=lbs
      ),
      limit,
      "config.mesh.memory_limit_bytes" if given else "the device's bytes_limit",
    )
    step_fn = _compiled_or_jitted(compiled, step_fn)
  ckpt = _checkpointer(cfg, workdir, stage)
  bar = None
  try:
    data_state = None
    if ckpt.latest_step() is not None:
      state, _, data_state = ckpt.restore(abstract)
      ckpt.set_aside_unreadable()
      log.info("%s: resumed from step %d of %s", stage, int(state.step), ckpt.directory)
    else:
      state, _ = part.init(init_fn)
      log.info(
        "%s: initialised %s (%d parameters)",
        stage,
        "from the pre-trained model" if init_params is not None else "at random",
        sum(x.size for x in jax.tree.leaves(state.params)),
      )
    start = int(state.step)
    if start >= num_steps:
      return state
    it, place = batch_source(cfg, data, stage, bs, seed, num_steps, part, labelled=lbs)
    if data_state:
      _resume_iterator(it, data_state, cfg, int(state.step))
    max_skips = int(cfg.train.max_skips)
    log_every = max(1, int(cfg.train.log_every))
    every = int(cfg.checkpoint.every_steps)
    log_path = Path(workdir) / f"{stage}_log.jsonl"
    writer = jax.process_index() == 0
    if writer:
      _keep_log_until(log_path, start)
    meta = {"stage": stage, "config": cfg.to_dict()}
    skipped = {"total": 0, "run": 0}

    def checked(step: int, m) -> dict:
      """Host copy of a step's metrics; raises FloatingPointError per the nan policy."""
      h = {k: float(v) for k, v in jax.device_get(m).items()}
      if policy == "skip":
        if h.pop("skipped"):
          skipped["total"] += 1
          skipped["run"] += 1
          log.warning(
            "%s step %d: non-finite %s; update skipped (%d in a row)",
            stage,
            step,
            monitor.first_nonfinite(h),
            skipped["run"],
          )
          if skipped["run"] >= max_skips:
            raise FloatingPointError(
              f"{stage} step {step}: {skipped['run']} consecutive steps with a non-finite "
              f"{monitor.first_nonfinite(h)} (loss={h['loss']}, grad_norm={h['grad_norm']}) "
              f"were skipped (config.train.max_skips={max_skips}); the last checkpoint "
              f"(step {ckpt.latest_step()}) in {ckpt.directory} holds the last good state. "
              f"Lower {where}.learning_rate."
            )
        else:
          skipped["run"] = 0
        h["skipped_steps"] = skipped["total"]
      elif bad := monitor.first_nonfinite(h):
        raise FloatingPointError(
          f"{stage} step {step}: non-finite {bad} ({h[bad]}; loss={h['loss']}, "
          f"grad_norm={h['grad_norm']}, param_norm={h['param_norm']}). Stopped without "
          f"saving it: the last checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} "
          f"holds the last good state. Lower {where}.learning_rate, or set "
          "config.train.nan_policy='skip' to discard such steps."
        )
      return h

    bar = tqdm(
      total=num_steps,
      initial=start,
      desc=stage,
      unit="step",
      dynamic_ncols=True,
      disable=not show_progress or not writer,
    )
    t0, n0 = time.time(), start
    pending, h = None, {}
    with (
      monitor.Monitor(workdir, stage, start, config=meta["config"]) as mon,
      monitor.PreemptionWatch(ckpt) as watch,
      open(log_path, "a") if writer else contextlib.nullcontext() as logf,
    ):
      for step in range(start + 1, num_steps + 1):
        state, m = step_fn(state, place(next(it)))
        if pending is not None:  # the previous step, checked while this one runs
          checked(*pending)
        pending = (step, m)
        stop = watch.should_stop(step)
        log_now = step % log_every == 0 or step == num_steps
        save_now = stop or step % every == 0 or step == num_steps
        if log_now or save_now:  # never log or save a non-finite state
          h = checked(step, m)
          pending = None
        if log_now:
          h["learning_rate"] = float(lr_at(step - 1))
          h["samples_per_s"] = (step - n0) * bs / max(time.time() - t0, 1e-9)
          t0, n0 = time.time(), step
          h["step"] = step
          if writer:
            logf.write(json.dumps(h) + "\n")
            logf.flush()
          mon.log(step, h)
          bar.set_postfix(loss=f"{h['loss']:.4f}", samples_s=f"{h['samples_per_s']:.0f}")
        bar.update(1)
        if save_now:
          ckpt.save(step, state, metadata=meta, data_state=it.get_state(), force=True)
        if stop and step < num_steps:
          ckpt.wait_until_finished()
          bar.close()
          raise monitor.Preempted(stage, step, ckpt.directory, cause=watch.cause)
    bar.close()
    ckpt.wait_until_finished()
    log.info(
      "%s: finished %d steps; last metrics %s",
      stage,
      num_steps,
      {k: round(v, 4) for k, v in h.items()},
    )
    return state
  finally:
    if bar is not None:
      bar.close()  # ends the progress line, so an error message starts on its own line
    ckpt.close()


class UnreadableCheckpointError(ValueError):
  """A checkpoint step that evaluation was asked for (or would have to skip) cannot be read;
  the message names the step, the directory and what to run instead."""


def restore_variables_and_step(
  cfg, workdir, stage, model, part, data, step: int | None = None, fallback: bool = True
) -> tuple[dict, int]:
  """(variables, step): :func:`restore_variables` and the checkpoint step it read.

  ``step``: restore exactly that step (None: the latest). ``fallback`` (with ``step=None``):
  if the latest step cannot be read, use the newest older one that can (with a warning, as
  training does); without it, the unreadable latest step is set aside as
  ``<step>.unreadable`` (as training would) and UnreadableCheckpointError is raised naming it.

  Raises FileNotFoundError if the stage has no checkpoint (at ``step``) in ``workdir``,
  UnreadableCheckpointError as above or when the requested ``step`` cannot be read.
  """
  scfg = stage_config(cfg, stage)
  tx = steps.make_optimizer(scfg, int(scfg.num_steps))
  abstract, _ = part.abstract_state(steps.make_init_fn(model, tx, example_batch(data), cfg.seed))
  fields = {"params": abstract.params, "model_state": abstract.model_state}
  with _checkpointer(cfg, workdir, stage) as ck:
    want = step
    if want is None and not fallback:
      want = ck.latest_step()
      if want is None:
        raise FileNotFoundError(f"No checkpoint found in directory {ck.directory}")
    try:
      got = ck.restore_fields(fields, step=want)
    except FileNotFoundError:
      raise
    except Exception as e:  # pylint: disable=broad-exception-caught
      if want is None:
        raise
      why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
      rest = [x for x in ck.all_steps() if x != want]
      if step is None:  # the latest step: set it aside, as training would
        ck.unreadable_steps = [want]
        ck.set_aside_unreadable()
        raise UnreadableCheckpointError(
          f"the latest {stage} checkpoint, step {want} in {ck.directory}, cannot be read "
          f"({why}); it was set aside as {ck.directory / f'{want}.unreadable'} and nothing "
          "was evaluated. "
          + (
            f"Evaluate an older step explicitly with --config.eval.step=N (saved: {rest}) "
            "or let evaluation fall back with --config.eval.fallback=True"
            if rest
            else "No other step is saved; train again to write one"
          )
        ) from e
      raise UnreadableCheckpointError(
        f"{stage} checkpoint step {want} in {ck.directory} cannot be read ({why}); saved "
        f"steps: {ck.all_steps()}"
      ) from e
    read = int(ck.restored_step)
    ck.set_aside_unreadable()  # steps skipped by a fallback, as training does
  log.info("%s: restored the parameters of step %d from %s", stage, read, ck.directory)
  return {"params": got["params"], **got["model_state"]}, read


def restore_variables(cfg, workdir, stage, model, part, data) -> dict:
  """The model variables ``{'params': ..., **model_state}`` of a stage's latest checkpoint,
  placed on ``part``'s mesh (which may differ from the mesh that saved them).

  Raises FileNotFoundError if the stage has no checkpoint in ``workdir``.
  """
  return restore_variables_and_step(cfg, workdir, stage, model, part, data)[0]


def train(
  cfg, workdir: str | Path, stages=STAGES, evaluate: bool = True, show_progress: bool = True
) -> dict | None:
  """Prepare, pre-train (if ``config.pretrain.num_steps > 0``), fine-tune, evaluate.

  ``stages`` limits what runs ('pretrain', 'finetune'); fine-tuning starts from the latest
  pre-training checkpoint when pre-training is enabled. Returns the metrics dict (or None).
  """
  workdir = Path(workdir)
  config_check.validate(cfg, workdir=workdir, stages=stages)  # before any work
  require_pretrained(cfg, workdir, stages)
  pretrain = cfg.pretrain.num_steps > 0
  workdir.mkdir(parents=True, exist_ok=True)
  data = prepare(cfg, workdir)
  model = build_model(cfg, data)
  part = Partitioner(cfg.mesh)
  config_check.validate(cfg, data, part, stages=stages)
  log.info(
    "mesh %s over %d device(s) (%s)",
    dict(part.mesh.shape),
    part.mesh.size,
    jax.devices()[0].platform,
  )
  if pretrain and "pretrain" in stages:
    train_stage("pretrain", cfg, data, model, part, workdir, show_progress=show_progress)
  if "finetune" in stages:
    init = restore_variables(cfg, workdir, "pretrain", model, part, data) if pretrain else None
    train_stage(
      "finetune", cfg, data, model, part, workdir, init_params=init, show_progress=show_progress
    )
  if evaluate and "finetune" in stages:
    return evaluate_workdir(cfg, workdir, data=data, model=model, part=part)
  return None


def _set_aside_after(workdir: Path, latest: int) -> list[int]:
  """Steps newer than ``latest`` that were set aside as unreadable (``<step>.unreadable``)."""
  d = workdir / "checkpoints" / "finetune"
  out = set()
  for x in d.iterdir() if d.is_dir() else ():
    head = x.name.split(".")[0]
    if ".unreadable" in x.name and head.isdigit() and int(head) > latest:
      out.add(int(head))
  return sorted(out)


def evaluate_workdir(cfg, workdir: str | Path, data=None, model=None, part=None) -> dict:
  """Restore the fine-tuned parameters of ``workdir``, evaluate, write metrics.json
  (with ``checkpoint_step``: the fine-tuning step evaluated).

  The step evaluated is ``config.eval.step`` if > 0, else the latest. Evaluation never
  quietly uses an older step: if the latest step cannot be read it is set aside as
  ``<step>.unreadable`` (as training does) and UnreadableCheckpointError is raised naming it
  -- as it is when a newer step was set aside earlier -- unless ``config.eval.fallback`` is
  True (then the newest readable step is evaluated, with a warning).

  Raises FileNotFoundError if the workdir has no fine-tuning checkpoint (checked before the
  data is prepared; nothing is created) or none at ``config.eval.step``;
  UnreadableCheckpointError as above. metrics.json is left as it was when anything fails.
  """
  workdir = Path(workdir)
  require_finetune_checkpoint(workdir)
  want = int(cfg.eval.step) or None
  fallback = bool(cfg.eval.fallback)
  saved = saved_steps(workdir, "finetune")["finetune"]
  if want is not None and want not in saved:
    raise FileNotFoundError(
      f"config.eval.step={want}: no such fine-tuning checkpoint in "
      f"{workdir / 'checkpoints' / 'finetune'}; saved steps: {saved}"
    )
  if want is None and not fallback and (newer := _set_aside_after(workdir, saved[-1])):
    raise UnreadableCheckpointError(
      f"fine-tuning step(s) {newer} in {workdir / 'checkpoints' / 'finetune'} were set aside "
      f"as unreadable, so the latest readable step ({saved[-1]}) is not the newest trained "
      f"one; evaluate it explicitly with --config.eval.step={saved[-1]}, or accept the "
      "fallback with --config.eval.fallback=True"
    )
  data = data or prepare(cfg, workdir)
  model = model or build_model(cfg, data)
  part = part or Partitioner(cfg.mesh)
  variables, ft_step = restore_variables_and_step(
    cfg, workdir, "finetune", model, part, data, step=want, fallback=fallback
  )
  t = time.time()
  metrics = eval_lib.evaluate(
    model,
    variables,
    data,
    cfg.eval.split,
    tuple(cfg.eval.ks),
    cfg.eval.mask,
    cfg.eval.user_chunk,
    partitioner=part,
    corpus=cfg.eval.corpus,
  )
  metrics = {
    "model": cfg.model.name,
    "dataset": data.manifest.get("dataset", cfg.data.name),
    "checkpoint_step": ft_step,
    **metrics,
  }
  log.info("evaluated fine-tuning step %d on %s in %.1fs", ft_step, cfg.eval.split, time.time() - t)
  with monitor.Monitor(workdir, "finetune") as mon:  # TensorBoard: eval/<scenario>/<metric>
    mon.log_eval(
      ft_step, metrics, prefix="eval" if cfg.eval.split == "test" else f"eval_{cfg.eval.split}"
    )
  if jax.process_index() == 0:
    with open(workdir / "metrics.json", "w") as f:
      json.dump(metrics, f, indent=2)
    with open(workdir / "metrics.md", "w") as f:
      f.write(eval_lib.markdown_table(metrics) + "\n")
    from sass_jax import plots  # matplotlib is imported only when plotting

    plots.write_run_plots(workdir, metrics)  # WORKDIR/plots/*.png
  return metrics
