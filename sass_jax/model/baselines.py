"""Baselines behind the same two-tower interface as SASS (docs/design.md §3).

Every model implements ``sass_jax.model.protocol.TwoTowerModel`` (``encode_user`` /
``encode_item`` in the selected and all-scenarios layouts, ``config_problems`` for its own
settings) and is registered in ``sass_jax.model.registry``. The steps, the losses and the
evaluation never branch on the model type. Every model puts the same structure in both towers
(separate weights), so each yields a scenario-specific user *and* item vector wherever its
design allows (all but DSSM-M).

- ``DSSMMixed`` (``dssm_mixed``, DSSM-M): one plain MLP tower per side trained on the mixed
  data of all scenarios; it ignores the scenario, so its K vectors of an entity are identical.
- ``DSSMSingle`` (``dssm_single``, DSSM-S): K independent two-tower models, one per scenario
  (docs/design.md §3: "one tower pair per scenario"): K sets of MLP weights and, by default
  (``config.model.separate_embeddings=True``), K sets of embedding tables too.
- ``SharedBottom`` (``shared_bottom``): a shared bottom MLP (``widths``) and one head MLP per
  scenario (``tower_widths`` then ``out_dim``).
- ``MMoE`` (``mmoe``; Ma et al., KDD 2018): ``num_experts`` shared expert MLPs (``widths``),
  one softmax gate per scenario over the experts, one head per scenario.
- ``PLE`` (``ple``; Tang et al., RecSys 2020): ``len(widths)`` extraction layers (one layer = CGC);
  layer l has ``num_experts`` shared experts and ``num_scenario_experts`` experts per scenario,
  each one dense layer of width ``widths[l]``; scenario k's gate mixes the shared experts and
  scenario k's experts, the shared gate (every layer but the last) mixes all experts; one head
  per scenario.
- ``STAR`` (``star``; Sheng et al., CIKM 2021): partitioned normalisation of the embeddings,
  then a star-topology FCN where scenario k's layer has weight ``W * W_k`` and bias ``b + b_k``
  (``widths`` hidden layers with activation, then ``out_dim`` with *no* activation), plus an
  optional auxiliary network (``star_aux``) of the scenario embedding and the embeddings whose
  output is added to the FCN output.

Per-scenario and per-expert weights are stacked (``[K, d_in, d_out]``, ``[E, d_in, d_out]``,
``[K, E_k, d_in, d_out]``) and applied with einsums; there is no Python loop over scenarios.
The selected layout (scenario ``[B]``) depends on ``config.model.scenario_compute``: 'grouped'
(default) applies each row's own scenario's weights only (``grouped.grouped_dense``: the
per-scenario heads, DSSM-S's MLP and tables, MMoE's gates, PLE's last extraction layer, STAR's
layers); 'onehot' (the earlier formulation) computes the all-scenarios layout ``[B, K, D]`` and
gathers each row's slice. Both give the same vectors (up to float rounding) from the same
parameters. PLE's shared gate mixes every scenario's experts, so its layers before the last
need all K scenario paths in either formulation.

Logical axes: embedding tables ('vocab', 'embed'); shared dense ('mlp_in', 'mlp_out');
per-scenario stacks ('scenario', ...); expert stacks ('expert', ...) -- every axis but 'vocab'
is replicated by ``sass_jax.partition.RULES``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sass_jax.model import mixed
from sass_jax.model.embedding import FieldEmbedder, padded_rows
from sass_jax.model.grouped import Groups, grouped_dense, make_groups
from sass_jax.model.mlsat import _dense, activation
from sass_jax.model.towers import ModelConfig, l2_normalize
from sass_jax.schema import FieldSpec


# ----------------------------------------------------------------------------------------------
# helpers


def _stacked_kernel(
  module: nn.Module,
  name: str,
  lead: tuple[int, ...],
  lead_axes: tuple[str, ...],
  d_in: int,
  d_out: int,
):
  """A kernel ``[*lead, d_in, d_out]`` (float32, fan-in scaled per stacked matrix) and a bias
  ``[*lead, d_out]`` (zeros), with logical axes ``(*lead_axes, 'mlp_in', 'mlp_out')``."""
  init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=tuple(range(len(lead)))
  )
  w = module.param(
    f"{name}_kernel",
    nn.with_logical_partitioning(init, (*lead_axes, "mlp_in", "mlp_out")),
    (*lead, d_in, d_out),
    jnp.float32,
  )
  b = module.param(
    f"{name}_bias",
    nn.with_logical_partitioning(nn.initializers.zeros_init(), (*lead_axes, "mlp_out")),
    (*lead, d_out),
    jnp.float32,
  )
  return w, b


def _select(out_all: jnp.ndarray, scenario) -> jnp.ndarray:
  """``[B, K, D]`` -> ``[B, D]`` (row b's slice ``scenario[b]``); unchanged if scenario is None."""
  if scenario is None:
    return out_all
  idx = jnp.asarray(scenario, jnp.int32)[:, None, None]
  return jnp.take_along_axis(out_all, idx, axis=1)[:, 0]


def _check_scenario(scenario, batch: int):
  if scenario is not None and (jnp.ndim(scenario) != 1 or scenario.shape[0] != batch):
    raise ValueError(f"scenario must be int32 [B={batch}] or None, got shape {jnp.shape(scenario)}")


def _int_at_least_1(model_cfg, key: str, what: str) -> list[str]:
  """[one problem line] when ``config.model.<key>`` is set and is not an int >= 1, else []."""
  v = model_cfg.get(key)
  if v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
    return []
  return [f"config.model.{key}={v!r}: expected an int >= 1 ({what})"]


def _tower_widths_problems(model_cfg) -> list[str]:
  """[one problem line] when ``config.model.tower_widths`` holds a value that is not an int >= 1."""
  v = model_cfg.get("tower_widths")
  if v is None:
    return []
  tw = tuple(v) if isinstance(v, (tuple, list)) else (v,)
  if all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in tw):
    return []
  return [
    f"config.model.tower_widths={tw}: expected positive ints (hidden widths of the "
    "per-scenario heads), e.g. (64,)"
  ]


