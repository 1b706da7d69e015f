"""SASS: two symmetric scenario-aware towers over ML-SAT (docs/design.md §1; Zhang et al., CIKM 2022).

User tower and item tower have the same structure and separate weights::

    e   = concat(field embeddings)                     [B, F*d]
    g_0 = h_0 = e;  (g_l, h_l) = MLSATLayer_l(g_{l-1}, h_{l-1}, z_k)   for l = 1..L
    r_k = normalize(W_o h_L + bias_net(z_k))           ('add'; 'concat' concatenates instead)

z_k is the scenario embedding, shared by both towers. Because the item tower is scenario-aware,
an item has a different vector in every scenario (``item_scenario='agnostic'``, an ablation: the
item tower runs scenario 0's path for every scenario, one vector per item; ``user_scenario``
likewise for the user tower). Scores are <r_u^k, r_i^k> / tau.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sass_jax.model.embedding import FieldEmbedder
from sass_jax.model.grouped import SCENARIO_COMPUTE, Groups, make_groups
from sass_jax.model.mlsat import GATE_STYLES, MLSATLayer, _dense, activation
from sass_jax.schema import FieldSpec

BIAS_MODES = ("add", "concat")  # config.model.bias_mode: scenario bias added or concatenated
# config.model.item_scenario / user_scenario (SASS's item / user tower)
ITEM_SCENARIO = ("specific", "agnostic")
PREFERENCE_INPUTS = ("own", "shared")  # config.model.preference_input (SASS's preference head)
SCORE_BIAS_DIMS = 2  # dimensions config.model.score_bias appends to every vector (SASSTower)


def unit_vectors(cfg, v: jnp.ndarray) -> jnp.ndarray:
  """The unit-vector part of a model's retrieval vectors: v [..., D] -> [..., D -
  SCORE_BIAS_DIMS] when ``cfg.score_bias`` (a ``ModelConfig``), else v unchanged (also for a
  cfg without the field)."""
  return v[..., :-SCORE_BIAS_DIMS] if getattr(cfg, "score_bias", False) else v


def retrieval_part(cfg, v: jnp.ndarray) -> jnp.ndarray:
  """A ranking vector's retrieval part: v [..., D + P] -> [..., D], P =
  ``cfg.preference_dim`` (v unchanged when P is 0 or the cfg has no such field)."""
  p = int(getattr(cfg, "preference_dim", 0) or 0)
  return v[..., :-p] if p else v


def l2_normalize(r: jnp.ndarray) -> jnp.ndarray:
  """r / ||r||_2 over the last axis (float32; the norm is floored at 1e-6)."""
  return r * jax.lax.rsqrt(jnp.maximum(jnp.sum(r * r, -1, keepdims=True), 1e-12))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static, hashable model hyper-parameters (built from ``config.model`` and the data)."""

  user_specs: tuple[FieldSpec, ...]
  item_specs: tuple[FieldSpec, ...]
  num_scenarios: int
  embed_dim: int = 16
  scenario_dim: int = 16
  widths: tuple[int, ...] = (256, 128)
  out_dim: int = 64
  activation: str = "relu"
  dropout: float = 0.0
  layer_norm: bool = False
  gate_style: str = "gated_sum"
  gate_per_scenario: bool = False
  bias_mode: str = "add"
  bias_hidden: int = 32
  # SASS's item tower: 'specific' (a vector per scenario) or 'agnostic' (scenario 0's path
  # for every scenario: one vector per item; an ablation)
  item_scenario: str = "specific"
  user_scenario: str = "specific"  # the same for the user tower (docs/design.md §1)
  # SASS: append [sqrt(tau) b, sqrt(tau)] (user) / [sqrt(tau), sqrt(tau) c] (item): D + 2
  score_bias: bool = False
  # SASS: a preference head of P dims beside the retrieval vector (docs/design.md §1): the
  # ranking vectors (rank_user / rank_item) append sqrt(tau) q, so <., .> / tau of them is
  # <r_u, r_i> / tau + <q_u, q_i>, the labelled BCE's logit and the score of AUC / GAUC;
  # retrieval (softmax, pre-training, top-K, export) uses r only. 0: off.
  preference_dim: int = 0
  # 'own': the head has its own field embeddings (the BCE leaves retrieval untouched);
  # 'shared': it reads the tower's last hidden layer (the BCE trains the tower too)
  preference_input: str = "own"
  preference_widths: tuple[int, ...] = (128, 64)  # the head's hidden layers (ReLU, dropout)
  preference_dropout: float = 0.2
  tau: float = 0.05
  vocab_pad_to: int = 8
  compute_dtype: str = "float32"
  # 'grouped': per-scenario layers do each row's own scenario only; 'onehot': all K, one kept
  # (sass_jax/model/grouped.py, sass_jax/model/mlsat.py). Same function, same parameters.
  scenario_compute: str = "grouped"
  # the training losses' in-batch softmax: 'blocked' (row tiles, loss and gradient in one pass,
  # no [B, B] array; sass_jax/train/inbatch.py) or 'dense' (sass_jax/train/losses.py)
  inbatch_softmax: str = "blocked"
  # Baselines (docs/design.md §3; sass_jax/model/baselines.py).
  tower_widths: tuple[int, ...] = (64,)  # per-scenario head of shared_bottom / mmoe / ple
  num_experts: int = 4  # mmoe experts; ple shared experts per layer
  num_scenario_experts: int = 2  # ple experts per scenario per layer
  separate_embeddings: bool = True  # dssm_single: one set of tables per scenario
  star_aux: bool = True  # star: auxiliary network added to the output
  star_momentum: float = 0.99  # star: running-statistics momentum

  @classmethod
  def from_config(
    cls,
    model_cfg,
    user_specs: Sequence[FieldSpec],
    item_specs: Sequence[FieldSpec],
    num_scenarios: int,
  ) -> "ModelConfig":
    """Build from an ml_collections ``config.model`` of any registered model (the baselines'
    fields take their defaults when the config lacks them).

    Raises ValueError on a bad shared value (compute_dtype, scenario_compute, inbatch_softmax,
    activation) or fewer than 1 scenario. A model's own settings (e.g. SASS's gate_style, PLE's experts) are
    checked by its ``config_problems``, which ``sass_jax.model.registry.build`` runs first.
    """
    if model_cfg.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(
        f"config.model.compute_dtype={model_cfg.compute_dtype!r}; expected 'float32' or 'bfloat16'"
      )
    compute = model_cfg.scenario_compute
    if compute not in SCENARIO_COMPUTE:
      raise ValueError(
        f"config.model.scenario_compute={compute!r}; expected one of {SCENARIO_COMPUTE}"
      )
    softmax = model_cfg.get("inbatch_softmax", "blocked")
    if softmax not in ("blocked", "dense"):
      raise ValueError(
        f"config.model.inbatch_softmax={softmax!r}; expected one of ('blocked', 'dense')"
      )
    if num_scenarios < 1:
      raise ValueError(f"the data has {num_scenarios} scenarios; need at least 1")
    activation(model_cfg.activation)
    extra = {
      k: model_cfg[k]
      for k in (
        "tower_widths",
        "num_experts",
        "num_scenario_experts",
        "separate_embeddings",
        "star_aux",
        "star_momentum",
      )
    }
    extra["tower_widths"] = tuple(int(w) for w in extra["tower_widths"])
    for k, typ in (
      ("num_experts", int),
      ("num_scenario_experts", int),
      ("separate_embeddings", bool),
      ("star_aux", bool),
      ("star_momentum", float),
    ):
      extra[k] = typ(extra[k])
    return cls(
      **extra,
      user_specs=tuple(user_specs),
      item_specs=tuple(item_specs),
      num_scenarios=int(num_scenarios),
      embed_dim=model_cfg.embed_dim,
      scenario_dim=model_cfg.scenario_dim,
      widths=tuple(model_cfg.widths),
      out_dim=model_cfg.out_dim,
      activation=model_cfg.activation,
      dropout=model_cfg.dropout,
      layer_norm=model_cfg.layer_norm,
      gate_style=model_cfg.gate_style,
      gate_per_scenario=model_cfg.gate_per_scenario,
      bias_mode=model_cfg.bias_mode,
      bias_hidden=model_cfg.bias_hidden,
      item_scenario=model_cfg.get("item_scenario", "specific"),
      user_scenario=model_cfg.get("user_scenario", "specific"),
      score_bias=bool(model_cfg.get("score_bias", False)),
      preference_dim=int(model_cfg.get("preference_dim", 0) or 0),
      preference_input=model_cfg.get("preference_input", "own"),
      preference_widths=tuple(model_cfg.get("preference_widths", (128, 64))),
      preference_dropout=float(model_cfg.get("preference_dropout", 0.2)),
      tau=model_cfg.tau,
      vocab_pad_to=model_cfg.vocab_pad_to,
      compute_dtype=model_cfg.compute_dtype,
      scenario_compute=compute,
      inbatch_softmax=softmax,
    )


