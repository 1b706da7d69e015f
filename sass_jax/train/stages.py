"""The two training stages and the config block of each (docs/design.md §2).

'pretrain' (stage 1, self-supervised pre-training) is configured by ``config.pretrain``;
'finetune' (stage 2) by ``config.train``. Every module that runs, checks, compiles or times a
stage takes the block, its name and the stage's seed from here. Imports nothing heavy.
"""

from __future__ import annotations

STAGES = ("pretrain", "finetune")


def stage_block(stage: str) -> str:
  """The name of ``stage``'s config block: 'pretrain' -> 'pretrain', 'finetune' -> 'train'.

  Raises ValueError for another stage.
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  return "pretrain" if stage == "pretrain" else "train"


def stage_config(cfg, stage: str):
  """``config.pretrain`` or ``config.train``: the block of ``stage`` (ValueError as
  :func:`stage_block`)."""
  return cfg[stage_block(stage)]


def stage_seed(cfg, stage: str) -> int:
  """The seed of ``stage``'s initialisation and batches: ``config.seed`` for pre-training,
  ``config.seed + 1`` for fine-tuning (ValueError as :func:`stage_block`)."""
  return cfg.seed + (0 if stage_block(stage) == "pretrain" else 1)


def labelled_batch_size(cfg, stage: str = "finetune") -> int:
  """Rows of the labelled sub-batch of ``stage``'s batches (``batch['labelled']``): 0 for
  pre-training and when ``config.train.labelled_weight`` is 0 (off), else
  ``config.train.labelled_batch_size`` or, when that is 0, ``config.train.batch_size``."""
  if stage_block(stage) != "train" or not float(cfg.train.get("labelled_weight", 0.0) or 0.0) > 0:
    return 0
  return int(cfg.train.get("labelled_batch_size", 0) or 0) or int(cfg.train.batch_size)
