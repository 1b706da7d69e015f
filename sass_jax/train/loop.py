"""Stages, logging and checkpoint cadence: the library behind every CLI mode.

``prepare(cfg, workdir)`` -> prepared store; ``train_stage(...)`` runs one stage (pre-training or
fine-tuning) with resume from the stage's latest checkpoint; ``train(cfg, workdir)`` runs
pre-training (unless ``config.pretrain.num_steps == 0``, e.g. SASS-Base) then fine-tuning from
the pre-trained parameters, then evaluation; ``evaluate_workdir`` restores the latest
fine-tuned parameters and writes ``WORKDIR/metrics.json``.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from sass_jax import checkpoint as ckpt_lib
from sass_jax.data import get_preparer, pipeline, store
from sass_jax.eval import evaluate as eval_lib
from sass_jax.model.baselines import DSSMMixed
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.partition import Partitioner
from sass_jax.train import steps

log = logging.getLogger("sass_jax")
STAGES = ("pretrain", "finetune")


def _data_options(data_cfg) -> dict:
  return json.loads(json.dumps(data_cfg.to_dict()))


def prepare(cfg, workdir: str | Path, force: bool = False) -> store.PreparedData:
  """Prepare ``config.data`` into ``WORKDIR/data`` (reused if its options are unchanged).

  Raises ValueError for an unknown ``config.data.name``.
  """
  preparer = get_preparer(cfg.data.name)
  out = Path(workdir) / "data"
  if not force and store.is_complete(out):
    data = store.open_store(out)
    if data.manifest.get("options") == _data_options(cfg.data):
      log.info("using prepared data at %s", out)
      return data
    log.info("config.data changed since %s was prepared; preparing again", out)
  t = time.time()
  preparer(cfg.data, out)
  data = store.open_store(out)
  m = data.manifest
  log.info("prepared %s in %.1fs: %d interactions (split %s), %d users, %d items, rejected %s",
           cfg.data.name, time.time() - t, m["num_interactions"], m["split_counts"],
           m["num_users"], m["num_items"], m.get("rows_rejected") or "none")
  return data


MODELS = {"sass": SASS, "sass_base": SASS, "dssm_mixed": DSSMMixed}


def build_model(cfg, data: store.PreparedData):
  """The two-tower model named by ``config.model.name`` for the data's fields and scenarios.

  Raises ValueError for an unknown name or option (ModelConfig.from_config).
  """
  mc = ModelConfig.from_config(cfg.model, data.user_specs, data.item_specs, data.num_scenarios)
  return MODELS[cfg.model.name](mc)


def example_batch(data: store.PreparedData) -> dict:
  """A 2-row batch of the data's shapes ({'user', 'item', 'scenario'}) for model.init."""
  rows = np.zeros(2, np.int64)
  return {"user": pipeline.gather_features(data.users, data.user_masks, rows),
          "item": pipeline.gather_features(data.items, data.item_masks, rows),
          "scenario": np.zeros(2, np.int32)}


def _stage_cfg(cfg, stage):
  return cfg.pretrain if stage == "pretrain" else cfg.train


def _checkpointer(cfg, workdir, stage) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(Path(workdir).absolute() / "checkpoints" / stage,
                               max_to_keep=cfg.checkpoint.max_to_keep,
                               save_interval_steps=max(1, cfg.checkpoint.every_steps))


