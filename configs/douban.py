"""SASS on Douban book + music (GA-DTCDR release), two real domains (docs/design.md §1, §2, 4, 5).

165,750 ratings, 2,216 distinct users in the files (1,566 in both domains; the data README
says 2,718), 12,344 items (6,777 book + 5,567 music);
label rating >= 4; random 8:1:1 split.

Usage:
  python -m sass_jax.main --config configs/douban.py --workdir runs/douban --mode train
  # SASS-Base (no pre-training):  --config configs/douban.py:sass_base
"""
import os

import ml_collections

from configs import movielens


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = movielens.get_config(arg)
  c.data = ml_collections.ConfigDict()
  c.data.name = "douban_gadtcdr"
  c.data.dir = os.path.join(movielens.SHARED_DATA, "douban_gadtcdr_book_music")
  c.data.domains = ("book", "music")  # douban_<domain>_ratings.dat; scenario k = domains[k]
  c.data.on_error = "strict"       # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, item) rated twice within a domain: the release has one rating per pair, so
  # 'error' (a bad row naming both lines); or 'first' | 'last' | 'max' | 'keep' (counted).
  c.data.duplicates = "error"
  c.data.split = (0.8, 0.1, 0.1)   # random train / valid / test split of the rating rows
  c.data.split_seed = 42
  c.data.min_count = 1             # values seen fewer times in the training split map to id 0
  # The two domains have disjoint items: rank each domain's own catalogue (book and music items
  # are never recommended in the other domain), as the cross-domain papers evaluate.
  c.eval.corpus = "scenario"

  # ~97k training positives: 2000 x 1024 is about 21 epochs of fine-tuning.
  c.pretrain.batch_size = 1024
  c.train.batch_size = 1024
  c.train.num_steps = 2000
  return c