def _groups(cfg: ModelConfig, scenario) -> Groups | None:
  """The rows' tile layout for the 'grouped' selected layout; None for the all-scenarios layout
  or the 'onehot' compute."""
  if scenario is None or cfg.scenario_compute != "grouped":
    return None
  return make_groups(jnp.asarray(scenario, jnp.int32), cfg.num_scenarios)


class _ScenarioMLP(nn.Module):
  """One MLP per scenario, weights stacked ``[K, d_in, d_out]``: hidden ``widths`` with
  activation (and dropout), then ``out_dim`` without.

  Call ``(x, train)``: x ``[B, d]`` (the same input for every scenario) or ``[B, K, d]`` (slice
  k for scenario k) -> ``[B, K, out_dim]`` in ``dtype``. ``(x, train, groups)`` with a
  ``grouped.Groups`` of the B rows: x ``[B, d]`` -> ``[B, out_dim]``, row b through its own
  scenario's MLP only.
  """

  widths: Sequence[int]
  out_dim: int
  num_scenarios: int
  act: str = "relu"
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jnp.ndarray, train: bool = False, groups: Groups | None = None
  ) -> jnp.ndarray:
    act = activation(self.act)
    K = self.num_scenarios
    x = x.astype(self.dtype)
    dims = list(self.widths) + [self.out_dim]
    for l, width in enumerate(dims):
      w, b = _stacked_kernel(
        self,
        f"dense_{l}" if l < len(self.widths) else "out",
        (K,),
        ("scenario",),
        x.shape[-1],
        width,
      )
      w, b = w.astype(self.dtype), b.astype(self.dtype)
      if groups is not None:
        x = grouped_dense(x, w, b, groups)
      else:
        x = (
          mixed.einsum("bi,kio->bko", x, w) if x.ndim == 2 else mixed.einsum("bki,kio->bko", x, w)
        ) + b
      if l < len(self.widths):
        x = act(x)
        if self.dropout > 0:
          x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x


def _mlp(x, widths, act, dropout, dtype, prefix, train):
  """Shared MLP (``_dense`` layers named ``{prefix}_{l}``) with activation and dropout."""
  for l, width in enumerate(widths):
    x = act(_dense(width, dtype, f"{prefix}_{l}")(x))
    if dropout > 0:
      x = nn.Dropout(dropout)(x, deterministic=not train)
  return x