def train_stage(stage: str, cfg, data: store.PreparedData, model: SASS, part: Partitioner,
                workdir: str | Path, init_params=None, show_progress: bool = True):
  """Run one stage to ``num_steps``, resuming from its latest checkpoint if there is one.

  Writes checkpoints to ``WORKDIR/checkpoints/<stage>`` every ``config.checkpoint.every_steps``
  and at the end, and metrics every ``log_every`` steps to ``WORKDIR/<stage>_log.jsonl``.
  Returns the final TrainState (sharded on the partitioner's mesh).
  Raises FloatingPointError naming the step if the loss or gradient norm is not finite.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  scfg = _stage_cfg(cfg, stage)
  num_steps, bs = int(scfg.num_steps), int(scfg.batch_size)
  part.check_batch_size(bs, f"config.{'pretrain' if stage == 'pretrain' else 'train'}.batch_size")
  tx = steps.make_optimizer(scfg, num_steps)
  seed = cfg.seed + (0 if stage == "pretrain" else 1)
  init_fn = steps.make_init_fn(model, tx, example_batch(data), seed, init_params)
  abstract, shardings = part.abstract_state(init_fn)
  ckpt = _checkpointer(cfg, workdir, stage)
  data_state = None
  if ckpt.latest_step() is not None:
    state, _, data_state = ckpt.restore(abstract)
    log.info("%s: resumed from step %d of %s", stage, int(state.step), ckpt.directory)
  else:
    state, _ = part.init(init_fn)
    log.info("%s: initialised %s (%d parameters)", stage,
             "from the pre-trained model" if init_params is not None else "at random",
             sum(x.size for x in jax.tree.leaves(state.params)))
  start = int(state.step)
  if start >= num_steps:
    ckpt.close()
    return state
  it = pipeline.make_iterator(data, stage, bs, seed, num_steps, jax.process_index(),
                              jax.process_count())
  if data_state:
    it.set_state(data_state)
  if stage == "pretrain":
    step_fn = steps.make_pretrain_step(model, tx, scfg.tau, scfg.pairs)
  else:
    step_fn = steps.make_finetune_step(model, tx, cfg.model.tau, scfg.get("logq_strength", 1.0))
  step_fn = part.compile_step(step_fn, shardings)
  log_every = max(1, int(cfg.train.log_every))
  log_path = Path(workdir) / f"{stage}_log.jsonl"
  bar = tqdm(total=num_steps, initial=start, desc=stage, unit="step", dynamic_ncols=True,
             disable=not show_progress or jax.process_index() != 0)
  t0, n0 = time.time(), start
  meta = {"stage": stage, "config": cfg.to_dict()}
  with open(log_path, "a") as logf:
    for step in range(start + 1, num_steps + 1):
      state, m = step_fn(state, part.shard_batch(next(it)))
      if step % log_every == 0 or step == num_steps:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
          raise FloatingPointError(f"{stage} step {step}: non-finite loss {m['loss']} or "
                                   f"gradient norm {m['grad_norm']}; last checkpoint kept in "
                                   f"{ckpt.directory}")
        dt = time.time() - t0
        m["samples_per_s"] = (step - n0) * bs / max(dt, 1e-9)
        t0, n0 = time.time(), step
        m["step"] = step
        if jax.process_index() == 0:
          logf.write(json.dumps(m) + "\n")
          logf.flush()
        bar.set_postfix(loss=f"{m['loss']:.4f}", samples_s=f"{m['samples_per_s']:.0f}")
      bar.update(1)
      if step % cfg.checkpoint.every_steps == 0 or step == num_steps:
        ckpt.save(step, state, metadata=meta, data_state=it.get_state(), force=True)
  bar.close()
  ckpt.wait_until_finished()
  ckpt.close()
  log.info("%s: finished %d steps; last metrics %s", stage, num_steps,
           {k: round(v, 4) for k, v in m.items()})
  return state


def restore_variables(cfg, workdir, stage, model, part, data) -> dict:
  """The model variables ``{'params': ..., **model_state}`` of a stage's latest checkpoint,
  placed on ``part``'s mesh (which may differ from the mesh that saved them).

  Raises FileNotFoundError if the stage has no checkpoint in ``workdir``.
  """
  scfg = _stage_cfg(cfg, stage)
  tx = steps.make_optimizer(scfg, int(scfg.num_steps))
  abstract, _ = part.abstract_state(steps.make_init_fn(model, tx, example_batch(data), cfg.seed))
  with _checkpointer(cfg, workdir, stage) as ck:
    got = ck.restore_fields({"params": abstract.params, "model_state": abstract.model_state})
  return {"params": got["params"], **got["model_state"]}


def train(cfg, workdir: str | Path, stages=STAGES, evaluate: bool = True,
          show_progress: bool = True) -> dict | None:
  """Prepare, pre-train (if ``config.pretrain.num_steps > 0``), fine-tune, evaluate.

  ``stages`` limits what runs ('pretrain', 'finetune'); fine-tuning starts from the latest
  pre-training checkpoint when pre-training is enabled. Returns the metrics dict (or None).
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data = prepare(cfg, workdir)
  model = build_model(cfg, data)
  part = Partitioner(cfg.mesh)
  log.info("mesh %s over %d device(s) (%s)", dict(part.mesh.shape), part.mesh.size,
           jax.devices()[0].platform)
  pretrain = cfg.pretrain.num_steps > 0
  if pretrain and "pretrain" in stages:
    train_stage("pretrain", cfg, data, model, part, workdir, show_progress=show_progress)
  if "finetune" in stages:
    init = restore_variables(cfg, workdir, "pretrain", model, part, data) if pretrain else None
    train_stage("finetune", cfg, data, model, part, workdir, init_params=init,
                show_progress=show_progress)
  if evaluate and "finetune" in stages:
    return evaluate_workdir(cfg, workdir, data=data, model=model, part=part)
  return None


def evaluate_workdir(cfg, workdir: str | Path, data=None, model=None, part=None) -> dict:
  """Restore the latest fine-tuned parameters of ``workdir``, evaluate, write metrics.json.

  Raises FileNotFoundError if the workdir has no fine-tuning checkpoint.
  """
  workdir = Path(workdir)
  data = data or prepare(cfg, workdir)
  model = model or build_model(cfg, data)
  part = part or Partitioner(cfg.mesh)
  variables = restore_variables(cfg, workdir, "finetune", model, part, data)
  t = time.time()
  metrics = eval_lib.evaluate(model, variables, data, cfg.eval.split, tuple(cfg.eval.ks),
                              cfg.eval.mask, cfg.eval.user_chunk)
  metrics = {"model": cfg.model.name, "dataset": data.manifest.get("dataset", cfg.data.name),
             **metrics}
  log.info("evaluated on %s in %.1fs", cfg.eval.split, time.time() - t)
  if jax.process_index() == 0:
    with open(workdir / "metrics.json", "w") as f:
      json.dump(metrics, f, indent=2)
    with open(workdir / "metrics.md", "w") as f:
      f.write(eval_lib.markdown_table(metrics) + "\n")
  return metrics
