"""SASS on the synthetic planted multi-scenario data (docs/design.md §4, "synthetic").

Default: 1e5 rows, 10k users, 5k items, 3 scenarios (prepares in about a second).
Arguments (comma-separated, any order): 'sass' | 'sass_base' (the model; configs/base.py)
and 'large' for 1e7 rows with 1e6 users and 1e6 items (about a minute to prepare, < 1 GB memory),
or 'xlarge' for 1.2e7 rows over 2e7 users and 1e7 items (flatter item popularity, Zipf 0.5): the
training split's vocabularies give about 1.1e7 embedding rows (the row-sparse update benchmark in
BENCHMARKS.md; about 1.5 minutes to prepare, a few GB of memory with dense AdamW).

Usage:
  python -m sass_jax.main --config configs/synthetic.py --workdir runs/syn --mode train
  python -m sass_jax.main --config configs/synthetic.py:sass_base,large --workdir runs/syn_l --mode train
"""

import ml_collections

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  args = [a.strip() for a in (arg or "sass").split(",") if a.strip()]
  unknown = [a for a in args if a not in ("sass", "sass_base", "large", "xlarge")]
  if unknown:
    raise ValueError(
      f"configs/synthetic.py: unknown argument(s) {unknown}; "
      "use 'sass' | 'sass_base' and optionally 'large' or 'xlarge'"
    )
  model = "sass_base" if "sass_base" in args else "sass"
  xlarge = "xlarge" in args
  large = "large" in args or xlarge
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"
  c.data.num_rows = (12_000_000 if xlarge else 10_000_000) if large else 100_000
  c.data.num_users = (20_000_000 if xlarge else 1_000_000) if large else 10_000
  c.data.num_items = (10_000_000 if xlarge else 1_000_000) if large else 5_000
  c.data.num_scenarios = 3
  c.data.num_user_fields = 2  # extra categorical fields derived from the latent clusters
  c.data.num_item_fields = 2
  c.data.seed = 0
  c.data.latent_dim = 16
  c.data.num_clusters = 32
  c.data.scenario_strength = 1.0  # weight of the scenario-specific part of the latent vectors
  c.data.popularity_shared = 0.3  # correlation of item popularity across scenarios
  c.data.zipf_alpha = 0.5 if xlarge else 1.0
  c.data.ctr = 0.1  # target click rate
  c.data.signal = 2.5  # logit scale of the standardised latent score
  c.data.split = (0.8, 0.1, 0.1)
  c.data.min_count = 1
  if large:  # size of this data set: larger batches and more steps
    c.pretrain.batch_size = 4096
    c.train.batch_size = 4096
    c.train.num_steps = 20_000
    c.pretrain.num_steps = 5_000
    c.eval.user_chunk = 4096
  # Everything else: inherited defaults of configs/base.py (chosen on MovieLens), not tuned on
  # the planted data.
  return base.apply_model_arg(c, model)
