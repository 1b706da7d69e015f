"""sass_jax.model.registry and the two-tower model protocol (docs/design.md, "The two-tower
model protocol"): every registered model satisfies the protocol, an unknown name is one line,
and a model written here and registered with one line trains (row-sparse tables included),
evaluates and takes part in ``--mode compare``."""

from __future__ import annotations

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import test as test_config
from sass_jax import compare
from sass_jax.model import registry
from sass_jax.model.embedding import FieldEmbedder
from sass_jax.model.protocol import TwoTowerModel
from sass_jax.model.towers import ModelConfig, l2_normalize
from sass_jax.schema import FieldSpec
from sass_jax.train import loop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens_1m_sample"
K = 3
# the fields of conftest's tiny_features
USER = (FieldSpec("user_id", 10), FieldSpec("gender", 3))
ITEM = (FieldSpec("movie_id", 12), FieldSpec("genres", 5, multi_hot=3), FieldSpec("year", 4))


# ----------------------------------------------------------------------------------------------
# a model written outside the package


class _ToyTower(nn.Module):
  """Mean of the field embeddings plus a per-scenario offset, then one dense layer."""

  cfg: ModelConfig
  specs: tuple

  @nn.compact
  def __call__(self, features, scenario=None, train: bool = False):
    c = self.cfg
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, name="embed")(features)
    pooled = e.reshape(e.shape[0], len(self.specs), c.embed_dim).mean(1)  # [B, d]
    offset = self.param(
      "scenario_offset",
      nn.with_logical_partitioning(nn.initializers.normal(0.1), ("scenario", "embed")),
      (c.num_scenarios, c.embed_dim),
      jnp.float32,
    )
    x = (
      pooled[:, None, :] + offset[None]
      if scenario is None
      else pooled + offset[jnp.asarray(scenario, jnp.int32)]
    )  # [B, (K,) d]
    out = nn.Dense(
      c.out_dim,
      kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ("mlp_in", "mlp_out")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp_out",)),
      name="out",
    )(x)
    return l2_normalize(out.astype(jnp.float32))


class ToyMean(nn.Module):
  """A two-tower model implementing TwoTowerModel with nothing but the protocol."""

  cfg: ModelConfig

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    d = model_cfg.embed_dim
    return [] if d % 2 == 0 else [f"config.model.embed_dim={d}: toy_mean needs an even size"]

  def setup(self):
    self.user_tower = _ToyTower(self.cfg, self.cfg.user_specs)
    self.item_tower = _ToyTower(self.cfg, self.cfg.item_specs)

  def encode_user(self, features, scenario=None, train: bool = False):
    return self.user_tower(features, scenario, train)

  def encode_item(self, features, scenario=None, train: bool = False):
    return self.item_tower(features, scenario, train)

  def __call__(self, user_features, item_features, scenario, train: bool = False):
    return (
      self.encode_user(user_features, scenario, train),
      self.encode_item(item_features, scenario, train),
    )


@pytest.fixture
def toy(monkeypatch):
  """Registers ToyMean as 'toy_mean' for one test: the one registry line."""
  monkeypatch.setitem(registry.MODELS, "toy_mean", registry.Entry(ToyMean))
  return "toy_mean"


def _cfg(name):
  c = test_config.get_config()
  c.model.name = name
  c.data.dir = str(DATA)
  return c


# ----------------------------------------------------------------------------------------------
# the protocol


def _check_protocol(model, tiny_features):
  """``model`` satisfies TwoTowerModel: members, both layouts' shapes and dtypes, logical axes
  on every param and the 'vocab' axis exactly on the tables at the documented paths."""
  assert isinstance(model, TwoTowerModel)
  user, item = tiny_features(6)
  sc = jnp.asarray([0, 1, 2, 2, 1, 0], jnp.int32)
  variables = model.init(jax.random.key(0), user, item, sc)
  D = model.cfg.out_dim * (2 if getattr(model.cfg, "bias_mode", "add") == "concat" else 1)
  for method, feats in (("encode_user", user), ("encode_item", item)):
    sel = model.apply(variables, feats, sc, method=method)
    allk = model.apply(variables, feats, None, method=method)
    assert sel.shape == (6, D) and allk.shape == (6, K, D), method
    assert sel.dtype == jnp.float32 and allk.dtype == jnp.float32
    np.testing.assert_allclose(
      np.asarray(sel), np.asarray(allk)[np.arange(6), np.asarray(sc)], atol=1e-5
    )
  flat = traverse_util.flatten_dict(variables["params"])
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in flat.values())
  vocab = {p for p, x in flat.items() if x.names[:1] == ("vocab",)}
  assert vocab == {
    (tower, "embed", s.name)
    for tower, specs in (("user_tower", USER), ("item_tower", ITEM))
    for s in specs
  }


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_model_satisfies_the_protocol(name, tiny_features):
  mc = _cfg(name).model
  assert registry.get(name).model.config_problems(mc) == []
  _check_protocol(registry.build(mc, USER, ITEM, K), tiny_features)