class _TwoTowerBase(nn.Module):
  """Two towers of the same structure (``_make_tower``) with separate weights.

  ``encode_user`` / ``encode_item``: ``(features, scenario=None, train=False)`` -> float32
  ``[B, D]`` (scenario int32 ``[B]``) or ``[B, K, D]`` (scenario None), L2-normalised.
  """

  cfg: ModelConfig

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """The model's own settings of ``config.model``: one line per bad value; [] here (a model
    with settings of its own overrides it)."""
    return []

  def _make_tower(self, specs: Sequence[FieldSpec]) -> nn.Module:
    raise NotImplementedError

  def setup(self):
    self.user_tower = self._make_tower(self.cfg.user_specs)
    self.item_tower = self._make_tower(self.cfg.item_specs)

  def encode_user(self, features, scenario=None, train: bool = False):
    return self.user_tower(features, scenario, train)

  def encode_item(self, features, scenario=None, train: bool = False):
    return self.item_tower(features, scenario, train)

  def __call__(self, user_features, item_features, scenario, train: bool = False):
    return (
      self.encode_user(user_features, scenario, train),
      self.encode_item(item_features, scenario, train),
    )


# ----------------------------------------------------------------------------------------------
# DSSM-M


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
  """DSSM-M: a user MLP tower and an item MLP tower shared by all scenarios (docs/design.md §3)."""

  cfg: ModelConfig

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """DSSM-M has no settings of its own: []."""
    return []

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
    return (
      self.encode_user(user_features, scenario, train),
      self.encode_item(item_features, scenario, train),
    )


# ----------------------------------------------------------------------------------------------
# DSSM-S


def scenario_field_ids(
  features: Mapping[str, jnp.ndarray],
  specs: Sequence[FieldSpec],
  num_scenarios: int,
  pad_to: int,
  scenario=None,
):
  """Ids into K independent sets of embedding tables stored as one table per field.

  Field f's table gets ``K * R`` rows (R = ``padded_rows(vocab_size, pad_to)``); scenario k's
  table is rows ``[k R, (k + 1) R)``. Returns ``(specs_k, shifted)``: FieldSpecs with
  ``vocab_size = K * R`` and features whose ids gain a scenario axis, ``[B, K]`` (single) or
  ``[B, K, L]`` with the mask broadcast to ``[B, K, L]`` (multi-hot), so a ``FieldEmbedder``
  over them returns ``[B, K, F * d]`` (slice k from scenario k's tables) with one gather per
  field, and each table keeps the logical axes ('vocab', 'embed'). With ``scenario`` (int
  ``[B]``) only each row's own scenario's ids: ``[B]`` / ``[B, L]`` (mask unchanged), so the
  embedder returns ``[B, F * d]``. Raises KeyError naming a missing field.
  """
  K = num_scenarios
  specs_k, shifted = [], {}
  for s in specs:
    if s.name not in features:
      raise KeyError(f"feature {s.name!r} missing from the batch (have {sorted(features)})")
    rows = padded_rows(s.vocab_size, pad_to)
    specs_k.append(dataclasses.replace(s, vocab_size=K * rows))
    ids = jnp.asarray(features[s.name], jnp.int32)
    if scenario is not None:
      off = jnp.asarray(scenario, jnp.int32) * rows  # [B]
      shifted[s.name] = ids + (off[:, None] if s.multi_hot else off)
      if s.multi_hot:
        shifted[f"{s.name}_mask"] = jnp.asarray(features[f"{s.name}_mask"])
      continue
    off = jnp.arange(K, dtype=jnp.int32) * rows
    if s.multi_hot:
      shifted[s.name] = ids[:, None, :] + off[None, :, None]  # [B, K, L]
      m = jnp.asarray(features[f"{s.name}_mask"])
      shifted[f"{s.name}_mask"] = jnp.broadcast_to(m[:, None, :], shifted[s.name].shape)
    else:
      shifted[s.name] = ids[:, None] + off[None, :]  # [B, K]
  return tuple(specs_k), shifted


