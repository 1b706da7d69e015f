"""Config validation before any work (docs/design.md §6: the config drives every run).

``validate(cfg, data=None, partitioner=None, workdir=None, stages=...)`` checks the values of a
config (``configs/base.py`` and every config derived from it) and, when given, their
consistency with the prepared data, the device mesh and the checkpoints already in ``workdir``.
It collects every problem and raises one ValueError listing them, each naming the config field,
its value and what to change. Unknown keys are rejected earlier, by the locked config
(``main.py``: ``config_flags.DEFINE_config_file(..., lock_config=True)``).

Called by ``sass_jax.main`` (config only, before anything runs), by ``loop.train`` (before
preparing the data, then again with the data and the partitioner), by ``aot.compile_workdir``
and by ``sass_jax.bench.throughput.bench``. The allowed values come from the modules that own
them (``eval.evaluate``, ``train.stages`` / ``steps`` / ``losses`` / ``sparse``,
``model.grouped`` / ``mlsat``, ``partition``, ``data.store``, ``tuning``); this module imports
them and defines none that others import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

from sass_jax.train.stages import STAGES, stage_block

COMPUTE_DTYPES = ("float32", "bfloat16")
# Shared model settings that change no parameter shape: a checkpoint can be resumed with other
# values (a model's own such keys: its registry entry, ``registry.Entry.non_structural``).
MODEL_NON_STRUCTURAL = (
  "tau",
  "dropout",
  "activation",
  "compute_dtype",
  "scenario_compute",
  "inbatch_softmax",
)
# Data settings that do not change the prepared data.
DATA_NON_STRUCTURAL = ("dir", "download")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(cfg, stages: Iterable[str], p) -> None:
  """Field-by-field checks of the config alone; ``p(message)`` records a problem."""
  from sass_jax.tuning import search_problems
  from sass_jax.data import get_preparer
  from sass_jax.data.store import DUPLICATE_POLICIES, ON_ERROR_POLICIES
  from sass_jax.eval.evaluate import EVAL_CORPORA, EVAL_MASKS, EVAL_SPLITS
  from sass_jax.model.grouped import SCENARIO_COMPUTE
  from sass_jax.train.inbatch import INBATCH_SOFTMAX
  from sass_jax.model import registry
  from sass_jax.partition import TABLE_LAYOUTS
  from sass_jax.train.losses import NEGATIVES
  from sass_jax.train.sparse import EMBEDDING_OPTIMIZERS
  from sass_jax.train.steps import NAN_POLICIES, PRETRAIN_PAIRS

  if not _is_int(cfg.seed):
    p(f"config.seed={cfg.seed!r}: expected an int")
  # -- data ------------------------------------------------------------------------------
  try:
    get_preparer(cfg.data.name)
  except ValueError as e:
    p(str(e))
  on_error = cfg.data.get("on_error")
  if on_error is not None and on_error not in ON_ERROR_POLICIES:
    p(f"config.data.on_error={on_error!r}: expected one of {ON_ERROR_POLICIES}")
  dup = cfg.data.get("duplicates")
  if dup is not None and dup not in DUPLICATE_POLICIES:
    p(f"config.data.duplicates={dup!r}: expected one of {DUPLICATE_POLICIES}")
  split = cfg.data.get("split")
  if split is not None:
    frac = tuple(split)
    if len(frac) != 3 or not all(_is_num(f) and f >= 0 for f in frac):
      p(
        f"config.data.split={frac}: expected 3 non-negative fractions (train, valid, test), "
        "e.g. (0.8, 0.1, 0.1)"
      )
    elif abs(sum(frac) - 1.0) > 1e-6:
      p(
        f"config.data.split={frac} sums to {sum(frac):.6g}: the train / valid / test fractions "
        "must sum to 1, e.g. (0.8, 0.1, 0.1)"
      )
    elif frac[0] == 0:
      p(
        f"config.data.split={frac}: the train fraction is 0, so there is nothing to train on; "
        "give it most of the rows, e.g. (0.8, 0.1, 0.1)"
      )
    elif cfg.eval.split in EVAL_SPLITS and frac[EVAL_SPLITS.index(cfg.eval.split) + 1] == 0:
      p(
        f"config.data.split={frac}: the {cfg.eval.split} fraction is 0, so the evaluation "
        f"(config.eval.split={cfg.eval.split!r}) would have no rows; give it a share, e.g. "
        "(0.8, 0.1, 0.1)"
      )
  # -- model -----------------------------------------------------------------------------
  m = cfg.model
  for problem in registry.config_problems(m):  # the name, then the model's own settings
    p(problem)
  if not (_is_num(m.dropout) and 0.0 <= m.dropout < 1.0):
    p(f"config.model.dropout={m.dropout!r}: expected a rate in [0, 1), e.g. 0.1 (0 = none)")
  if not (_is_num(m.tau) and m.tau > 0):
    p(f"config.model.tau={m.tau!r}: the score temperature must be > 0, e.g. 0.05")
  for k in ("embed_dim", "scenario_dim", "out_dim", "bias_hidden", "vocab_pad_to"):
    v = m[k]
    if not (_is_int(v) and v >= 1):
      p(f"config.model.{k}={v!r}: expected an int >= 1")
  pdim = m.get("preference_dim", 0)
  if not (_is_int(pdim) and pdim >= 0):
    p(f"config.model.preference_dim={pdim!r}: expected an int >= 0 (0 = no preference head)")
  widths = tuple(m.widths)
  if not all(_is_int(w) and w >= 1 for w in widths):
    p(f"config.model.widths={widths}: expected positive ints, e.g. (256, 128)")
  if m.compute_dtype not in COMPUTE_DTYPES:
    p(f"config.model.compute_dtype={m.compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
  if m.scenario_compute not in SCENARIO_COMPUTE:
    p(
      f"config.model.scenario_compute={m.scenario_compute!r}: expected one of "
      f"{SCENARIO_COMPUTE} ('grouped': each row's own scenario only)"
    )
  softmax = m.get("inbatch_softmax", "blocked")
  if softmax not in INBATCH_SOFTMAX:
    p(
      f"config.model.inbatch_softmax={softmax!r}: expected one of {INBATCH_SOFTMAX} "
      "('blocked': row tiles, no [B, B] logits)"
    )
  # -- stages ----------------------------------------------------------------------------
  if not (_is_int(cfg.pretrain.num_steps) and cfg.pretrain.num_steps >= 0):
    p(
      f"config.pretrain.num_steps={cfg.pretrain.num_steps!r}: expected an int >= 0 "
      "(0 = no pre-training)"
    )
  for stage in stages:
    b = stage_block(stage)
    s = cfg[b]
    if stage == "pretrain" and not (_is_int(s.num_steps) and s.num_steps > 0):
      continue  # pre-training off (or already reported above)
    if stage == "finetune" and not (_is_int(s.num_steps) and s.num_steps > 0):
      p(
        f"config.train.num_steps={s.num_steps!r}: fine-tuning needs at least 1 step; set "
        "config.train.num_steps > 0 (or use --mode pretrain to pre-train only)"
      )
    if not (_is_int(s.batch_size) and s.batch_size >= 1):
      p(f"config.{b}.batch_size={s.batch_size!r}: expected an int >= 1")
    if not (_is_num(s.learning_rate) and s.learning_rate > 0):
      p(f"config.{b}.learning_rate={s.learning_rate!r}: expected a finite value > 0, e.g. 1e-3")
    wu = s.warmup_steps
    if not (_is_int(wu) and wu >= 0):
      p(f"config.{b}.warmup_steps={wu!r}: expected an int >= 0")
    wd = s.weight_decay
    if not (_is_num(wd) and wd >= 0):
      p(f"config.{b}.weight_decay={wd!r}: expected a value >= 0")
    if stage == "pretrain":
      if not (_is_num(s.tau) and s.tau > 0):
        p(f"config.pretrain.tau={s.tau!r}: the InfoNCE temperature must be > 0, e.g. 0.1")
      if s.pairs not in PRETRAIN_PAIRS:
        p(f"config.pretrain.pairs={s.pairs!r}: expected one of {PRETRAIN_PAIRS}")
    else:
      a = s.logq_strength
      if not (_is_num(a) and a >= 0):
        p(f"config.train.logq_strength={a!r}: expected a value >= 0 (0 turns logQ off)")
      neg = s.negatives
      if neg not in NEGATIVES:
        p(
          f"config.train.negatives={neg!r}: expected one of {NEGATIVES} ('all': every item "
          "of the batch, scored in the row's scenario; 'same_scenario': rows of its scenario)"
        )
  t = cfg.train
  lw, lbs = t.labelled_weight, t.labelled_batch_size
  if not (_is_num(lw) and lw >= 0):
    p(
      f"config.train.labelled_weight={lw!r}: expected a value >= 0 (0 = off: no labelled "
      "exposures in fine-tuning)"
    )
  if not (_is_int(lbs) and lbs >= 0):
    p(
      f"config.train.labelled_batch_size={lbs!r}: expected an int >= 1, or 0 for "
      "config.train.batch_size"
    )
  m = cfg.model
  if (
    _is_int(m.get("preference_dim", 0))
    and m.get("preference_dim", 0) > 0
    and m.get("preference_input", "own") == "own"
    and t.get("embedding_optimizer", "dense") != "dense"
  ):
    p(
      f"config.model.preference_dim={m.preference_dim} with preference_input='own' and "
      f"config.train.embedding_optimizer={t.embedding_optimizer!r}: the row-sparse optimisers "
      "do not address the preference head's own tables; set embedding_optimizer='dense' (or "
      "preference_input='shared')"
    )
  if (
    "finetune" in stages
    and _is_int(m.get("preference_dim", 0))
    and m.get("preference_dim", 0) > 0
    and _is_num(lw)
    and lw == 0
  ):
    p(
      f"config.model.preference_dim={m.preference_dim} with config.train.labelled_weight=0: "
      "nothing would train the preference head, and AUC / GAUC would be scored with it "
      "untrained; set labelled_weight > 0 (e.g. 1.0) or preference_dim=0"
    )
  if _is_num(lw) and lw > 0 and t.resident_on_device:
    p(
      f"config.train.labelled_weight={lw!r} with config.train.resident_on_device=True: the "
      "device-resident sampler has no labelled exposures; set resident_on_device=False"
    )
  if not (_is_int(t.log_every) and t.log_every >= 1):
    p(f"config.train.log_every={t.log_every!r}: expected an int >= 1")
  policy = t.nan_policy
  if policy not in NAN_POLICIES:
    p(f"config.train.nan_policy={policy!r}: expected one of {NAN_POLICIES}")
  ms = t.max_skips
  if not (_is_int(ms) and ms >= 1):
    p(f"config.train.max_skips={ms!r}: expected an int >= 1")
  dn = t.debug_nan_at_step
  if not (_is_int(dn) and dn >= 0):
    p(f"config.train.debug_nan_at_step={dn!r}: expected an int >= 0 (0 = off)")
  # -- checkpoint ------------------------------------------------------------------------
  ck = cfg.checkpoint
  if not (_is_int(ck.every_steps) and ck.every_steps >= 1):
    p(
      f"config.checkpoint.every_steps={ck.every_steps!r}: expected an int >= 1 (a checkpoint "
      "is also written at the last step)"
    )
  if ck.max_to_keep is not None and not (_is_int(ck.max_to_keep) and ck.max_to_keep >= 1):
    p(
      f"config.checkpoint.max_to_keep={ck.max_to_keep!r}: expected an int >= 1 "
      "(keep at least the latest checkpoint) or None (keep all)"
    )
  # -- eval ------------------------------------------------------------------------------
  e = cfg.eval
  if e.split not in EVAL_SPLITS:
    p(f"config.eval.split={e.split!r}: expected one of {EVAL_SPLITS}")
  if e.mask not in EVAL_MASKS:
    p(f"config.eval.mask={e.mask!r}: expected one of {EVAL_MASKS}")
  if e.corpus not in EVAL_CORPORA:
    p(
      f"config.eval.corpus={e.corpus!r}: expected one of {EVAL_CORPORA} ('scenario' ranks only "
      "the items seen in the scenario, for scenarios with their own items)"
    )
  ks = tuple(e.ks) if isinstance(e.ks, (tuple, list)) else (e.ks,)
  if not ks or not all(_is_int(k) and k >= 1 for k in ks):
    p(f"config.eval.ks={ks}: expected a non-empty tuple of positive ints, e.g. (20, 50, 100)")
  if not (_is_int(e.user_chunk) and e.user_chunk >= 1):
    p(f"config.eval.user_chunk={e.user_chunk!r}: expected an int >= 1")
  if e.split == "valid" and e.mask == "train_valid":
    p(
      "config.eval.split='valid' with config.eval.mask='train_valid' masks the very validation "
      "positives being scored (every metric would be 0); use config.eval.mask='train' to "
      "evaluate the valid split, or config.eval.split='test'"
    )
  step = e.step
  if not (_is_int(step) and step >= 0):
    p(f"config.eval.step={step!r}: expected a fine-tuning step (int >= 1), or 0 for the latest")
  fb = e.fallback
  if not isinstance(fb, bool):
    p(f"config.eval.fallback={fb!r}: expected True or False")
  # -- mesh ------------------------------------------------------------------------------
  mesh = cfg.mesh
  for k in ("data", "model"):
    v = mesh[k]
    if not (_is_int(v) and (v == -1 or v >= 1)):
      p(
        f"config.mesh.{k}={v!r}: expected a positive int or -1 (= all devices the other axis "
        "leaves)"
      )
  if mesh.data == -1 and mesh.model == -1:
    p(
      "config.mesh.data=-1 and config.mesh.model=-1: at most one axis can be -1; set the other "
      "to a device count"
    )
  smr = mesh.shard_min_rows
  if not (_is_int(smr) and smr >= 0):
    p(f"config.mesh.shard_min_rows={smr!r}: expected an int >= 0")
  layout = mesh.table_layout
  if layout not in TABLE_LAYOUTS:
    p(
      f"config.mesh.table_layout={layout!r}: expected one of {TABLE_LAYOUTS} ('all': tables "
      "split over every device, 'model': over the model axis, 'auto': 'all' where it divides)"
    )
  mlb = mesh.memory_limit_bytes
  if not (_is_int(mlb) and mlb >= 0):
    p(f"config.mesh.memory_limit_bytes={mlb!r}: expected an int >= 0 (0 = the device's own)")
  # -- compile (--mode compile, sass_jax.aot) ---------------------------------------------
  cc = cfg.compile
  shape = tuple(cc.mesh or ())
  if shape and not (len(shape) == 2 and all(_is_int(v) and (v >= 1 or v == -1) for v in shape)):
    p(f"config.compile.mesh={shape}: expected () or (data, model) device counts, e.g. (16, 16)")
  hbm = cc.hbm_bytes
  if not (_is_num(hbm) and hbm >= 0):
    p(f"config.compile.hbm_bytes={hbm!r}: expected a byte count >= 0 (0 = the chip's own)")
  bad = [x for x in tuple(cc.stages) if x not in STAGES]
  if bad:
    p(f"config.compile.stages={tuple(cc.stages)}: unknown {bad}; expected some of {STAGES}")
  copts = tuple(cc.embedding_optimizers)
  if any(o not in EMBEDDING_OPTIMIZERS for o in copts):
    p(f"config.compile.embedding_optimizers={copts}: expected a subset of {EMBEDDING_OPTIMIZERS}")
  # -- compare (--mode compare, sass_jax.compare) ----------------------------------------
  for problem in search_problems(cfg):
    p(problem)
  # -- bench (--mode bench, sass_jax.bench.throughput) ----------------------------------
  bc = cfg.bench
  for k in ("steps", "repeats", "batches", "loop_steps", "input_batches"):
    v = bc[k]
    if not (_is_int(v) and v >= 1):
      p(f"config.bench.{k}={v!r}: expected an int >= 1")
  if not (_is_int(bc.warmup) and bc.warmup >= 0):
    p(f"config.bench.warmup={bc.warmup!r}: expected an int >= 0")
  opts = tuple(bc.embedding_optimizers)
  if not opts or any(o not in EMBEDDING_OPTIMIZERS for o in opts):
    p(
      f"config.bench.embedding_optimizers={opts}: expected a non-empty subset of "
      f"{EMBEDDING_OPTIMIZERS}"
    )
  if any(s not in STAGES for s in tuple(bc.stages)):
    p(f"config.bench.stages={tuple(bc.stages)}: expected a subset of {STAGES}")


def _data_axis(cfg, partitioner, p) -> int | None:
  """The size of the mesh's 'data' axis (from the partitioner, else from the config and the
  device count); None (after recording a problem) when the mesh sizes are invalid."""
  if partitioner is not None:
    return int(partitioner.data_size)
  d, m = cfg.mesh.data, cfg.mesh.model
  if not (_is_int(d) and _is_int(m)) or (d < 1 and d != -1) or (m < 1 and m != -1) or d == m == -1:
    return None  # reported by _check_values
  import jax
  from sass_jax.partition import mesh_shape

  try:
    return mesh_shape(d, m, jax.device_count())[0]
  except ValueError as e:
    p(str(e))
    return None


def _check_batches(cfg, stages, data_axis: int, p) -> None:
  for stage in stages:
    b = stage_block(stage)
    s = cfg[b]
    if stage == "pretrain" and not (_is_int(s.num_steps) and s.num_steps > 0):
      continue
    bs = s.batch_size
    if _is_int(bs) and bs >= 1 and bs % data_axis:
      up = (bs // data_axis + 1) * data_axis
      p(
        f"config.{b}.batch_size={bs} is not divisible by the mesh's data axis ({data_axis} "
        f"devices); set it to a multiple of {data_axis}, e.g. {up}"
      )
    lw, lbs = cfg.train.labelled_weight, cfg.train.labelled_batch_size
    if stage == "finetune" and _is_num(lw) and lw > 0 and _is_int(lbs) and lbs >= 1:
      if lbs % data_axis:
        up = (lbs // data_axis + 1) * data_axis
        p(
          f"config.train.labelled_batch_size={lbs} is not divisible by the mesh's data axis "
          f"({data_axis} devices); set it to a multiple of {data_axis}, e.g. {up}"
        )


def _check_data(cfg, data, stages, p) -> None:
  k = int(data.num_scenarios)
  stated = cfg.data.get("num_scenarios")  # data-specific (configs/synthetic.py)
  if stated is not None and int(stated) != k:
    p(
      f"config.data.num_scenarios={stated} but the prepared data has {k} scenarios "
      f"({', '.join(map(str, data.scenario_names))}); set config.data.num_scenarios={k} "
      "or prepare the data again (--mode prepare)"
    )
  if (
    "pretrain" in stages
    and _is_int(cfg.pretrain.num_steps)
    and cfg.pretrain.num_steps > 0
    and k < 2
  ):
    p(
      f"config.pretrain.num_steps={cfg.pretrain.num_steps}: pre-training contrasts scenarios "
      f"and needs at least 2, but the data has {k}; set config.pretrain.num_steps=0"
    )
  ks = tuple(cfg.eval.ks) if isinstance(cfg.eval.ks, (tuple, list)) else (cfg.eval.ks,)
  too_big = [kk for kk in ks if _is_int(kk) and kk > data.num_items]
  if too_big:
    p(
      f"config.eval.ks={ks}: {too_big} exceed the {data.num_items} items of the data; use "
      f"values <= {data.num_items}"
    )


def diff_configs(saved: dict, now: dict, skip: Iterable[str]) -> list[str]:
  """``["key: saved -> now", ...]`` for every top-level key of two config blocks (plain dicts,
  e.g. ``json.loads(json.dumps(block.to_dict()))``) whose values differ, sorted by key; keys in
  ``skip`` are ignored, a missing key reads '<unset>', tuples equal lists of the same items.
  Used for the checkpoint check here and for the prepared data's options
  (``loop.prepare``)."""
  norm = lambda v: tuple(map(norm, v)) if isinstance(v, (list, tuple)) else v
  out = []
  for k in sorted(set(saved) | set(now)):
    if k in skip:
      continue
    a, b = norm(saved.get(k, "<unset>")), norm(now.get(k, "<unset>"))
    if a != b:
      out.append(f"{k}: {a!r} -> {b!r}")
  return out


def _check_checkpoints(cfg, workdir, p) -> None:
  """The model and data blocks of every stage's latest checkpoint must match the config."""
  import json
  from sass_jax.checkpoint import Checkpointer
  from sass_jax.config_migrate import migrate
  from sass_jax.model import registry

  def model_class(name):
    try:
      return registry.get(name).model
    except ValueError:
      return None

  now = json.loads(json.dumps(cfg.to_dict()))
  for stage in STAGES:
    d = Path(workdir) / "checkpoints" / stage
    if not d.is_dir() or not any(x.name.isdigit() for x in d.iterdir()):
      continue
    try:
      with Checkpointer(d) as ck:
        if ck.latest_step() is None:
          continue
        step = ck.latest_step()
        meta = ck.restore_metadata()
    except Exception:  # pylint: disable=broad-exception-caught
      continue  # unreadable metadata: the restore itself reports the problem
    saved = meta.get("config")
    if not isinstance(saved, dict):
      continue
    saved = migrate(saved)  # written by an older version: keys it lacked, renamed models
    problems = []
    sm, nm = dict(saved.get("model", {})), dict(now.get("model", {}))
    same_class = model_class(sm.get("name")) is model_class(nm.get("name"))
    if same_class:
      sm.pop("name", None), nm.pop("name", None)
    problems += [
      f"config.model.{x}"
      for x in diff_configs(sm, nm, MODEL_NON_STRUCTURAL + registry.non_structural_keys())
    ]
    problems += [
      f"config.data.{x}"
      for x in diff_configs(
        dict(saved.get("data", {})), dict(now.get("data", {})), DATA_NON_STRUCTURAL
      )
    ]
    if problems:
      p(
        f"{d} holds a checkpoint (step {step}) of a different model or data: "
        + "; ".join(problems)
        + ". Set these back to the saved values to resume or evaluate "
        "it, or use a new --workdir"
      )


