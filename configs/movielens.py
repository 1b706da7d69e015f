"""SASS on MovieLens-1M with three age scenarios (SPEC sections 1, 2, 4, 5).

Usage:
  python -m sass_jax.main --config configs/movielens.py --workdir runs/ml --mode train
  # SASS-Base (no pre-training):  --config configs/movielens.py:sass_base
"""
import os

import ml_collections

# The shared samples sit beside the repository (../shared/data), whatever the working directory.
SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = "movielens"
  c.data.dir = os.path.join(SHARED_DATA, "movielens_1m_sample")
  c.data.download = False          # fetch ml-1m.zip from GroupLens into data.dir (MD5 checked)
  c.data.on_error = "strict"       # 'strict': bad rows raise; 'skip': count and drop them
  c.data.split = (0.8, 0.1, 0.1)   # random train / valid / test split of the rating rows
  c.data.split_seed = 42
  c.data.zip_prefix_len = 3
  c.data.min_count = 1             # values seen fewer times in the training split map to id 0
  c.data.max_genres = 6

  c.model = ml_collections.ConfigDict()
  c.model.name = arg               # 'sass' or 'sass_base' (SASS without pre-training)
  c.model.embed_dim = 16           # per field
  c.model.scenario_dim = 16        # d_s of the scenario embedding z_k
  c.model.widths = (256, 128)      # ML-SAT layer widths
  c.model.out_dim = 64
  c.model.activation = "relu"
  c.model.dropout = 0.0
  c.model.layer_norm = False
  c.model.gate_style = "gated_sum"  # 'gated_sum' (SPEC default), 'gru', or 'none' (g + s)
  c.model.gate_per_scenario = False  # gate weights per scenario instead of shared with z_k input
  c.model.bias_mode = "add"        # scenario bias net: 'add' to the output or 'concat'
  c.model.bias_hidden = 32
  c.model.tau = 0.05               # score = <r_u, r_i> / tau
  c.model.vocab_pad_to = 8         # embedding rows rounded up (even row-sharding over 'model')
  c.model.compute_dtype = "float32"

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.num_steps = 0 if arg == "sass_base" else 600
  c.pretrain.batch_size = 512
  c.pretrain.learning_rate = 1e-3
  c.pretrain.tau = 0.1             # tau_pre of the pre-training InfoNCE
  c.pretrain.pairs = "scenario_views"  # or 'user_item' (SPEC section 2, second reading)

  c.train = ml_collections.ConfigDict()   # stage 2: fine-tuning
  c.train.num_steps = 1000
  c.train.batch_size = 512
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.0
  c.train.warmup_steps = 100
  c.train.logq_strength = 1.0      # alpha of the logQ correction; 0 turns it off
  c.train.log_every = 50

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.max_to_keep = 2

  c.eval = ml_collections.ConfigDict()
  c.eval.split = "test"
  c.eval.ks = (20, 50, 100)
  c.eval.user_chunk = 1024
  c.eval.mask = "train"            # items masked per user: 'train' positives or 'train_valid'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1: all devices not used by the other axis
  c.mesh.model = 1
  c.mesh.shard_min_rows = 100_000  # tables with fewer rows are replicated

  # Values above are the SPEC defaults. These were chosen on the MovieLens *validation* split
  # (README "Results": the runs compared); set them back to compare with the SPEC defaults.
  c.model.tau = 0.2
  c.train.logq_strength = 1.5
  c.pretrain.pairs = "user_item"
  c.pretrain.tau = 0.2
  return c