class DSSMSingleTower(nn.Module):
  """K independent MLP towers (one per scenario), weights stacked ``[K, ...]``.

  Call ``(features, scenario, train)`` -> float32 ``[B, D]`` or ``[B, K, D]``. Slice k depends
  only on scenario k's weights (and, with ``separate_embeddings``, its embedding rows).
  """

  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, scenario=None, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    groups = _groups(c, scenario)
    if c.separate_embeddings:
      specs, ids = scenario_field_ids(
        features,
        self.specs,
        c.num_scenarios,
        c.vocab_pad_to,
        scenario if groups is not None else None,
      )
      e = FieldEmbedder(specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(ids)  # [B,(K,)F*d]
    else:
      e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    _check_scenario(scenario, e.shape[0])
    out = _ScenarioMLP(
      c.widths, c.out_dim, c.num_scenarios, c.activation, c.dropout, dt, name="mlp"
    )(e, train, groups)
    out = l2_normalize(out.astype(jnp.float32))
    return out if groups is not None else _select(out, scenario)


class DSSMSingle(_TwoTowerBase):
  """DSSM-S: one independent two-tower model per scenario (docs/design.md §3).

  Parameters: ``user_tower`` / ``item_tower``, each with ``embed`` (K sets of tables when
  ``separate_embeddings``, else one shared set) and ``mlp`` (``dense_l_kernel [K, d_in, d_out]``
  ..., ``out_kernel``). Changing scenario k's slice changes only scenario k's vectors.
  """

  def _make_tower(self, specs):
    return DSSMSingleTower(self.cfg, specs)


# ----------------------------------------------------------------------------------------------
# Shared-Bottom, MMoE, PLE


class SharedBottomTower(nn.Module):
  """Embeddings -> shared bottom MLP (``widths``) -> one head per scenario (``tower_widths``,
  ``out_dim``). Call ``(features, scenario, train)`` -> float32 ``[B, D]`` or ``[B, K, D]``."""

  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, scenario=None, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    _check_scenario(scenario, e.shape[0])
    h = _mlp(e, c.widths, activation(c.activation), c.dropout, dt, "bottom", train)  # [B, w]
    groups = _groups(c, scenario)
    out = _ScenarioMLP(
      c.tower_widths, c.out_dim, c.num_scenarios, c.activation, c.dropout, dt, name="head"
    )(h, train, groups)  # [B, (K,) D]
    out = l2_normalize(out.astype(jnp.float32))
    return out if groups is not None else _select(out, scenario)


class SharedBottom(_TwoTowerBase):
  """Shared-Bottom: a shared bottom MLP and one head per scenario in each tower (docs/design.md §3)."""

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """Problems with ``tower_widths``, one line each."""
    return _tower_widths_problems(model_cfg)

  def _make_tower(self, specs):
    return SharedBottomTower(self.cfg, specs)


class MMoETower(nn.Module):
  """Embeddings e ``[B, F*d]`` -> E expert MLPs (``widths``; stacked ``[E, d_in, d_out]``) ->
  per-scenario softmax gates ``softmax(e W_g^k + b_g^k)`` ``[B, K, E]`` -> mixtures ``[B, K, w]``
  -> one head per scenario. Call ``(features, scenario, train)`` -> ``[B, D]`` or ``[B, K, D]``."""

  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, scenario=None, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    act = activation(c.activation)
    E, K = c.num_experts, c.num_scenarios
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    _check_scenario(scenario, e.shape[0])
    x = e
    for l, width in enumerate(c.widths):
      w, b = _stacked_kernel(self, f"expert_{l}", (E,), ("expert",), x.shape[-1], width)
      w, b = w.astype(dt), b.astype(dt)
      x = act(
        (mixed.einsum("bi,eio->beo", x, w) if x.ndim == 2 else mixed.einsum("bei,eio->beo", x, w))
        + b
      )
      if c.dropout > 0:
        x = nn.Dropout(c.dropout)(x, deterministic=not train)
    if x.ndim == 2:  # no expert layers: every expert is the identity
      x = jnp.broadcast_to(x[:, None, :], (x.shape[0], E, x.shape[-1]))
    gw, gb = _stacked_kernel(self, "gate", (K,), ("scenario",), e.shape[-1], E)
    groups = _groups(c, scenario)
    if groups is not None:  # each row's own scenario: gate [B, E], mixture [B, w], head
      gates = jax.nn.softmax(
        grouped_dense(e, gw.astype(dt), gb.astype(dt), groups).astype(jnp.float32), axis=-1
      )
      mixture = mixed.einsum("be,bew->bw", gates.astype(dt), x)
      out = _ScenarioMLP(c.tower_widths, c.out_dim, K, c.activation, c.dropout, dt, name="head")(
        mixture, train, groups
      )
      return l2_normalize(out.astype(jnp.float32))
    gates = jax.nn.softmax(
      (mixed.einsum("bi,kie->bke", e, gw.astype(dt)) + gb.astype(dt)).astype(jnp.float32), axis=-1
    )  # [B, K, E]
    mixture = mixed.einsum("bke,bew->bkw", gates.astype(dt), x)  # [B, K, w]
    out = _ScenarioMLP(c.tower_widths, c.out_dim, K, c.activation, c.dropout, dt, name="head")(
      mixture, train
    )
    return _select(l2_normalize(out.astype(jnp.float32)), scenario)


class MMoE(_TwoTowerBase):
  """MMoE with scenarios as tasks: shared experts, per-scenario gates and heads (docs/design.md §3)."""

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """Problems with ``tower_widths`` and ``num_experts``, one line each."""
    return _tower_widths_problems(model_cfg) + _int_at_least_1(
      model_cfg, "num_experts", "MMoE's shared experts"
    )

  def _make_tower(self, specs):
    return MMoETower(self.cfg, specs)


class PLETower(nn.Module):
  """Progressive Layered Extraction with scenarios as tasks.

  Layer l (width w = ``widths[l]``), inputs the shared path ``s [B, d]`` and the scenario paths
  ``t [B, K, d]`` (both e at l = 0)::

    S   = act(s W_S + b_S)                     [B, Es, w]      shared experts
    P_k = act(t_k W_{P,k} + b_{P,k})           [B, K, Ek, w]   scenario k's experts
    t_k <- softmax(t_k G_k) . [S ; P_k]        [B, K, w]       scenario k's gate
    s   <- softmax(s G_s) . [S ; P_1..P_K]     [B, w]          shared gate (not at the last layer)

  then one head per scenario on t. Call ``(features, scenario, train)`` -> ``[B, D]`` or
  ``[B, K, D]``. Raises ValueError if ``widths`` is empty.
  """

  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, scenario=None, train: bool = False):
    c = self.cfg
    if not c.widths:
      raise ValueError("config.model.widths must name at least one PLE extraction layer")
    dt = jnp.dtype(c.compute_dtype)
    act = activation(c.activation)
    Es, Ek, K = c.num_experts, c.num_scenario_experts, c.num_scenarios
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    _check_scenario(scenario, e.shape[0])
    B = e.shape[0]
    s, t = e, None  # t None: every scenario path still equals e
    L = len(c.widths)
    groups = _groups(c, scenario)
    for l, width in enumerate(c.widths):
      d = s.shape[-1]
      sw, sb = _stacked_kernel(self, f"shared_expert_{l}", (Es,), ("expert",), d, width)
      S = act(mixed.einsum("bi,eio->beo", s, sw.astype(dt)) + sb.astype(dt))  # [B,Es,w]
      pw, pb = _stacked_kernel(
        self, f"scenario_expert_{l}", (K, Ek), ("scenario", "expert"), d, width
      )
      if groups is not None and l == L - 1:
        # last layer, selected: only each row's own scenario path (no shared gate follows)
        tin = e if t is None else _select(t, scenario)  # [B, d]
        kw = jnp.transpose(pw, (0, 2, 1, 3)).reshape(K, d, Ek * width).astype(dt)
        P = act(
          grouped_dense(tin, kw, pb.reshape(K, Ek * width).astype(dt), groups).reshape(B, Ek, width)
        )  # [B,Ek,w]
        gw, gb = _stacked_kernel(self, f"scenario_gate_{l}", (K,), ("scenario",), d, Es + Ek)
        g = jax.nn.softmax(
          grouped_dense(tin, gw.astype(dt), gb.astype(dt), groups).astype(jnp.float32), -1
        ).astype(dt)  # [B,Es+Ek]
        t = mixed.einsum("be,bew->bw", g[..., :Es], S) + mixed.einsum("be,bew->bw", g[..., Es:], P)
        if c.dropout > 0:
          t = nn.Dropout(c.dropout)(t, deterministic=not train)
        break
      tin = e if t is None else t
      P = act(
        (
          mixed.einsum("bi,keio->bkeo", tin, pw.astype(dt))
          if t is None
          else mixed.einsum("bki,keio->bkeo", tin, pw.astype(dt))
        )
        + pb.astype(dt)
      )  # [B,K,Ek,w]
      gw, gb = _stacked_kernel(self, f"scenario_gate_{l}", (K,), ("scenario",), d, Es + Ek)
      logits = (
        mixed.einsum("bi,kio->bko", tin, gw.astype(dt))
        if t is None
        else mixed.einsum("bki,kio->bko", tin, gw.astype(dt))
      ) + gb.astype(dt)
      g = jax.nn.softmax(logits.astype(jnp.float32), -1).astype(dt)  # [B,K,Es+Ek]
      t_new = mixed.einsum("bke,bew->bkw", g[..., :Es], S) + mixed.einsum(
        "bke,bkew->bkw", g[..., Es:], P
      )
      if l < L - 1:
        gs = jax.nn.softmax(
          _dense(Es + K * Ek, dt, f"shared_gate_{l}")(s).astype(jnp.float32), -1
        ).astype(dt)  # [B,Es+K*Ek]
        experts = jnp.concatenate([S, P.reshape(B, K * Ek, width)], axis=1)
        s = mixed.einsum("be,bew->bw", gs, experts)
        if c.dropout > 0:
          s = nn.Dropout(c.dropout)(s, deterministic=not train)
      t = t_new
      if c.dropout > 0:
        t = nn.Dropout(c.dropout)(t, deterministic=not train)
    out = _ScenarioMLP(c.tower_widths, c.out_dim, K, c.activation, c.dropout, dt, name="head")(
      t, train, groups
    )
    out = l2_normalize(out.astype(jnp.float32))
    return out if groups is not None else _select(out, scenario)