def test_toy_model_satisfies_the_protocol_and_an_incomplete_one_does_not(toy, tiny_features):
  _check_protocol(registry.build(_cfg(toy).model, USER, ITEM, K), tiny_features)

  class NoItemTower(nn.Module):
    cfg: ModelConfig

    @classmethod
    def config_problems(cls, model_cfg):
      return []

    def encode_user(self, features, scenario=None, train=False):
      return features

  assert not isinstance(NoItemTower(None), TwoTowerModel)


def test_names_and_entries():
  assert registry.names() == tuple(registry.MODELS) and registry.names()[0] == "sass"
  assert registry.get("sass").pretrains and not registry.get("dssm_mixed").pretrains
  assert "star_momentum" in registry.non_structural_keys()
  # compare: a model without a pre-training stage runs with pretrain.num_steps = 0
  variants = compare.known_variants()
  assert variants["sass"] == {"model.name": "sass"}
  assert variants["star"] == {"model.name": "star", "pretrain.num_steps": 0}
  assert variants["sass_base"] == {"model.name": "sass", "pretrain.num_steps": 0}


def test_unknown_name_is_one_line_naming_the_field():
  want = f"config.model.name='sas' is not a known model; expected one of {sorted(registry.names())}"
  with pytest.raises(ValueError) as ei:
    registry.get("sas")
  assert str(ei.value) == want
  mc = _cfg("sas").model
  assert registry.config_problems(mc) == [want]
  with pytest.raises(ValueError) as ei:
    registry.build(mc, USER, ITEM, K)
  assert str(ei.value) == want


def test_sass_base_is_a_config_variant_not_a_model():
  """'sass_base' (SASS without pre-training) is the config variant model 'sass' with
  pretrain.num_steps=0 (configs/base.py apply_model_arg); the registry does not know the name
  (old saved configs are renamed by sass_jax.config_migrate.migrate)."""
  assert "sass_base" not in registry.names()
  with pytest.raises(ValueError, match="config.model.name='sass_base' is not a known model"):
    registry.get("sass_base")


def test_a_model_checks_its_own_settings(toy):
  mc = _cfg(toy).model
  mc.embed_dim = 5
  assert registry.config_problems(mc) == ["config.model.embed_dim=5: toy_mean needs an even size"]
  with pytest.raises(ValueError, match="toy_mean needs an even size"):
    registry.build(mc, USER, ITEM, K)


# ----------------------------------------------------------------------------------------------
# the registered toy model through the library


def test_toy_model_trains_with_row_sparse_tables_and_evaluates(toy, tmp_path):
  cfg = _cfg(toy)
  cfg.pretrain.num_steps = 0
  cfg.train.num_steps = 20
  cfg.train.log_every = 5
  cfg.train.embedding_optimizer = "lazy_adam"  # tables at user_tower/embed/<field>
  metrics = loop.train(cfg, tmp_path, show_progress=False)
  on_disk = json.loads((tmp_path / "metrics.json").read_text())
  assert on_disk == json.loads(json.dumps(metrics))
  assert on_disk["model"] == "toy_mean" and on_disk["checkpoint_step"] == 20
  assert 0.0 < on_disk["overall"]["auc"] < 1.0
  logs = [json.loads(l) for l in (tmp_path / "finetune_log.jsonl").read_text().splitlines()]
  assert [l["step"] for l in logs] == [5, 10, 15, 20]
  assert all(l["touched_rows"] > 0 for l in logs)  # the row-sparse path ran
  assert all(np.isfinite(l["loss"]) and l["grad_norm"] > 0 for l in logs)
  assert len({l["param_norm"] for l in logs}) == len(logs)  # every logged step moved params


def test_toy_model_appears_in_compare_results(toy, tmp_path):
  cfg = _cfg(toy)
  cfg.pretrain.num_steps = 5
  cfg.train.num_steps = 10
  cfg.compare.models = (toy,)
  cfg.compare.seeds = 1
  cfg.compare.learning_rates = ()
  cfg.compare.taus = ()
  cfg.compare.results_dir = str(tmp_path / "results")
  cfg.compare.name = "toy"
  res = compare.compare(cfg, tmp_path / "work")
  assert res["models"] == [toy] and [r["model"] for r in res["runs"]] == [toy]
  run_dir = next((tmp_path / "work" / "runs" / toy).glob("*/seed0"))
  assert json.loads((run_dir / "metrics.json").read_text())["model"] == toy
  assert not (run_dir / "checkpoints" / "pretrain").exists()  # no pre-training stage
  md = (tmp_path / "results" / "toy.md").read_text()
  assert f"| {toy} | " in md
