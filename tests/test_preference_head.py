"""SASS's preference head (``config.model.preference_dim``; docs/design.md §1, "preference
head"): the retrieval vectors are the plain model's, the ranking vectors append sqrt(tau) q so
that <., .> / tau = <r_u, r_i> / tau + <q_u, q_i>; the softmax and pre-training never see q,
the labelled BCE trains it (and, with ``preference_input='own'``, nothing else), evaluation
scores AUC / GAUC with it and ranks with r only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sass_jax.data.store import PreparedData
from sass_jax.eval import evaluate as ev
from sass_jax.model import registry
from sass_jax.model.protocol import RANK_METHODS, ranking_methods
from sass_jax.model.towers import SASS
from sass_jax.train import steps

TAU = 0.2
P = 3


def _params(model, user, item, scen):
  return nn.meta.unbox(model.init(jax.random.key(0), user, item, jnp.asarray(scen))["params"])


HEAD = dict(preference_dim=P, preference_widths=(4,))


def _split(p):
  """(params of the plain model, the preference heads' params) of a model with the head."""
  p0 = jax.tree.map(lambda x: x, p)
  heads = {
    side: {k: p0[side].pop(k) for k in list(p0[side]) if k.startswith("preference")}
    for side in ("user_tower", "item_tower")
  }
  return p0, heads


@pytest.mark.parametrize("compute", ["grouped", "onehot"])
@pytest.mark.parametrize("source", ["own", "shared"])
def test_retrieval_vectors_are_the_plain_models_and_ranking_vectors_add_q(
  tiny_cfg, tiny_features, compute, source
):
  user, item = tiny_features(7, seed=1)
  scen = np.array([0, 1, 2, 2, 0, 1, 1], np.int32)
  plain = SASS(tiny_cfg(tau=TAU, scenario_compute=compute))
  model = SASS(tiny_cfg(tau=TAU, scenario_compute=compute, preference_input=source, **HEAD))
  p = _params(model, user, item, scen)
  p0, heads = _split(p)
  # input -> hidden 4 -> P: the own embeddings (2 user fields x 4) or the last hidden layer (6)
  assert heads["user_tower"]["preference"]["kernel"].shape == (4, P)
  d_in = 8 if source == "own" else 6
  assert heads["user_tower"]["preference_hidden_0"]["kernel"].shape == (d_in, 4)
  assert ("preference_embed" in heads["user_tower"]) == (source == "own")
  assert jax.tree.structure(p0) == jax.tree.structure(_params(plain, user, item, scen))
  apply = lambda m, q, f, s, meth: np.asarray(m.apply({"params": q}, f, s, method=meth))
  u, i = apply(model, p, user, scen, "encode_user"), apply(model, p, item, scen, "encode_item")
  np.testing.assert_allclose(u, apply(plain, p0, user, scen, "encode_user"), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(i, apply(plain, p0, item, scen, "encode_item"), rtol=1e-6, atol=1e-6)
  ru, ri = apply(model, p, user, scen, "rank_user"), apply(model, p, item, scen, "rank_item")
  assert u.shape == (7, 5) and ru.shape == (7, 5 + P)
  np.testing.assert_allclose(ru[:, :5], u, rtol=1e-6, atol=1e-6)
  qu, qi = ru[:, 5:] / np.sqrt(TAU), ri[:, 5:] / np.sqrt(TAU)
  assert np.abs(qu).max() > 1e-3 and np.abs(qi).max() > 1e-3
  np.testing.assert_allclose(
    (ru * ri).sum(-1) / TAU, (u * i).sum(-1) / TAU + (qu * qi).sum(-1), rtol=1e-5, atol=1e-5
  )
  # the all-scenarios layout holds the same ranking vectors at each row's scenario
  ra = apply(model, p, user, None, "rank_user")
  assert ra.shape == (7, 3, 5 + P)
  np.testing.assert_allclose(ra[np.arange(7), scen], ru, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["own", "shared"])
def test_softmax_and_pretraining_ignore_the_head_and_the_bce_trains_it(
  tiny_cfg, tiny_features, source
):
  user, item = tiny_features(8, seed=2)
  scen = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  plain = SASS(tiny_cfg(tau=TAU))
  model = SASS(tiny_cfg(tau=TAU, preference_input=source, preference_dropout=0.0, **HEAD))
  p = _params(model, user, item, scen)
  p0, _ = _split(p)
  batch = {
    "user": user,
    "item": item,
    "scenario": scen,
    "user_index": user["user_id"],
    "item_index": item["movie_id"],
    "item_logq": np.linspace(-3, -1, 8).astype(np.float32),
  }
  rng = jax.random.key_data(jax.random.key(1))
  # fine-tuning softmax (both negatives) and user-item pre-training: the plain model's loss,
  # and no gradient reaches the head
  for loss in (
    lambda m, q: steps.finetune_loss(m, q, batch, rng, TAU, 1.0)[0],
    lambda m, q: steps.finetune_loss(m, q, batch, rng, TAU, 1.0, None, "same_scenario")[0],
    lambda m, q: steps.pretrain_loss(m, q, batch, rng, TAU, "user_item")[0],
  ):
    np.testing.assert_allclose(float(loss(model, p)), float(loss(plain, p0)), rtol=1e-6)
    g = jax.grad(lambda q: loss(model, q))(p)
    for side in ("user_tower", "item_tower"):
      assert np.abs(np.asarray(g[side]["preference"]["kernel"])).max() == 0.0
  # the labelled BCE scores the ranking vectors: it trains the head
  lab = {
    "user": user,
    "item": item,
    "scenario": scen,
    "label": np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32),
  }
  lbatch = {**batch, "labelled": lab}
  with_bce = lambda q: steps.finetune_loss(model, q, lbatch, rng, TAU, 1.0, None, "all", 1.0)
  (_, (extra, _)), g = jax.value_and_grad(with_bce, has_aux=True)(p)
  ru = model.apply({"params": p}, user, scen, method="rank_user")
  ri = model.apply({"params": p}, item, scen, method="rank_item")
  s = np.asarray((ru * ri).sum(-1)) / TAU
  y = lab["label"]
  want = np.mean(np.logaddexp(0.0, s) - y * s)
  np.testing.assert_allclose(float(extra["labelled_bce"]), want, rtol=1e-5)
  g0, gh = _split(g)
  for side in ("user_tower", "item_tower"):
    assert np.abs(np.asarray(gh[side]["preference"]["kernel"])).max() > 1e-4
  # 'own': the BCE trains no parameter of retrieval, so the gradient of the whole loss on them
  # is the softmax's alone; 'shared': the BCE trains the tower too
  g_soft = jax.grad(lambda q: steps.finetune_loss(plain, q, batch, rng, TAU, 1.0)[0])(p0)
  diff = max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g_soft))
  )
  if source == "own":
    assert diff < 1e-6, diff
  else:
    assert diff > 1e-4, diff