class SASSTower(nn.Module):
  """One scenario-aware tower: field embeddings -> L ML-SAT layers -> output + scenario bias.

  Call ``(features, z, onehot, train)``:
    selected layout, 'onehot' compute: z ``[B, d_s]`` (each sample's scenario embedding),
      onehot ``[B, K]`` -> ``[B, D]`` float32, L2-normalised;
    selected layout, 'grouped' compute: z the table ``[K, d_s]``, onehot a ``grouped.Groups``
      of B * V rows (V scenarios per sample, row-major) -> ``[B, V, D]``;
    all-scenarios layout: z ``[1, K, d_s]``, onehot None -> ``[B, K, D]``, slice k the vectors
      in scenario k.
  D = out_dim ('add') or 2 * out_dim ('concat'), plus 2 with ``cfg.score_bias``: the user
  tower (``side='user'``) appends [sqrt(tau) b, sqrt(tau)], the item tower [sqrt(tau),
  sqrt(tau) c], b and c a zero-initialised linear function of the last hidden layer (one
  scalar per entity and scenario), so <r_u, r_i> / tau gains b_u + c_i. With
  ``cfg.preference_dim`` = P > 0 the tower then appends sqrt(tau) q ``[.., P]``, the
  preference head's output: q = W_q a + b_q, a = an MLP (``cfg.preference_widths``, ReLU,
  dropout ``cfg.preference_dropout``) of the head's own field embeddings
  (``preference_input='own'``) or of the last hidden layer h_L ('shared'); not scenario-aware.
  D + P in all (``SASS.rank_user``; ``SASS.encode_user`` strips it).
  """

  cfg: ModelConfig
  specs: Sequence[FieldSpec]
  side: str = "user"  # 'user' | 'item': where score_bias puts its scalar

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray], z, onehot, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    B = e.shape[0]
    grouped = isinstance(onehot, Groups)
    # 'grouped' compute, all scenarios: the layers run scenario-major ([K, B, d]: batched
    # matmuls over k with no layout transposes); the result is transposed once at the end
    major = onehot is None and c.scenario_compute == "grouped"
    if major:
      g, h = e[None], jnp.broadcast_to(e[None], (c.num_scenarios, B, e.shape[-1]))
    elif grouped:
      views = onehot.scenario.shape[0] // B
      g, h = e[:, None, :], jnp.broadcast_to(e[:, None, :], (B, views, e.shape[-1]))
    else:
      g = e if onehot is not None else e[:, None, :]
      h = (
        e
        if onehot is not None
        else jnp.broadcast_to(e[:, None, :], (B, c.num_scenarios, e.shape[-1]))
      )
    for l, width in enumerate(c.widths):
      g, h = MLSATLayer(
        width,
        c.num_scenarios,
        c.activation,
        c.gate_style,
        c.gate_per_scenario,
        c.dropout,
        c.layer_norm,
        dt,
        c.scenario_compute,
        major,
        name=f"mlsat_{l}",
      )(g, h, z, onehot, train)
    out = _dense(c.out_dim, dt, "out")(h)
    act = activation(c.activation)
    bias_net = lambda t: _dense(c.out_dim, dt, "bias_out")(
      act(_dense(c.bias_hidden, dt, "bias_hidden")(t))
    )
    if grouped or (c.scenario_compute == "grouped" and onehot is None):
      # once per scenario, on the [K, d_s] table, then placed
      ztab = z.reshape(-1, z.shape[-1]).astype(dt)
      bias = bias_net(ztab)  # [K, out_dim]
      bias = jnp.take(bias, onehot.scenario.reshape(B, -1), axis=0) if grouped else bias[:, None]
      bias = jnp.broadcast_to(bias, out.shape)
    else:
      bias = bias_net(jnp.broadcast_to(z, out.shape[:-1] + z.shape[-1:]).astype(dt))
    r = out + bias if c.bias_mode == "add" else jnp.concatenate([out, bias], -1)
    r = l2_normalize(r.astype(jnp.float32))
    if c.score_bias:
      b = nn.Dense(
        1,
        dtype=jnp.float32,
        name="score_bias",
        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp_in", "mlp_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp_out",)),
      )(h.astype(jnp.float32))
      one = jnp.ones_like(b)
      ext = [b, one] if self.side == "user" else [one, b]
      r = jnp.concatenate([r, *(jnp.sqrt(jnp.float32(c.tau)) * t for t in ext)], -1)
    if c.preference_dim:
      if c.preference_input == "own":
        # its own embeddings of the tower's fields: the labelled BCE trains none of the
        # retrieval parameters (the ranking vectors hold r under stop_gradient, SASS._rank)
        hq = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="preference_embed")(
          features
        ).astype(jnp.float32)  # [B, F*d]
        hq = hq if h.ndim == 2 else (hq[None] if major else hq[:, None, :])
      else:  # 'shared': the tower's last hidden layer (the BCE trains the whole tower)
        hq = h.astype(jnp.float32)
      for j, width in enumerate(c.preference_widths):
        hq = act(_dense(width, jnp.float32, f"preference_hidden_{j}")(hq))
        hq = nn.Dropout(c.preference_dropout, deterministic=not train)(hq)
      # the preference head's output q (P dims; its bias makes the bilinear score hold
      # per-user and per-item offsets too), scaled so that
      # <sqrt(tau) q_u, sqrt(tau) q_i> / tau = <q_u, q_i>
      q = nn.Dense(
        c.preference_dim,
        dtype=jnp.float32,
        name="preference",
        kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("mlp_in", "mlp_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp_out",)),
      )(hq)
      # 'own' computes the head once per entity; placed in r's layout only now
      q = jnp.broadcast_to(q, r.shape[:-1] + q.shape[-1:])
      r = jnp.concatenate([r, jnp.sqrt(jnp.float32(c.tau)) * q], -1)
    return jnp.swapaxes(r, 0, 1) if major else r  # [K, B, D] -> [B, K, D]


