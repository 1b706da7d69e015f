"""SASS at pod scale, for --mode compile: about 1e9 embedding rows, K = 4 scenarios, a global
batch of 65,536 (docs/scaling.md).

The fields are Ali-CCP's (configs/aliccp.py; Tianchi feature ids in brackets) at production
vocabulary sizes, 16-dim tables, 1,000,213,000 rows (64 GB of float32 table) in all:

  user tower: user_id 400M [101], micro group 100 [121], cms group 16 [122], gender 3 [124],
    age 8 [125], consumption 4 [126], pvalue 4 [127], occupation 3 [128], city 5,000 [129], and
    the multi-hot (8 most recent) histories of categories 20,000 [109_14], shops 100M [110_14],
    brands 50M [127_14] and intentions 200,000 [150_14];
  item tower: item_id 300M [205], category 20,000 [206], shop 100M [207], intention 200,000
    [210], brand 50M [216].

``config.compile`` holds these vocabularies, so nothing is prepared or read: the steps are
compiled from abstract state and batch (sass_jax/aot.py). ``config.data`` describes the
synthetic generator at the same user / item counts; preparing it is not intended (it would
generate 1e9 interactions on one host). SASS defaults otherwise; the tables of >= 1M rows are
split over every chip (config.mesh.table_layout='auto'; smaller ones replicated), the batch
over every chip (mesh data = all, model = 1). The embedding optimiser compiled by --mode train is config.train.
embedding_optimizer ('lazy_adam' here); --mode compile compiles all three.

Arguments (comma-separated): 'sass' | 'sass_base' and optionally a global batch size.

Usage:
  python -m sass_jax.main --config configs/pod_scale.py --workdir runs/pod_v5e --mode compile \
      --config.compile.topology=v5e:16x16
  XLA_FLAGS=--xla_force_host_platform_device_count=64 python -m sass_jax.main \
      --config configs/pod_scale.py --workdir runs/pod_cpu64 --mode compile \
      --config.compile.topology=cpu --config.compile.hbm_bytes=80000000000
"""

import ml_collections

from configs import base, synthetic

M = 1_000_000
USER_FIELDS = (
  ("user_id", 400 * M, 0),
  ("micro_group", 100, 0),
  ("cms_group", 16, 0),
  ("gender", 3, 0),
  ("age", 8, 0),
  ("consumption", 4, 0),
  ("pvalue", 4, 0),
  ("occupation", 3, 0),
  ("city", 5_000, 0),
  ("hist_categories", 20_000, 8),
  ("hist_shops", 100 * M, 8),
  ("hist_brands", 50 * M, 8),
  ("hist_intentions", 200_000, 8),
)
ITEM_FIELDS = (
  ("item_id", 300 * M, 0),
  ("category", 20_000, 0),
  ("shop", 100 * M, 0),
  ("intention", 200_000, 0),
  ("brand", 50 * M, 0),
)


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  args = [a.strip() for a in (arg or "sass").split(",") if a.strip()]
  sizes = [int(a) for a in args if a.isdigit()]
  names = [a for a in args if not a.isdigit()]
  if [a for a in names if a not in ("sass", "sass_base")] or len(sizes) > 1:
    raise ValueError(
      f"configs/pod_scale.py: bad argument(s) {args}; use 'sass' | 'sass_base' "
      "and optionally one global batch size, e.g. 'sass,131072'"
    )
  model = "sass_base" if "sass_base" in names else "sass"
  c = synthetic.get_config()
  c.data.num_users = 400 * M
  c.data.num_items = 300 * M
  c.data.num_rows = 1_000 * M
  c.data.num_scenarios = 4
  # Size of this (production-scale) setting: the global batch and step counts. Everything else
  # is configs/base.py's, including the mesh (batch over every chip, tables split over every
  # chip: mesh.data=-1, model=1, table_layout='auto'), except:
  # tables under 1M rows (the 200,704-row intention tables, 12.8 MB each) are replicated. A
  # step looks up 65,536 x 8 ids, more than such a table has rows, so split over the chips it
  # would move whole every step: XLA all-gathered it under dense AdamW (64 devices), and the
  # row-sparse steps gathered all its rows. Replicated it costs 38 MB per chip with moments.
  c.mesh.shard_min_rows = 1_000_000
  bs = sizes[0] if sizes else 65_536
  c.pretrain.batch_size = bs
  c.train.batch_size = bs
  c.pretrain.num_steps = 20_000
  c.train.num_steps = 100_000
  c.train.embedding_optimizer = "lazy_adam"
  c.eval.user_chunk = 8192
  c.compile.topology = "v5e:16x16"
  c.compile.user_fields = USER_FIELDS
  c.compile.item_fields = ITEM_FIELDS
  c.compile.num_scenarios = 4
  return base.apply_model_arg(c, model)
