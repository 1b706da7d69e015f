"""SASS on KuaiRand with ``tab`` as the scenario (docs/design.md §4; sass_jax/data/kuairand.py).

Default data: the real 200-row sample in ../shared/data/kuairand_sample (one tab: a smoke test),
joined with the complete KuaiRand-Pure feature tables in ../shared/data/kuairand_pure_features.
For the release set ``--config.data.dir=<folder with log_standard_*.csv>``; the 4 largest tabs are
kept (the multi-scenario papers' setting), rows of other tabs are counted as 'tab_not_kept'.

Usage:
  python -m sass_jax.main --config configs/kuairand.py --workdir runs/kuairand --mode train
"""

import os

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "kuairand"
  c.data.dir = os.path.join(base.SHARED_DATA, "kuairand_sample")
  c.data.features_dir = os.path.join(base.SHARED_DATA, "kuairand_pure_features")
  c.data.layout = "auto"  # 'release' (log_standard_*.csv) or 'sample' (joined CSV)
  c.data.include_random = False  # also read log_random_*.csv (randomly exposed videos)
  c.data.top_tabs = 4  # keep the N tabs with the most rows (0: all)
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # A video shown again to a user in the same tab is legitimate in the logs: 'max' keeps one
  # exposure (the first row), clicked if any showing was, and counts the others in the
  # manifest's rows_merged. Or 'error' | 'first' | 'last' | 'keep' (counted in rows_repeated).
  c.data.duplicates = "max"
  c.data.split = (0.8, 0.1, 0.1)  # random train / valid / test split of the kept rows
  c.data.split_seed = 42
  c.data.min_count = 1  # values seen fewer times in the training split map to id 0
  c.data.max_multi_hot = 0  # 0: keep every tag of a video

  # Size of this data set: the sample is tiny (160 training rows) and has a single tab, and
  # scenario-view pre-training needs >= 2 scenarios: no pre-training on it. Set e.g.
  # --config.pretrain.num_steps=600 for the release data (4 tabs). Not tuned.
  c.pretrain.num_steps = 0
  c.pretrain.batch_size = 32
  c.train.num_steps = 50
  c.train.batch_size = 16
  c.train.warmup_steps = 5
  c.train.log_every = 10
  c.checkpoint.every_steps = 25
  # Size of this data set: the sample has 29 videos (the papers use K = 50, 100 on the release).
  c.eval.ks = (5, 10, 20)
  # Everything else (model.tau 0.2, train.logq_strength 1.5, pretrain.pairs 'user_item',
  # pretrain.tau 0.2, learning rates): inherited defaults of configs/base.py (chosen on
  # MovieLens), not tuned on this data set.
  return base.apply_model_arg(c, arg)
