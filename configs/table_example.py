"""SASS on your own exposure table (CSV or Parquet) with the schema set here (sass_jax/data/table.py).

The example schema reads the real Douban sample (../shared/data/douban_sample/douban_sample.csv:
columns user_id, item_id, rating, domain, living_place, join_time, time_bin): scenario = ``domain``,
label = rating >= 1 (its rating is binary). Point ``data.path`` and the column names at your table:
  python -m sass_jax.main --config configs/table_example.py --workdir runs/mine --mode train \\
    --config.data.path=/data/log.parquet --config.data.scenario_col=page ...
User / item feature columns are taken per entity from its first row in the file.
"""

import os

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "table"
  c.data.path = os.path.join(base.SHARED_DATA, "douban_sample", "douban_sample.csv")
  c.data.format = "auto"  # 'csv' | 'parquet' | 'auto' (by the file suffix)
  c.data.delimiter = ","
  c.data.user_id_col = "user_id"
  c.data.item_id_col = "item_id"
  c.data.scenario_col = "domain"
  c.data.label_col = "rating"
  c.data.label_threshold = 1.0  # label = float(label_col) >= label_threshold
  c.data.user_cols = ("living_place", "time_bin")
  c.data.item_cols = ()
  c.data.multi_hot_cols = ()  # columns of user_cols / item_cols holding lists
  c.data.separator = "|"  # list separator of multi_hot_cols
  c.data.max_multi_hot = 0  # 0: keep whole lists
  c.data.scenarios = None  # allowed scenario values in order (None: all seen, sorted)
  c.data.numeric_ids = False
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # A row repeating the (user, item, scenario) of an earlier row: 'error' (a bad row naming both
  # lines), 'first' | 'last' (one row; the others counted in rows_merged), 'max' (one row with
  # the highest label) or 'keep' (all rows, counted in rows_repeated).
  c.data.duplicates = "error"
  c.data.split = (0.8, 0.1, 0.1)
  c.data.split_seed = 42
  c.data.min_count = 1

  # Size of the example table (the Douban sample, 2.4k training rows): a smaller model, small
  # batches and few steps. Not tuned.
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