class PLE(_TwoTowerBase):
  """PLE (CGC when ``widths`` has one entry) with scenarios as tasks (docs/design.md §3)."""

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """Problems with ``tower_widths``, ``num_experts``, ``num_scenario_experts`` and an empty
    ``widths`` (no extraction layer), one line each."""
    out = (
      _tower_widths_problems(model_cfg)
      + _int_at_least_1(model_cfg, "num_experts", "PLE's shared experts per layer")
      + _int_at_least_1(model_cfg, "num_scenario_experts", "PLE's experts per scenario per layer")
    )
    if not tuple(model_cfg.widths):
      out.append("config.model.widths=(); ple needs at least one extraction layer width")
    return out

  def _make_tower(self, specs):
    return PLETower(self.cfg, specs)


# ----------------------------------------------------------------------------------------------
# STAR


class PartitionedNorm(nn.Module):
  """STAR's partitioned normalisation (Sheng et al., CIKM 2021, section 4.2)::

    x' = (gamma * gamma_k) * (x - mu_k) / sqrt(var_k + eps) + (beta + beta_k)

  gamma, beta ``[d]`` shared; gamma_k, beta_k ``[K, d]`` per scenario (init 1 / 0). Running
  statistics per scenario live in the ``'batch_stats'`` collection: ``mean``, ``var``
  float32 ``[K, d]`` (init 0 / 1).

  Call ``(x, scenario, train)``, x ``[B, d]`` (or ``[B, K, d]`` with scenario None):

  - selected layout (scenario int32 ``[B]``) -> ``[B, d]``. Training: row b is normalised with
    the moments (biased variance) of the batch rows of *its* scenario (masked moments); the
    running statistics of every scenario present in the batch are updated,
    ``stat_k <- m * stat_k + (1 - m) * batch_stat_k``; absent scenarios keep theirs.
    Evaluation: row b uses its scenario's running statistics.
  - all-scenarios layout (scenario None) -> ``[B, K, d]``. Training: slice k is normalised with
    the moments of all B rows of slice k (the batch is read as every row seen in every
    scenario, which is what this layout computes) and scenario k's running statistics are
    updated with those moments, for every k. Updating is required for soundness: the
    fine-tuning loss calls the item tower only in this layout (and scenario-view pre-training
    both towers), so without it those towers would be evaluated with statistics they never saw
    in training. Evaluation: slice k uses scenario k's running statistics, so the two layouts
    agree exactly at evaluation.

  Nothing is updated while initialising. Statistics are computed in float32; returns ``dtype``.
  """

  num_scenarios: int
  momentum: float = 0.99
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, scenario=None, train: bool = False) -> jnp.ndarray:
    K, d = self.num_scenarios, x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((K, d), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((K, d), jnp.float32))
    ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
    shared, per_k = ("mlp_out",), ("scenario", "mlp_out")
    gamma = self.param("scale", nn.with_logical_partitioning(ones, shared), (d,), jnp.float32)
    beta = self.param("bias", nn.with_logical_partitioning(zeros, shared), (d,), jnp.float32)
    gamma_k = self.param(
      "scenario_scale", nn.with_logical_partitioning(ones, per_k), (K, d), jnp.float32
    )
    beta_k = self.param(
      "scenario_bias", nn.with_logical_partitioning(zeros, per_k), (K, d), jnp.float32
    )
    update = train and not self.is_initializing()
    m = self.momentum
    xf = x.astype(jnp.float32)
    if scenario is None:
      if train:
        mu = jnp.mean(xf, axis=0)  # [d] or [K, d]
        var = jnp.mean(jnp.square(xf - mu), axis=0)
        mu, var = jnp.broadcast_to(mu, (K, d)), jnp.broadcast_to(var, (K, d))
        if update:
          ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mu)
          ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
      else:
        mu, var = ra_mean.value, ra_var.value
      xk = xf[:, None, :] if xf.ndim == 2 else xf  # [B, 1 or K, d]
      y = (xk - mu) * jax.lax.rsqrt(var + self.eps) * (gamma * gamma_k) + (beta + beta_k)
      return y.astype(self.dtype)
    scenario = jnp.asarray(scenario, jnp.int32)
    if train:
      onehot = jax.nn.one_hot(scenario, K, dtype=jnp.float32)  # [B, K]
      n = onehot.sum(0)  # [K]
      denom = jnp.maximum(n, 1.0)[:, None]
      mu = (onehot.T @ xf) / denom  # [K, d]
      var = (onehot.T @ jnp.square(xf - mu[scenario])) / denom
      if update:
        present = (n > 0)[:, None]
        ra_mean.value = jnp.where(
          present, m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mu), ra_mean.value
        )
        ra_var.value = jnp.where(
          present, m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var), ra_var.value
        )
    else:
      mu, var = ra_mean.value, ra_var.value
    y = (xf - mu[scenario]) * jax.lax.rsqrt(var[scenario] + self.eps) * (
      gamma * gamma_k[scenario]
    ) + (beta + beta_k[scenario])
    return y.astype(self.dtype)


