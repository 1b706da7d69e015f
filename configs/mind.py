"""SASS on the MIND multi-domain sample: 4 news categories as scenarios (docs/design.md §1, §2, 4, 5).

8,000 impressions (363 clicks), 7,892 users (almost all seen once), 1,921 news; random 8:1:1
split. Small and sparse: a smoke-size run; most test users are unseen in training (user_id 0).

Usage:
  python -m sass_jax.main --config configs/mind.py --workdir runs/mind --mode train
"""

import os

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "mind"
  c.data.dir = os.path.join(base.SHARED_DATA, "mind_multidomain_sample")
  c.data.file = "mind_sample.csv"
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, news) shown in several impressions is legitimate: 'max' keeps one exposure (the
  # first row), clicked if any impression was, and counts the others in the manifest's
  # rows_merged -- so a pair never lands in both train and test. Or 'error' | 'first' |
  # 'last' | 'keep' (every impression a row, counted in rows_repeated).
  c.data.duplicates = "max"
  c.data.split = (0.8, 0.1, 0.1)  # random train / valid / test split of the impressions
  c.data.split_seed = 42
  c.data.min_count = 1  # values seen fewer times in the training split map to id 0

  # Size of this data set (~290 training clicks for fine-tuning, 6.4k training exposures for
  # pre-training): a smaller model, small batches and few steps. Not tuned.
  c.model.widths = (64, 32)
  c.model.out_dim = 32
  c.pretrain.num_steps = 200
  c.pretrain.batch_size = 256
  c.train.num_steps = 200
  c.train.batch_size = 64
  c.train.warmup_steps = 20
  c.train.log_every = 25
  c.checkpoint.every_steps = 100
  # Everything else (model.tau 0.2, train.logq_strength 1.5, pretrain.pairs 'user_item',
  # pretrain.tau 0.2, learning rates): inherited defaults of configs/base.py (chosen on
  # MovieLens), not tuned on this data set.
  return base.apply_model_arg(c, arg)
