"""Multi-Layer Scenario Adaptive Transfer (ML-SAT), docs/design.md §1.

One ML-SAT layer l, for a sample of scenario k (docs/design.md §1, 'gated_sum' reading)::

    g_l = act(W_g g_{l-1} + b_g)                      global, shared by all scenarios
    s_l = act(W_{s,k} h_{l-1} + b_{s,k})              scenario k's own layer
    a_l = sigmoid(W_a [g_l ; s_l ; z_k] + b_a)        adaptive gate
    c_l = a_l * g_l                                   transferred global information
    u_l = sigmoid(W_u [c_l ; s_l ; z_k] + b_u)        update gate
    h_l = u_l * s_l + (1 - u_l) * c_l

'gru' (PERSCEN's description): c_l = tanh(W_c [a_l * g_l ; s_l]), u_l = sigmoid(W_u [g_l ; s_l ;
z_k]), h_l = (1 - u_l) * s_l + u_l * c_l. 'none' (ablation, gates off): h_l = g_l + s_l.

Two layouts of the scenario axis, so one code path serves both uses:
- *selected*: arrays ``[B, d]`` and a one-hot ``[B, K]`` of each sample's scenario;
- *all scenarios*: the scenario path is ``[B, K, d]`` (every sample in every scenario, e.g. an
  item's K vectors) and the global path stays ``[B, 1, d]`` (computed once).
Per-scenario weights are stacked ``[K, d_in, d_out]``; there is no Python loop over scenarios.

How the selected layout is computed (``config.model.scenario_compute``):
- 'grouped' (default): the scenario argument is a ``grouped.Groups`` layout of the rows and a
  per-scenario layer multiplies each row by its own scenario's kernel only
  (``grouped.grouped_matmul``); the scenario path may then hold V >= 1 scenarios per sample,
  h ``[B, V, d]`` with g ``[B, 1, d]`` computed once (two views of pre-training: V = 2). The
  shared gates are applied as blocks, ``W_a [g; s; z] = W_a,g g + W_a,s s + W_a,z z``: the g
  part once per sample and the z part once per scenario (of the ``[K, d_s]`` table), in both
  layouts -- the same function and parameters as the concatenated form.
- 'onehot' (the earlier formulation, kept for reference and tests): every row is multiplied by
  all K kernels and a one-hot ``[B, K]`` keeps one; gates on the concatenated input.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from sass_jax.model import mixed
from sass_jax.model.grouped import Groups, grouped_dense

ACTIVATIONS: dict[str, Callable] = {
  "relu": nn.relu,
  "gelu": nn.gelu,
  "silu": nn.silu,
  "tanh": jnp.tanh,
  "leaky_relu": nn.leaky_relu,
}
GATE_STYLES = ("gated_sum", "gru", "none")


def activation(name: str) -> Callable:
  """The activation called ``name``; raises ValueError listing the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f"config.model.activation={name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _dense(features: int, dtype, name: str) -> "Dense":
  return Dense(features, dtype, name=name)


class ScenarioDense(nn.Module):
  """A dense layer with one weight matrix per scenario, stacked ``[K, d_in, d_out]``.

  Call ``(x, onehot)``: selected layout, x ``[B, d_in]``, onehot ``[B, K]`` -> ``[B, d_out]``
  (every row times all K kernels, one kept); ``(x, groups)`` with a ``grouped.Groups`` of N
  rows: x ``[..., d_in]`` (N rows) -> ``[..., d_out]``, each row times its own kernel only;
  ``(x, None)``: all-scenarios layout, x ``[B, K, d_in]`` -> ``[B, K, d_out]`` where slice k
  uses scenario k's weights. Logical axes: kernel ('scenario', 'mlp_in', 'mlp_out').
  """

  features: int
  num_scenarios: int
  dtype: jnp.dtype = jnp.float32
  # all-scenarios layout only: x [K, B, d_in] -> [K, B, d_out] (scenario-major: a batched
  # matmul over k with no transposes) instead of [B, K, d_in] -> [B, K, d_out]
  scenario_major: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, onehot: jnp.ndarray | None) -> jnp.ndarray:
    d_in = x.shape[-1]
    w = self.param(
      "kernel",
      nn.with_logical_partitioning(
        nn.initializers.variance_scaling(
          1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        ),
        ("scenario", "mlp_in", "mlp_out"),
      ),
      (self.num_scenarios, d_in, self.features),
      jnp.float32,
    )
    b = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("scenario", "mlp_out")),
      (self.num_scenarios, self.features),
      jnp.float32,
    )
    w = w.astype(self.dtype)  # b stays float32: mixed.add_bias
    x = x.astype(self.dtype)
    if isinstance(onehot, Groups):
      return grouped_dense(x, w, b, onehot)
    if onehot is None:
      k_axis = 0 if self.scenario_major else 1
      if x.ndim != 3 or x.shape[k_axis] != self.num_scenarios:
        want = "[K, B, d]" if self.scenario_major else "[B, K, d]"
        raise ValueError(
          f"all-scenarios layout needs x {want} (K = {self.num_scenarios}), got {x.shape}"
        )
      if self.scenario_major:
        return mixed.add_bias(mixed.einsum("kbi,kio->kbo", x, w), b[:, None])
      return mixed.add_bias(mixed.einsum("bki,kio->bko", x, w), b)
    onehot = onehot.astype(self.dtype)
    return mixed.einsum("bk,bki->bi", onehot, mixed.einsum("bi,kio->bko", x, w)) + mixed.matmul(
      onehot, b.astype(self.dtype)
    )


