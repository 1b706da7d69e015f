"""A synthetic data set at Ali-CCP scale for throughput benchmarks (BENCHMARKS.md).

Ali-CCP (Tianchi 408) has 3 scenarios (field 301) and about 1.4M embedding rows over its
categorical fields. This config generates planted synthetic data (sass_jax/data/synthetic.py)
of that shape: 300k users and 1.1M items (Zipf 0.6 popularity), 8 more categorical fields per
side of 6,000 values each -- 18 fields; the vocabularies of the training split give about 1.4M
embedding rows in all (about 290k user ids, 1.0M item ids, 96k side values) -- K = 3 scenarios
and 5M exposures. It is about speed, not accuracy: the real Ali-CCP loader is
configs/aliccp.py.

Arguments (comma-separated): 'sass' | 'sass_base' (the model), and a batch size, e.g.
'sass,65536' (default 4096; the issue's range is 4096 to 65536).

Usage:
  python -m sass_jax.main --config configs/aliccp_scale.py --workdir runs/aliccp_scale --mode bench
  python -m sass_jax.main --config configs/aliccp_scale.py:sass,16384 --workdir runs/acs --mode bench
"""

import ml_collections

from configs import base, synthetic


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  args = [a.strip() for a in (arg or "sass").split(",") if a.strip()]
  sizes = [int(a) for a in args if a.isdigit()]
  names = [a for a in args if not a.isdigit()]
  unknown = [a for a in names if a not in ("sass", "sass_base")]
  if unknown or len(sizes) > 1:
    raise ValueError(
      f"configs/aliccp_scale.py: bad argument(s) {args}; use 'sass' | "
      "'sass_base' and optionally one batch size, e.g. 'sass,16384'"
    )
  c = synthetic.get_config()
  c.data.num_rows = 5_000_000
  c.data.num_users = 300_000
  c.data.num_items = 1_100_000
  c.data.zipf_alpha = 0.6  # flatter popularity: about 1.0M items seen in training
  c.data.num_scenarios = 3
  c.data.num_user_fields = 8  # + user_id: 9 user fields
  c.data.num_item_fields = 8  # + item_id: 9 item fields
  c.data.field_cardinality = 6_000  # values per side field: 16 x 6,000 = 96k rows
  bs = sizes[0] if sizes else 4096
  # Size of this (Ali-CCP-scale) setting: batch and step counts; not tuned.
  c.pretrain.batch_size = bs
  c.train.batch_size = bs
  c.train.num_steps = 20_000
  c.pretrain.num_steps = 5_000
  c.eval.user_chunk = 4096
  return base.apply_model_arg(c, "sass_base" if "sass_base" in names else "sass")
