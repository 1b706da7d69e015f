"""Baselines behind the same two-tower interface as SASS (SPEC section 3).

Every model exposes ``encode_user(features, scenario=None, train=False)`` and
``encode_item(...)``: scenario int32 [B] -> [B, D]; None -> [B, K, D] (every scenario's vector),
so the steps, the losses and the evaluation never branch on the model type.

- ``DSSMMixed`` (DSSM-M): one plain MLP tower per side trained on the mixed data of all
  scenarios; it ignores the scenario, so its K vectors of an entity are identical.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sass_jax.data.store import FieldSpec
from sass_jax.model.embedding import FieldEmbedder
from sass_jax.model.mlsat import _dense, activation
from sass_jax.model.towers import ModelConfig, l2_normalize


class MLPTower(nn.Module):
  """Field embeddings -> MLP (config widths, activation, dropout) -> out_dim, L2-normalised.

  Returns float32 [B, D]; scenario-agnostic.
  """
  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    h = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    act = activation(c.activation)
    for l, width in enumerate(c.widths):
      h = act(_dense(width, dt, f"dense_{l}")(h))
      if c.dropout > 0:
        h = nn.Dropout(c.dropout)(h, deterministic=not train)
    return l2_normalize(_dense(c.out_dim, dt, "out")(h).astype(jnp.float32))


class DSSMMixed(nn.Module):
  """DSSM-M: a user MLP tower and an item MLP tower shared by all scenarios (SPEC section 3)."""
  cfg: ModelConfig

  def setup(self):
    self.user_tower = MLPTower(self.cfg, self.cfg.user_specs)
    self.item_tower = MLPTower(self.cfg, self.cfg.item_specs)

  def _out(self, r, scenario):
    if scenario is None:
      return jnp.broadcast_to(r[:, None, :], (r.shape[0], self.cfg.num_scenarios, r.shape[-1]))
    return r

  def encode_user(self, features, scenario=None, train: bool = False):
    return self._out(self.user_tower(features, train), scenario)

  def encode_item(self, features, scenario=None, train: bool = False):
    return self._out(self.item_tower(features, train), scenario)

  def __call__(self, user_features, item_features, scenario, train: bool = False):
    return (self.encode_user(user_features, scenario, train),
            self.encode_item(item_features, scenario, train))
