"""SASS on Amazon Sports + Clothing (CDRIB release), two real domains (docs/design.md §1, §2, 4, 5).

364,547 implicit positives; 59,329 users (9,828 shared), 30,598 items; the authors' split
(valid / test users are cold-start in that domain). ``--config.data.pair=game_video`` reads
the Game / Video pair instead (2,179 shared users).

Usage:
  python -m sass_jax.main --config configs/amazon_sports_clothing.py --workdir runs/amz --mode train
"""
import os

import ml_collections

from configs import movielens


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = movielens.get_config(arg)
  c.data = ml_collections.ConfigDict()
  c.data.name = "amazon_cdrib"
  c.data.dir = os.path.join(movielens.SHARED_DATA, "amazon_cdrib_pairs")
  c.data.pair = "sport_cloth"      # or 'game_video' (also 'cloth_sport' / 'video_game': swapped)
  c.data.shared_users = 0          # 0: the pair's known count (9,828 / 2,179); needed for others
  c.data.on_error = "strict"       # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, item) on two lines of one folder (in any of train / valid / test): CDRIB lists a
  # purchase once, and a repeat across splits would be a training positive in the test set, so
  # 'error' (a bad row naming both lines); 'first' keeps the earliest split's (counted).
  c.data.duplicates = "error"
  c.data.min_count = 1             # values seen fewer times in the training split map to id 0
  # The two domains have disjoint items: rank each domain's own catalogue (sports and clothing items
  # are never recommended in the other domain), as the cross-domain papers evaluate.
  c.eval.corpus = "scenario"

  # ~351k training positives: 6000 x 1024 is about 17 epochs of fine-tuning.
  c.pretrain.num_steps = 0 if arg == "sass_base" else 1000
  c.pretrain.batch_size = 1024
  c.train.num_steps = 6000
  c.train.batch_size = 1024
  c.train.warmup_steps = 200
  c.train.log_every = 100
  c.checkpoint.every_steps = 1000
  return c