class StarDense(nn.Module):
  """Star-topology dense layer: scenario k's weight is ``W * W_k`` (elementwise), its bias
  ``b + b_k``. W ``[d_in, d_out]`` (lecun normal; ('mlp_in', 'mlp_out')), b ``[d_out]`` (0);
  W_k ``[K, d_in, d_out]`` initialised to ones (so training starts from the shared network),
  b_k ``[K, d_out]`` (0), logical axes ('scenario', ...).

  Call ``(x, scenario)``: x ``[B, d_in]`` with scenario int32 ``[B]`` -> ``[B, d_out]``;
  x ``[B, d_in]`` or ``[B, K, d_in]`` with scenario None -> ``[B, K, d_out]``. ``groups`` (a
  ``grouped.Groups`` of the rows' scenarios): the selected layout with each row times its own
  scenario's kernel only.
  """

  features: int
  num_scenarios: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, scenario=None, groups: Groups | None = None) -> jnp.ndarray:
    K, d_in = self.num_scenarios, x.shape[-1]
    w = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp_in", "mlp_out")),
      (d_in, self.features),
      jnp.float32,
    )
    b = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp_out",)),
      (self.features,),
      jnp.float32,
    )
    wk = self.param(
      "scenario_kernel",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("scenario", "mlp_in", "mlp_out")),
      (K, d_in, self.features),
      jnp.float32,
    )
    bk = self.param(
      "scenario_bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("scenario", "mlp_out")),
      (K, self.features),
      jnp.float32,
    )
    weff = (w[None] * wk).astype(self.dtype)  # [K, d_in, d_out]
    beff = b[None] + bk  # [K, d_out], float32 (mixed.add_bias)
    x = x.astype(self.dtype)
    if groups is not None:
      return grouped_dense(x, weff, beff, groups)
    if x.ndim == 3:
      return mixed.add_bias(mixed.einsum("bki,kio->bko", x, weff), beff)
    y = mixed.add_bias(mixed.einsum("bi,kio->bko", x, weff), beff)  # [B, K, d_out]
    return _select(y, scenario)


