"""SASS on the Scenario-Wise Rec Douban sample: book / movie / music (docs/design.md §1, §2, 4, 5).

3,000 rows, 1,352 users, 2,502 items; label = the binary rating; random 8:1:1 split. Small: a
smoke-size run.

Usage:
  python -m sass_jax.main --config configs/douban_sample.py --workdir runs/douban_s --mode train
"""

import os

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "douban_sample"
  c.data.dir = os.path.join(base.SHARED_DATA, "douban_sample")
  c.data.file = "douban_sample.csv"
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, item, domain) on two rows: one rating per pair in the sample, so 'error' (a bad
  # row naming both lines); or 'first' | 'last' | 'max' | 'keep' (counted in the manifest).
  c.data.duplicates = "error"
  c.data.split = (0.8, 0.1, 0.1)  # random train / valid / test split of the rows
  c.data.split_seed = 42
  c.data.min_count = 1  # values seen fewer times in the training split map to id 0

  # Size of this data set (~1.5k training positives, 2.4k training exposures): a smaller
  # model, small batches and few steps. Not tuned on its validation split.
  c.model.widths = (64, 32)
  c.model.out_dim = 32
  c.pretrain.num_steps = 100
  c.pretrain.batch_size = 128
  c.train.num_steps = 300
  c.train.batch_size = 128
  c.train.warmup_steps = 20
  c.train.log_every = 25
  c.checkpoint.every_steps = 100
  # Everything else (model.tau 0.2, train.logq_strength 1.5, pretrain.pairs 'user_item',
  # pretrain.tau 0.2, learning rates): inherited defaults of configs/base.py (chosen on
  # MovieLens), not tuned on this data set.
  return base.apply_model_arg(c, arg)
