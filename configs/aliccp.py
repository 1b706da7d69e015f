"""SASS on Ali-CCP with field 301 as the scenario (docs/design.md §4; sass_jax/data/aliccp.py).

Default data: the real 200-row sample in ../shared/data/ali_ccp_sample (csv layout, all rows
301=1 -- a smoke test only). For the full Tianchi release set
``--config.data.dir=<folder with sample_skeleton_*.csv / common_features_*.csv>``; argument
'variant' uses the sample's hand-edited scenario_wise_rec_variant/ (all 3 scenario ids; NOT real
scenario labels, plumbing only).

Usage:
  python -m sass_jax.main --config configs/aliccp.py --workdir runs/aliccp --mode train
  python -m sass_jax.main --config configs/aliccp.py:sass_base --config.data.dir=/data/ali-ccp ...
"""

import os

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  args = [a.strip() for a in (arg or "sass").split(",") if a.strip()]
  model = "sass_base" if "sass_base" in args else "sass"
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "aliccp"
  c.data.dir = os.path.join(
    base.SHARED_DATA,
    "ali_ccp_sample",
    *(["scenario_wise_rec_variant"] if "variant" in args else []),
  )
  c.data.layout = "auto"  # 'raw' (Tianchi sample_skeleton/common_features), 'csv' (preprocessed)
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # Repeated (user, item, 301) impressions: 'keep' (entire space: each impression of a request
  # is an exposure; in the csv layout all rare users / items also share id 0), counted in the
  # manifest's rows_repeated. Or 'error' | 'first' | 'last' | 'max' (one row per triple).
  c.data.duplicates = "keep"
  c.data.split = (0.8, 0.1, 0.1)  # raw layout: train file cut train:valid = 8:1; test file = test
  c.data.split_seed = 42
  c.data.min_count = 1  # values seen fewer times in the training split map to id 0
  c.data.max_multi_hot = 0  # 0: keep every value of 109_14 / 110_14 / 127_14 / 150_14
  c.data.scenarios = None  # raw layout: allowed 301 feature ids (None: every value seen)

  # Size of this data set: the sample is tiny (100 training rows): small batches and few
  # steps. Not tuned.
  c.pretrain.num_steps = 20
  c.pretrain.batch_size = 32
  c.train.num_steps = 50
  c.train.batch_size = 8
  c.train.warmup_steps = 5
  c.train.log_every = 10
  c.checkpoint.every_steps = 25
  # Everything else (model.tau 0.2, train.logq_strength 1.5, pretrain.pairs 'user_item',
  # pretrain.tau 0.2, learning rates, widths): inherited defaults of configs/base.py (chosen
  # on MovieLens), not tuned on this data set.
  return base.apply_model_arg(c, model)