class Dense(nn.Module):
  """A dense layer, ``x @ W + b``, in ``dtype`` (bfloat16: ``mixed.matmul``'s float32
  accumulation; the bias and the blocks below summed in float32 and rounded once). Parameters
  'kernel' ``[d_in, features]`` (lecun normal, logical axes ('mlp_in', 'mlp_out')) and 'bias'
  ``[features]`` (zeros, ('mlp_out',)), float32, created in that order: the names, shapes and
  initial values of ``flax.linen.Dense``, so checkpoints of either load into the other.

  Call ``(x)``: x ``[..., d_in]`` -> ``[..., features]``. Or ``(parts)``, a list of ``(x_i,
  post_i)``: the layer of ``concat(x_i, -1)`` computed block by block, ``sum_i post_i(x_i @ W_i)
  + b`` where W_i are the kernel rows of block i (in order) and post_i is None or a function
  applied to that block's product (e.g. a gather of per-scenario rows); the terms broadcast
  against each other, so a block shared by many rows (``[B, 1, d]``) is multiplied once.
  """

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, parts):
    if not isinstance(parts, (list, tuple)):
      parts = [(parts, None)]
    d_in = sum(int(x.shape[-1]) for x, _ in parts)
    kernel = self.param(
      "kernel",
      nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp_in", "mlp_out")),
      (d_in, self.features),
      jnp.float32,
    ).astype(self.dtype)
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp_out",)),
      (self.features,),
      jnp.float32,
    )
    # bfloat16: the blocks' products and the bias are summed in float32 and rounded once, so
    # the gradient of a broadcast block (or of the bias) is a float32 sum (mixed.add_bias)
    acc = jnp.float32 if jnp.dtype(self.dtype) == jnp.bfloat16 else self.dtype
    out, off = None, 0
    for x, post in parts:
      d = int(x.shape[-1])
      y = mixed.matmul(x.astype(self.dtype), kernel[off : off + d]).astype(acc)
      off += d
      y = y if post is None else post(y)
      out = y if out is None else out + y
    return (out + bias.astype(acc)).astype(self.dtype)