class SASS(nn.Module):
  """The two-tower SASS model. Use through ``apply(..., method=...)``:

  - ``encode_user(features, scenario)`` / ``encode_item(features, scenario)``: scenario int32
    ``[B]`` -> ``[B, D]``; scenario None -> ``[B, K, D]`` (every scenario's vector); scenario
    int32 ``[B, V]`` -> ``[B, V, D]`` (V chosen scenarios per sample; 'grouped' compute only,
    ``encodes_views``), equal to the all-scenarios vectors taken at those scenarios.
  - ``rank_user`` / ``rank_item``: the same layouts, with the preference head appended (width
    D + ``cfg.preference_dim``; ``protocol.RANK_METHODS``): the vectors of the ranking score.
  - ``__call__(user_features, item_features, scenario)`` -> (user ``[B, D]``, item ``[B, D]``),
    used for ``init``.
  Parameters: ``scenario_embedding`` ``[K, d_s]`` (shared), ``user_tower``, ``item_tower``.
  """

  cfg: ModelConfig
  encodes_views = True  # accepts scenario [B, V] when cfg.scenario_compute == 'grouped'

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """SASS's own settings of ``config.model`` (``gate_style``, ``bias_mode``): one line per
    bad value, naming the field and what to set; [] when they are fine."""
    out = []
    gate = model_cfg.get("gate_style")
    if gate is not None and gate not in GATE_STYLES:
      out.append(f"config.model.gate_style={gate!r}: expected one of {GATE_STYLES}")
    bias = model_cfg.get("bias_mode")
    if bias is not None and bias not in BIAS_MODES:
      out.append(f"config.model.bias_mode={bias!r}: expected one of {BIAS_MODES}")
    for key in ("item_scenario", "user_scenario"):
      value = model_cfg.get(key)
      if value is not None and value not in ITEM_SCENARIO:
        out.append(f"config.model.{key}={value!r}: expected one of {ITEM_SCENARIO}")
    value = model_cfg.get("preference_input")
    if value is not None and value not in PREFERENCE_INPUTS:
      out.append(f"config.model.preference_input={value!r}: expected one of {PREFERENCE_INPUTS}")
    value = model_cfg.get("preference_widths")
    if value is not None and not all(
      isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in tuple(value)
    ):
      out.append(
        f"config.model.preference_widths={tuple(value)}: expected positive ints, e.g. (128, 64)"
      )
    value = model_cfg.get("preference_dropout")
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
      out.append(f"config.model.preference_dropout={value!r}: expected a rate in [0, 1)")
    return out

  def setup(self):
    c = self.cfg
    self.scenario_embedding = self.param(
      "scenario_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.1), ("scenario", "embed")),
      (c.num_scenarios, c.scenario_dim),
      jnp.float32,
    )
    self.user_tower = SASSTower(c, c.user_specs, "user")
    self.item_tower = SASSTower(c, c.item_specs, "item")

  def _encode(self, tower, features, scenario, train):
    c = self.cfg
    if scenario is None:
      return tower(features, self.scenario_embedding[None], None, train)
    scenario = jnp.asarray(scenario, jnp.int32)
    if c.scenario_compute == "grouped":
      if scenario.ndim not in (1, 2):
        raise ValueError(f"scenario must be int32 [B] or [B, V], got shape {scenario.shape}")
      r = tower(
        features, self.scenario_embedding, make_groups(scenario.reshape(-1), c.num_scenarios), train
      )  # [B, V, D]
      return r[:, 0] if scenario.ndim == 1 else r
    if scenario.ndim != 1:
      raise ValueError(
        "scenario [B, V] needs config.model.scenario_compute='grouped'; got "
        f"shape {scenario.shape} with 'onehot'"
      )
    onehot = jax.nn.one_hot(scenario, c.num_scenarios, dtype=jnp.float32)
    return tower(features, onehot @ self.scenario_embedding, onehot, train)

  def _encode_agnostic(self, tower, features, scenario, train):
    """One vector per entity: scenario 0's path for every scenario, placed in the asked layout
    ([B, D] for scenario [B], [B, V, D] for [B, V], [B, K, D] for None), so every layout holds
    the same vectors (``item_scenario`` / ``user_scenario`` = 'agnostic', an ablation)."""
    B = jax.tree_util.tree_leaves(features)[0].shape[0]
    r = self._encode(tower, features, jnp.zeros((B,), jnp.int32), train)  # [B, D]
    if scenario is None:
      return jnp.broadcast_to(r[:, None], (B, self.cfg.num_scenarios, r.shape[-1]))
    scenario = jnp.asarray(scenario)
    return r if scenario.ndim == 1 else jnp.broadcast_to(r[:, None], scenario.shape + r.shape[-1:])

  def _full(self, side, features, scenario, train):
    tower = self.user_tower if side == "user" else self.item_tower
    if getattr(self.cfg, f"{side}_scenario") == "agnostic":
      return self._encode_agnostic(tower, features, scenario, train)
    return self._encode(tower, features, scenario, train)

  def _rank(self, side, features, scenario, train):
    v = self._full(side, features, scenario, train)
    p = self.cfg.preference_dim
    if p and self.cfg.preference_input == "own":
      # the retrieval part scores as it is but is not trained by what scores the ranking
      # vectors (the labelled BCE): retrieval stays exactly the softmax's
      v = jnp.concatenate([jax.lax.stop_gradient(v[..., :-p]), v[..., -p:]], -1)
    return v

  def rank_user(self, features, scenario=None, train: bool = False):
    """The user's ranking vectors: ``encode_user``'s layouts, width D + P with the preference
    head (``cfg.preference_dim`` = P; equal to ``encode_user`` when P = 0). <rank_user,
    rank_item> / tau is the score of a labelled exposure (the labelled BCE, AUC, GAUC)."""
    return self._rank("user", features, scenario, train)

  def rank_item(self, features, scenario=None, train: bool = False):
    """The item's ranking vectors (``rank_user``'s counterpart)."""
    return self._rank("item", features, scenario, train)

  def encode_user(self, features, scenario=None, train: bool = False):
    return retrieval_part(self.cfg, self._full("user", features, scenario, train))

  def encode_item(self, features, scenario=None, train: bool = False):
    return retrieval_part(self.cfg, self._full("item", features, scenario, train))

  def __call__(self, user_features, item_features, scenario, train: bool = False):
    return (
      self.encode_user(user_features, scenario, train),
      self.encode_item(item_features, scenario, train),
    )
