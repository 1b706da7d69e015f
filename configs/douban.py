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

from configs import base


def get_config(arg: str = "sass") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.data = ml_collections.ConfigDict()
  c.data.name = "douban_gadtcdr"
  c.data.dir = os.path.join(base.SHARED_DATA, "douban_gadtcdr_book_music")
  c.data.domains = ("book", "music")  # douban_<domain>_ratings.dat; scenario k = domains[k]
  c.data.on_error = "strict"  # 'strict': bad rows raise; 'skip': count and drop them
  # A (user, item) rated twice within a domain: the release has one rating per pair, so
  # 'error' (a bad row naming both lines); or 'first' | 'last' | 'max' | 'keep' (counted).
  c.data.duplicates = "error"
  c.data.split = (0.8, 0.1, 0.1)  # random train / valid / test split of the rating rows
  c.data.split_seed = 42
  c.data.min_count = 1  # values seen fewer times in the training split map to id 0
  # The two domains have disjoint items: rank each domain's own catalogue (book and music items
  # are never recommended in the other domain), as the cross-domain papers evaluate.
  c.eval.corpus = "scenario"

  # Size of this data set: ~97k training positives; 2000 x 1024 is about 21 epochs of
  # fine-tuning (not tuned).
  c.pretrain.batch_size = 1024
  c.train.batch_size = 1024
  c.train.num_steps = 2000
  # Chosen on this data set's validation split: a 12-point seeded random search for SASS over
  # learning rate, tau, logQ strength, widths and the pre-training tau, steps and pairs
  # (results/douban_equal_budget.md): lr 1e-3, tau 0.2, logQ 1.5, widths (256, 128),
  # pre-training tau 0.2 and pairs 'user_item' (the base values), and 1200 pre-training steps.
  c.pretrain.num_steps = 1200
  return base.apply_model_arg(c, arg)