def test_ranking_methods_and_config_checks(tiny_cfg):
  assert ranking_methods(SASS(tiny_cfg(**HEAD))) == RANK_METHODS
  assert ranking_methods(SASS(tiny_cfg())) == ("encode_user", "encode_item")
  assert ranking_methods(object()) == ("encode_user", "encode_item")
  cfg = ml_collections.ConfigDict({"name": "star", "preference_dim": 4})
  assert any("config.model.preference_dim" in x for x in registry.config_problems(cfg))
  cfg.name = "sass"
  assert not any("preference_dim" in x for x in registry.config_problems(cfg))
  from configs import movielens
  from sass_jax import config_check

  c = movielens.get_config()
  c.model.preference_dim = -1
  c.model.preference_input = "both"
  c.model.preference_widths = (64, 0)
  c.model.preference_dropout = 1.0
  with pytest.raises(ValueError) as e:
    config_check.validate(c)
  for want in (
    "config.model.preference_dim=-1: expected an int >= 0",
    "config.model.preference_input='both': expected one of ('own', 'shared')",
    "config.model.preference_widths=(64, 0): expected positive ints",
    "config.model.preference_dropout=1.0: expected a rate in [0, 1)",
  ):
    assert want in str(e.value), str(e.value)
  # the row-sparse optimisers address the towers' own tables only (flax raised a shape error
  # deep in the first step before this check)
  c = movielens.get_config()
  c.model.preference_dim = 16
  c.train.embedding_optimizer = "lazy_adam"
  with pytest.raises(ValueError, match=r"do not address the preference head's own tables"):
    config_check.validate(c)
  c.model.preference_input = "shared"
  with pytest.raises(ValueError, match=r"labelled_weight=0: nothing would train the preference"):
    config_check.validate(c)  # a head with no loss to train it (found by a fresh-user check)
  c.train.labelled_weight = 1.0
  config_check.validate(c)
  c.train.labelled_weight = 0.0
  config_check.validate(c, stages=())  # evaluation alone: nothing is trained


