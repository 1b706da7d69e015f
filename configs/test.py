"""Tiny variant of configs/movielens.py for tests (runs in seconds on a CPU).

Size only: a small model and few steps so that a test run takes seconds; not tuned.
"""

from configs import base, movielens


def get_config(arg: str = "sass"):
  c = movielens.get_config()
  c.model.embed_dim = 8
  c.model.scenario_dim = 8
  c.model.widths = (32, 16)
  c.model.out_dim = 16
  c.model.bias_hidden = 8
  c.pretrain.num_steps = 20
  c.pretrain.batch_size = 64
  c.train.num_steps = 30
  c.train.batch_size = 64
  c.train.warmup_steps = 5
  c.train.log_every = 10
  c.checkpoint.every_steps = 10
  c.eval.user_chunk = 256
  return base.apply_model_arg(c, arg)