class StarTower(nn.Module):
  """STAR tower: e = embeddings ``[B, F*d]`` -> PartitionedNorm -> StarDense layers (``widths``,
  activation, dropout) -> StarDense(out_dim) with no activation; plus, if ``star_aux``, an
  auxiliary MLP of ``[z_k ; e]`` (hidden ``bias_hidden``) added to the output; L2-normalised.

  Call ``(features, z, scenario, train)``: z the scenario embedding table ``[K, d_s]``;
  scenario int32 ``[B]`` -> ``[B, D]``, None -> ``[B, K, D]``.
  """

  cfg: ModelConfig
  specs: Sequence[FieldSpec]

  @nn.compact
  def __call__(self, features, z, scenario=None, train: bool = False):
    c = self.cfg
    dt = jnp.dtype(c.compute_dtype)
    act = activation(c.activation)
    K = c.num_scenarios
    e = FieldEmbedder(self.specs, c.embed_dim, c.vocab_pad_to, dt, name="embed")(features)
    _check_scenario(scenario, e.shape[0])
    x = PartitionedNorm(K, c.star_momentum, dtype=dt, name="pn")(e, scenario, train)
    groups = _groups(c, scenario)
    dims = list(c.widths) + [c.out_dim]
    for l, width in enumerate(dims):
      last = l == len(dims) - 1
      x = StarDense(width, K, dt, name="out" if last else f"star_{l}")(x, scenario, groups)
      if not last:
        x = act(x)
        if c.dropout > 0:
          x = nn.Dropout(c.dropout)(x, deterministic=not train)
    if c.star_aux:
      if scenario is None:
        zb = jnp.broadcast_to(z[None], (e.shape[0],) + z.shape)  # [B, K, d_s]
        eb = jnp.broadcast_to(e[:, None], (e.shape[0], K, e.shape[-1]))
      else:
        zb, eb = jnp.take(z, scenario, axis=0), e
      a = act(_dense(c.bias_hidden, dt, "aux_hidden")(jnp.concatenate([zb.astype(dt), eb], -1)))
      x = x + _dense(c.out_dim, dt, "aux_out")(a)
    return l2_normalize(x.astype(jnp.float32))