# -- evaluation: AUC / GAUC from the ranking vectors, Recall from the retrieval vectors ----------
# one scenario, 2 users, 4 items; user, item, scenario, label, split (0 train, 2 test)
ROWS = np.array(
  [
    (0, 0, 0, 1, 0),
    (1, 1, 0, 1, 0),
    (0, 1, 0, 1, 2),  # test: user 0 likes item 1, dislikes item 2
    (0, 2, 0, 0, 2),
    (1, 3, 0, 1, 2),  # test: user 1 likes item 3, dislikes item 0
    (1, 0, 0, 0, 2),
  ]
)


def _data() -> PreparedData:
  cols = dict(zip(["user", "item", "scenario", "label", "split"], ROWS.T))
  inter = {
    k: v.astype(t) for (k, v), t in zip(cols.items(), [np.int32] * 3 + [np.float32, np.int8])
  }
  return PreparedData(
    path=Path("."),
    manifest={"num_users": 2, "num_items": 4},
    scenario_names=["only"],
    user_specs=[],
    item_specs=[],
    users={"id": np.arange(2, dtype=np.int32)},
    items={"id": np.arange(4, dtype=np.int32)},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=np.array(["u0", "u1"]),
    item_raw_ids=np.array([f"i{i}" for i in range(4)]),
  )


@dataclasses.dataclass(frozen=True)
class _Cfg:
  preference_dim: int


class RankLookup(nn.Module):
  """Fixed retrieval vectors [N, 1] and ranking vectors [N, 2] (retrieval + one q dim)."""

  cfg: _Cfg = _Cfg(1)

  def setup(self):
    self.u = self.param("user", nn.initializers.zeros, (2, 2))
    self.i = self.param("item", nn.initializers.zeros, (4, 2))

  def rank_user(self, features, scenario=None, train=False):
    v = self.u[features["id"]]
    return v if scenario is not None else v[:, None]

  def rank_item(self, features, scenario=None, train=False):
    v = self.i[features["id"]]
    return v if scenario is not None else v[:, None]

  def encode_user(self, features, scenario=None, train=False):
    return self.rank_user(features, scenario, train)[..., :1]

  def encode_item(self, features, scenario=None, train=False):
    return self.rank_item(features, scenario, train)[..., :1]


def test_evaluation_scores_auc_with_the_ranking_vectors():
  # retrieval score: item 2 > 0 > 3 > 1 for both users (the disliked items first: AUC 0);
  # ranking score adds q: user q = 1, item q = [4, 10, -10, 10] -> liked items first (AUC 1)
  params = {
    "user": jnp.asarray([[1.0, 1.0], [1.0, 1.0]]),
    "item": jnp.asarray([[3.0, 4.0], [1.0, 10.0], [4.0, -10.0], [2.0, 10.0]]),
  }
  m = ev.evaluate(RankLookup(), params, _data(), "test", ks=(1,))
  assert m["overall"]["auc"] == 1.0 and m["overall"]["gauc"] == 1.0
  assert m["auc_score"] == "retrieval + preference head"
  assert ev.markdown_table(m).startswith("AUC / GAUC scored by: retrieval + preference head")
  # Recall@1 ranks by the retrieval score: user 0 (item 0 masked) gets 2, user 1 (1 masked) 2
  assert m["overall"]["recall@1"] == 0.0
  # without the head the same vectors' retrieval part scores the exposures: AUC 0
  m0 = ev.evaluate(RankLookup(_Cfg(0)), params, _data(), "test", ks=(1,))
  assert m0["overall"]["auc"] == 0.0 and m0["auc_score"] == "retrieval"
  assert ev.markdown_table(m0).startswith("| scenario |")
