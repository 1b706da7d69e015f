"""``config.eval.corpus``: rank the whole corpus or only the scenario's own items (docs/design.md §5).

A hand-made store: scenario 'book' has items 0-3, 'music' items 4-7. A fixed lookup "model"
scores the other domain's items highest, so with corpus='all' they crowd the top of the list,
and with corpus='scenario' they are never candidates. Expected Recall@K values are worked out
by hand in the comments.
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from sass_jax.data.store import PreparedData
from sass_jax.eval import evaluate as ev

# user, item, scenario, label, split (0 train, 2 test)
ROWS = np.array(
  [
    (0, 0, 0, 1, 0),  # user 0 book: train positive 0 (masked), test positive 2
    (0, 2, 0, 1, 2),
    (1, 1, 0, 1, 0),
    (1, 3, 0, 0, 0),
    (1, 4, 1, 1, 0),  # user 1 music: train positive 4 (masked), test positive 6
    (0, 5, 1, 1, 0),
    (1, 6, 1, 1, 2),
    (1, 7, 1, 0, 0),
    # Training negatives that put the test positives' items into their scenario's catalogue
    # (corpus='scenario' is read from the training split only); no positive, no mask.
    (1, 2, 0, 0, 0),
    (0, 6, 1, 0, 0),
  ]
)


def _data() -> PreparedData:
  cols = dict(zip(["user", "item", "scenario", "label", "split"], ROWS.T))
  inter = {
    "user": cols["user"].astype(np.int32),
    "item": cols["item"].astype(np.int32),
    "scenario": cols["scenario"].astype(np.int32),
    "label": cols["label"].astype(np.float32),
    "split": cols["split"].astype(np.int8),
  }
  return PreparedData(
    path=Path("."),
    manifest={"num_users": 2, "num_items": 8},
    scenario_names=["book", "music"],
    user_specs=[],
    item_specs=[],
    users={"id": np.arange(2, dtype=np.int32)},
    items={"id": np.arange(8, dtype=np.int32)},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=np.array(["u0", "u1"]),
    item_raw_ids=np.array([f"i{i}" for i in range(8)]),
  )


class Lookup(nn.Module):
  """encode_user / encode_item: fixed vectors ``[N, K, D]`` given as parameters."""

  def setup(self):
    self.u = self.param("user", nn.initializers.zeros, (2, 2, 2))
    self.i = self.param("item", nn.initializers.zeros, (8, 2, 2))

  @staticmethod
  def _pick(table, ids, scenario):
    v = table[ids]
    return v if scenario is None else v[jnp.arange(v.shape[0]), scenario]

  def encode_user(self, features, scenario=None, train=False):
    return self._pick(self.u, features["id"], scenario)

  def encode_item(self, features, scenario=None, train=False):
    return self._pick(self.i, features["id"], scenario)


def _params():
  user = np.zeros((2, 2, 2), np.float32)
  user[:, :, 0] = 1.0  # every user vector is [1, 0]
  item = np.zeros((8, 2, 2), np.float32)
  # book (scenario 0) scores: music items 10 (distractors), 0 -> 9 (masked), 2 -> 5, 1 -> 3, 3 -> 1
  item[:, 0, 0] = [9, 3, 5, 1, 10, 10, 10, 10]
  # music (scenario 1) scores: book items 10, 4 -> 9 (masked), 5 -> 6, 6 -> 5, 7 -> 1
  item[:, 1, 0] = [10, 10, 10, 10, 9, 6, 5, 1]
  return {"user": jnp.asarray(user), "item": jnp.asarray(item)}


@pytest.mark.parametrize(
  "corpus, expected",
  [
    # all: the top 2 are other-domain items (score 10) in both scenarios -> 0 hits; @8 the
    # book list is 4,5,6,7,2,1,3 (0 masked) and the music list 0,1,2,3,5,6,7: both hit.
    ("all", {"book": (0.0, 0.0, 1.0), "music": (0.0, 0.0, 1.0)}),
    # scenario: book ranks {1,2,3} -> 2,1,3: hit at rank 1; music ranks {5,6,7} -> 5,6,7: hit
    # at rank 2; @8 only 3 candidates (the list is padded) and both hit.
    ("scenario", {"book": (1.0, 1.0, 1.0), "music": (0.0, 1.0, 1.0)}),
  ],
)
def test_recall_by_corpus(corpus, expected):
  m = ev.evaluate(Lookup(), _params(), _data(), "test", ks=(1, 2, 8), corpus=corpus)
  assert m["corpus"] == corpus and m["mask"] == "train"
  for name, (r1, r2, r8) in expected.items():
    got = m["scenarios"][name]
    assert (got["recall@1"], got["recall@2"], got["recall@8"]) == (r1, r2, r8), name
  assert m["overall"]["recall@1"] == np.mean([v[0] for v in expected.values()])


def test_popularity_ranks_the_same_corpus():
  # Training positive counts: book {0: 1, 1: 1}; music {4: 1, 5: 1}. User 0 (book) has 0
  # masked -> 1 then 2 (count 0, lowest index): test item 2 at rank 2 either way. User 1
  # (music) has 4 masked -> 5, then with 'all' the zero-count items 0, 1, ... (book items!),
  # with 'scenario' 6: a hit at rank 2 only with the scenario's corpus.
  pop = {
    c: ev.evaluate(Lookup(), _params(), _data(), "test", ks=(1, 2), corpus=c)["baselines"][
      "popularity"
    ]["scenarios"]
    for c in ("all", "scenario")
  }
  assert pop["all"]["book"]["recall@2"] == 1.0 and pop["scenario"]["book"]["recall@2"] == 1.0
  assert pop["all"]["music"]["recall@2"] == 0.0 and pop["scenario"]["music"]["recall@2"] == 1.0


def test_scenario_corpus_and_unknown_name():
  d = _data()
  assert ev.scenario_corpus(d, 0, "all") is None
  np.testing.assert_array_equal(ev.scenario_corpus(d, 0, "scenario"), [0, 1, 2, 3])
  np.testing.assert_array_equal(ev.scenario_corpus(d, 1, "scenario"), [4, 5, 6, 7])
  with pytest.raises(ValueError, match=r"config.eval.corpus='domain'; expected one of"):
    ev.evaluate(Lookup(), _params(), d, "test", corpus="domain")