class STAR(nn.Module):
  """STAR as scenario-aware towers (docs/design.md §3; Sheng et al., CIKM 2021).

  Parameters: ``scenario_embedding`` ``[K, d_s]`` (shared by both towers, input of the auxiliary
  network), ``user_tower``, ``item_tower`` (StarTower). Variables ``batch_stats``:
  ``{user_tower,item_tower}/pn/{mean,var}`` float32 ``[K, F*d]`` (PartitionedNorm documents
  training vs evaluation and both layouts).
  """

  cfg: ModelConfig

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """A problem line when ``star_momentum`` is not a number in [0, 1); else []."""
    m = model_cfg.get("star_momentum")
    ok = m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < 1)
    return (
      []
      if ok
      else [
        f"config.model.star_momentum={m!r}: expected 0 <= m < 1 (the "
        "momentum of the running statistics), e.g. 0.99"
      ]
    )

  def setup(self):
    c = self.cfg
    self.scenario_embedding = self.param(
      "scenario_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.1), ("scenario", "embed")),
      (c.num_scenarios, c.scenario_dim),
      jnp.float32,
    )
    self.user_tower = StarTower(c, c.user_specs)
    self.item_tower = StarTower(c, c.item_specs)

  def encode_user(self, features, scenario=None, train: bool = False):
    return self.user_tower(features, self.scenario_embedding, scenario, train)

  def encode_item(self, features, scenario=None, train: bool = False):
    return self.item_tower(features, self.scenario_embedding, scenario, train)

  def __call__(self, user_features, item_features, scenario, train: bool = False):
    return (
      self.encode_user(user_features, scenario, train),
      self.encode_item(item_features, scenario, train),
    )