class MLSATLayer(nn.Module):
  """One ML-SAT layer (module docstring). Returns ``(g_l, h_l)``.

  Inputs ('onehot' compute): g ``[B, d]`` (selected) or ``[B, 1, d]`` (all scenarios); h
  ``[B, d]`` or ``[B, K, d]``; z the scenario embedding ``[B, d_s]`` or ``[1, K, d_s]``; onehot
  ``[B, K]`` or None for the all-scenarios layout.
  Inputs ('grouped' compute): g ``[B, 1, d]``; h ``[B, V, d]`` with ``onehot`` a
  ``grouped.Groups`` of the B * V rows, or ``[B, K, d]`` with onehot None; z the scenario
  embedding table ``[K, d_s]`` (or ``[1, K, d_s]``). With ``scenario_major`` (all-scenarios
  layout, onehot None): g ``[1, B, d]``, h ``[K, B, d]``. Outputs keep the input layouts.
  """

  features: int
  num_scenarios: int
  act: str = "relu"
  gate_style: str = "gated_sum"
  gate_per_scenario: bool = False
  dropout: float = 0.0
  layer_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  scenario_compute: str = "onehot"
  # 'grouped' compute, all-scenarios layout: h [K, B, d], g [1, B, d] (see ScenarioDense)
  scenario_major: bool = False

  def _gate(self, name, x, onehot):
    if self.gate_per_scenario:
      return ScenarioDense(
        self.features, self.num_scenarios, self.dtype, self.scenario_major, name=name
      )(x, onehot)
    return _dense(self.features, self.dtype, name)(x)

  @nn.compact
  def __call__(self, g, h, z, onehot, train: bool = False):
    if self.gate_style not in GATE_STYLES:
      raise ValueError(
        f"config.model.gate_style={self.gate_style!r}; expected one of {GATE_STYLES}"
      )
    act = activation(self.act)
    g = act(_dense(self.features, self.dtype, "global")(g))
    s = act(
      ScenarioDense(
        self.features, self.num_scenarios, self.dtype, self.scenario_major, name="scenario"
      )(h, onehot)
    )
    if self.gate_style == "none":
      h = g + s
    elif self.scenario_compute == "grouped":
      h = self._grouped_gates(g, s, z, onehot)
    else:
      gb = jnp.broadcast_to(g, s.shape)
      zb = jnp.broadcast_to(z, s.shape[:-1] + z.shape[-1:]).astype(self.dtype)
      a = nn.sigmoid(self._gate("adaptive_gate", jnp.concatenate([gb, s, zb], -1), onehot))
      if self.gate_style == "gated_sum":
        c = a * gb
        u = nn.sigmoid(self._gate("update_gate", jnp.concatenate([c, s, zb], -1), onehot))
        h = u * s + (1.0 - u) * c
      else:  # gru
        u = nn.sigmoid(self._gate("update_gate", jnp.concatenate([gb, s, zb], -1), onehot))
        c = jnp.tanh(
          _dense(self.features, self.dtype, "candidate")(jnp.concatenate([a * gb, s], -1))
        )
        h = (1.0 - u) * s + u * c
    if self.layer_norm:
      h = nn.LayerNorm(dtype=self.dtype, name="norm")(h)
      g = nn.LayerNorm(dtype=self.dtype, name="global_norm")(g)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
      g = nn.Dropout(self.dropout)(g, deterministic=not train)
    return g, h

  def _grouped_gates(self, g, s, z, groups):
    """The gates of the 'grouped' compute: g ``[B, 1, w]``, s ``[B, V or K, w]``, z ``[K, d_s]``
    (or ``[1, K, d_s]``); scenario-major: g ``[1, B, w]``, s ``[K, B, w]``; returns h like s."""
    ztab = z.reshape(-1, z.shape[-1])  # [K, d_s]
    if isinstance(groups, Groups):
      idx = groups.scenario.reshape(s.shape[:-1])  # [B, V]
      zrows = lambda t: jnp.take(t, idx, axis=0)  # [K, x] -> [B, V, x]
    elif self.scenario_major:
      zrows = lambda t: t[:, None]  # [K, x] -> [K, 1, x]
    else:
      zrows = lambda t: t[None]  # [K, x] -> [1, K, x]
    gb = jnp.broadcast_to(g, s.shape)
    if self.gate_per_scenario:  # per-scenario kernels: no block is shared
      zb = jnp.broadcast_to(zrows(ztab.astype(self.dtype)), s.shape[:-1] + ztab.shape[-1:])
      gate = lambda name, first: nn.sigmoid(
        self._gate(name, jnp.concatenate([jnp.broadcast_to(first, s.shape), s, zb], -1), groups)
      )
    else:
      gate = lambda name, first: nn.sigmoid(
        Dense(self.features, self.dtype, name=name)([(first, None), (s, None), (ztab, zrows)])
      )
    a = gate("adaptive_gate", g)
    if self.gate_style == "gated_sum":
      c = a * gb
      u = gate("update_gate", c)
      return u * s + (1.0 - u) * c
    u = gate("update_gate", g)  # gru
    c = jnp.tanh(_dense(self.features, self.dtype, "candidate")(jnp.concatenate([a * gb, s], -1)))
    return (1.0 - u) * s + u * c