def validate(
  cfg,
  data=None,
  partitioner=None,
  *,
  workdir: str | os.PathLike | None = None,
  stages: Iterable[str] = STAGES,
) -> None:
  """Check ``cfg`` before any work; raise one ValueError listing every problem.

  Args:
    cfg: the run's ``ml_collections.ConfigDict``.
    data: the prepared data (``store.PreparedData``), to check the number of scenarios K
      (``config.data.num_scenarios`` where a data set's config states it), that pre-training
      has K >= 2 scenarios and ``eval.ks`` <= the number of items.
    partitioner: the ``Partitioner``; its 'data' axis must divide the batch sizes (without
      one, the axis is resolved from ``config.mesh`` and ``jax.device_count()``).
    workdir: the run directory; each stage's latest checkpoint must have been trained with
      the same model shape settings (all of ``config.model`` except
      ``MODEL_NON_STRUCTURAL`` and the registered models' own non-structural keys; names of
      the same model class are equal) and the same
      ``config.data`` (except ``dir``, ``download``).
    stages: the stages about to run ('pretrain', 'finetune'); their blocks are checked
      (``config.train.num_steps`` > 0 only when fine-tuning runs). () for evaluation / data
      preparation.

  Raises:
    ValueError: "invalid config: <problem>" (one line) for one problem, else "invalid config:"
      followed by one line per problem; each problem names the field, its value and what to
      set instead.
  """
  stages = tuple(stages)
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; expected a subset of {STAGES}")
  problems: list[str] = []
  p = problems.append
  _check_values(cfg, stages, p)
  axis = _data_axis(cfg, partitioner, p)
  if axis:
    _check_batches(cfg, stages, axis, p)
  if data is not None:
    _check_data(cfg, data, stages, p)
  if workdir is not None and not problems:
    _check_checkpoints(cfg, workdir, p)
  if len(problems) == 1:  # one problem: one line
    raise ValueError(f"invalid config: {problems[0]}")
  if problems:
    raise ValueError("invalid config:\n  - " + "\n  - ".join(problems))
