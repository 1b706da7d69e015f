"""Multi-Layer Scenario Adaptive Transfer (ML-SAT), SPEC section 1.

One ML-SAT layer l, for a sample of scenario k (SPEC section 1, 'gated_sum' reading)::

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
Per-scenario weights are stacked ``[K, d_in, d_out]`` and applied with an einsum; there is no
Python loop over scenarios.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "tanh": jnp.tanh, "leaky_relu": nn.leaky_relu,
}
GATE_STYLES = ("gated_sum", "gru", "none")


def activation(name: str) -> Callable:
  """The activation called ``name``; raises ValueError listing the choices."""
  if name not in ACTIVATIONS:
    raise ValueError(f"config.model.activation={name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def _dense(features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           ("mlp_in", "mlp_out")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp_out",)))


class ScenarioDense(nn.Module):
  """A dense layer with one weight matrix per scenario, stacked ``[K, d_in, d_out]``.

  Call ``(x, onehot)``: selected layout, x ``[B, d_in]``, onehot ``[B, K]`` -> ``[B, d_out]``;
  ``(x, None)``: all-scenarios layout, x ``[B, K, d_in]`` -> ``[B, K, d_out]`` where slice k
  uses scenario k's weights. Logical axes: kernel ('scenario', 'mlp_in', 'mlp_out').
  """
  features: int
  num_scenarios: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, onehot: jnp.ndarray | None) -> jnp.ndarray:
    d_in = x.shape[-1]
    w = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                         out_axis=-1, batch_axis=(0,)),
        ("scenario", "mlp_in", "mlp_out")), (self.num_scenarios, d_in, self.features), jnp.float32)
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ("scenario", "mlp_out")),
                   (self.num_scenarios, self.features), jnp.float32)
    w, b = w.astype(self.dtype), b.astype(self.dtype)
    x = x.astype(self.dtype)
    if onehot is None:
      if x.ndim != 3 or x.shape[1] != self.num_scenarios:
        raise ValueError(f"all-scenarios layout needs x [B, {self.num_scenarios}, d], got {x.shape}")
      return jnp.einsum("bki,kio->bko", x, w) + b
    onehot = onehot.astype(self.dtype)
    return jnp.einsum("bk,bki->bi", onehot, jnp.einsum("bi,kio->bko", x, w)) + onehot @ b


class MLSATLayer(nn.Module):
  """One ML-SAT layer (module docstring). Returns ``(g_l, h_l)``.

  Inputs: g ``[B, d]`` (selected) or ``[B, 1, d]`` (all scenarios); h ``[B, d]`` or
  ``[B, K, d]``; z the scenario embedding ``[B, d_s]`` or ``[1, K, d_s]``; onehot ``[B, K]`` or
  None for the all-scenarios layout.
  """
  features: int
  num_scenarios: int
  act: str = "relu"
  gate_style: str = "gated_sum"
  gate_per_scenario: bool = False
  dropout: float = 0.0
  layer_norm: bool = False
  dtype: jnp.dtype = jnp.float32

  def _gate(self, name, x, onehot):
    if self.gate_per_scenario:
      return ScenarioDense(self.features, self.num_scenarios, self.dtype, name=name)(x, onehot)
    return _dense(self.features, self.dtype, name)(x)

  @nn.compact
  def __call__(self, g, h, z, onehot, train: bool = False):
    if self.gate_style not in GATE_STYLES:
      raise ValueError(f"config.model.gate_style={self.gate_style!r}; expected one of {GATE_STYLES}")
    act = activation(self.act)
    g = act(_dense(self.features, self.dtype, "global")(g))
    s = act(ScenarioDense(self.features, self.num_scenarios, self.dtype, name="scenario")(h, onehot))
    if self.gate_style == "none":
      h = g + s
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
        c = jnp.tanh(_dense(self.features, self.dtype, "candidate")(jnp.concatenate([a * gb, s], -1)))
        h = (1.0 - u) * s + u * c
    if self.layer_norm:
      h = nn.LayerNorm(dtype=self.dtype, name="norm")(h)
      g = nn.LayerNorm(dtype=self.dtype, name="global_norm")(g)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
      g = nn.Dropout(self.dropout)(g, deterministic=not train)
    return g, h
