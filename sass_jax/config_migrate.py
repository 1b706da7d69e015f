"""Saved configs written by older versions, read back through one function: ``migrate``.

A run saves its config (``cfg.to_dict()``) in every checkpoint's metadata, and ``--mode compare``
in its results JSON. Today every key has its value in ``configs/base.py``; older configs lack the
keys added since, for which the code then read a fallback value. ``migrate`` fills those with
the very fallbacks (so an old checkpoint compares equal to the config it was trained with) and
renames the former model name 'sass_base' (SASS without pre-training, now the config argument
'sass_base' = model.name 'sass' with ``pretrain.num_steps=0``) to 'sass', keeping the saved
``pretrain.num_steps``. ``config.data`` is data-specific and left as saved.
"""

from __future__ import annotations

import copy
from typing import Any

# Dotted key -> the value the code used when a config had no such key (before configs/base.py
# held every key). Keys the code always read directly (no fallback) are not here.
FALLBACKS: dict[str, Any] = {
  "model.scenario_compute": "grouped",
  "model.inbatch_softmax": "dense",
  "model.item_scenario": "specific",
  "model.user_scenario": "specific",
  "model.score_bias": False,
  "model.preference_dim": 0,
  "model.preference_input": "own",
  "model.preference_widths": (128, 64),
  "model.preference_dropout": 0.2,
  "model.tower_widths": (64,),
  "model.num_experts": 4,
  "model.num_scenario_experts": 2,
  "model.separate_embeddings": True,
  "model.star_aux": True,
  "model.star_momentum": 0.99,
  "pretrain.warmup_steps": 0,
  "pretrain.weight_decay": 0.0,
  "train.warmup_steps": 0,
  "train.weight_decay": 0.0,
  "train.logq_strength": 1.0,
  "train.negatives": "all",
  "train.labelled_weight": 0.0,
  "train.labelled_batch_size": 0,
  "train.nan_policy": "raise",
  "train.max_skips": 10,
  "train.debug_nan_at_step": 0,
  "train.embedding_optimizer": "dense",
  "train.embedding_learning_rate": 0.0,
  "train.resident_on_device": False,
  "eval.corpus": "all",
  "eval.step": 0,
  "eval.fallback": False,
  "mesh.table_layout": "auto",
  "mesh.memory_limit_bytes": 0,
  "compile.mesh": (),
  "compile.hbm_bytes": 0,
  "compile.user_fields": (),
  "compile.item_fields": (),
  "compile.num_scenarios": 0,
  "export.dir": "",
  "export.platforms": (),  # empty: the current backend only
  "recommend.user": "",
  "recommend.scenario": "",
  "recommend.k": 10,
  "recommend.exclude_seen": True,
  "bench.steps": 20,
  "bench.warmup": 3,
  "bench.repeats": 5,
  "bench.batches": 8,
  "bench.embedding_optimizers": ("dense", "lazy_adam", "rowwise_adagrad"),
  "bench.stages": ("pretrain", "finetune"),
  "bench.check_sparse": True,
  "bench.eval_items": 65536,
  "bench.eval_users": 4096,
  "bench.eval_topk_scores": 2e9,
  "bench.full_eval_max_pairs": 1e9,
  "bench.loop_steps": 20,
  "bench.input_batches": 50,
  "bench.probe": True,
  "bench.probe_matmul_n": 0,
  "bench.probe_bytes": 0,
}
# Former model names -> today's (the saved pretrain.num_steps is kept as it was).
RENAMED_MODELS = {"sass_base": "sass"}


def migrate(saved: dict) -> dict:
  """A copy of the saved config dict ``saved`` (nested dicts, JSON values) brought up to date.

  Missing keys of ``FALLBACKS`` are filled (a missing block is created); keys present keep their
  saved values; ``model.name`` is renamed per ``RENAMED_MODELS``. Raises TypeError when
  ``saved`` (or a block of it that holds a key to fill) is not a dict.
  """
  if not isinstance(saved, dict):
    raise TypeError(f"saved config: expected a dict, got {type(saved).__name__}")
  out = copy.deepcopy(saved)
  for dotted, value in FALLBACKS.items():
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise TypeError(f"saved config: config.{p} is a {type(node).__name__}, not a block")
    node.setdefault(leaf, copy.deepcopy(value))
  model = out.get("model")
  if isinstance(model, dict) and model.get("name") in RENAMED_MODELS:
    model["name"] = RENAMED_MODELS[model["name"]]
  return out
