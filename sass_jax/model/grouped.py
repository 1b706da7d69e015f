"""Per-scenario matmuls that do only each row's own scenario's arithmetic.

A per-scenario layer applies scenario k's kernel ``W_k [d_in, d_out]`` to the rows of scenario
k. Multiplying every row by all K kernels and keeping one (the 'onehot' formulation) costs K
times the needed work; ``jax.lax.ragged_dot`` does the same on CPU (it lowers to a masked dense
dot). Here the rows are laid out by scenario in tiles of T rows, each tile holding rows of one
scenario only (a group's last tile is padded with zero rows), and one batched matmul multiplies
tile t by its scenario's kernel::

    [NT, T, d_in] x [NT, d_in, d_out] -> [NT, T, d_out]      NT = (N + K (T - 1)) // T

so the arithmetic is ``NT * T * d_in * d_out`` <= ``(N + K (T - 1)) * d_in * d_out`` instead of
``K * N * d_in * d_out``, plus a gather of the NT tiles' kernels and two row gathers. Every step
is a gather or a dot, so gradients are exact and work on every backend.

``make_groups`` builds the layout once per batch (``Groups``, a pytree of int32 arrays);
``grouped_matmul`` applies it. T is chosen by ``tile_size`` (static, from N and K).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCENARIO_COMPUTE = ("grouped", "onehot")


class Groups(NamedTuple):
  """Tile layout of N rows by scenario (all int32).

  scenario ``[N]``: each row's scenario in [0, K); src ``[NT * T]``: the row in each padded
  slot (N for an empty slot); dest ``[N]``: each row's slot; tile_group ``[NT]``: each tile's
  scenario (tiles past the last used one hold only empty slots).
  """

  scenario: jnp.ndarray
  src: jnp.ndarray
  dest: jnp.ndarray
  tile_group: jnp.ndarray

  @property
  def tile(self) -> int:
    return self.src.shape[0] // self.tile_group.shape[0]


def tile_size(n: int, k: int) -> int:
  """Rows per tile for N rows and K scenarios: the power of two <= N / (8 K), within [8, 128].

  The layout's static size pads N by up to K (T - 1) rows (<= 12.5% of N when T = N / (8 K);
  6% for N = 4096, K = 3, T = 128), while each tile's gathered kernel serves T rows (T / 2
  flops per byte of kernel gathered: 64 at T = 128).
  """
  t = max(1, int(n) // (8 * max(1, int(k))))
  t = 1 << (t.bit_length() - 1)
  return int(min(128, max(8, t)))


def make_groups(scenario: jnp.ndarray, num_scenarios: int, tile: int | None = None) -> Groups:
  """The tile layout of rows ``scenario`` (int ``[N]``, values in [0, K)); ``tile`` overrides
  ``tile_size``. Values outside [0, K) are not checked (their rows get undefined results)."""
  scenario = jnp.asarray(scenario, jnp.int32).reshape(-1)
  n, k = scenario.shape[0], int(num_scenarios)
  t = int(tile or tile_size(n, k))
  num_tiles = (n + k * (t - 1)) // t
  onehot = jax.nn.one_hot(scenario, k, dtype=jnp.int32)  # [N, K]
  counts = onehot.sum(0)  # [K]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, 0), scenario[:, None], 1)[:, 0] - 1
  padded = (counts + t - 1) // t * t
  start = jnp.cumsum(padded) - padded  # [K] first slot
  dest = (start[scenario] + rank).astype(jnp.int32)
  src = (
    jnp.full((num_tiles * t,), n, jnp.int32)
    .at[dest]
    .set(jnp.arange(n, dtype=jnp.int32), unique_indices=True)
  )
  tile_end = jnp.cumsum(padded) // t  # [K]
  tile_group = jnp.minimum(
    jnp.searchsorted(tile_end, jnp.arange(num_tiles, dtype=jnp.int32), side="right"), k - 1
  ).astype(jnp.int32)
  return Groups(scenario, src, dest, tile_group)


def grouped_matmul(x: jnp.ndarray, w: jnp.ndarray, groups: Groups) -> jnp.ndarray:
  """Row n of ``x [N, d_in]`` times ``w[scenario[n]]`` (``w [K, d_in, d_out]``) -> ``[N, d_out]``
  in the promoted dtype of x and w."""
  n, d_in = x.shape
  t, nt = groups.tile, groups.tile_group.shape[0]
  xp = jnp.take(x, groups.src, axis=0, mode="fill", fill_value=0).reshape(nt, t, d_in)
  wt = jnp.take(w, groups.tile_group, axis=0)  # [NT, d_in, d_out]
  y = jnp.einsum("tri,tio->tro", xp, wt).reshape(nt * t, w.shape[-1])
  return jnp.take(y, groups.dest, axis=0)


def grouped_dense(
  x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None, groups: Groups
) -> jnp.ndarray:
  """``grouped_matmul`` over any leading shape: x ``[..., d_in]`` with ``prod(...) = N`` rows in
  ``groups``' order, plus ``b[scenario]`` (b ``[K, d_out]``) when given -> ``[..., d_out]``."""
  lead = x.shape[:-1]
  y = grouped_matmul(x.reshape(-1, x.shape[-1]), w, groups)
  if b is not None:
    y = y + jnp.take(b, groups.scenario, axis=0)
  return y.reshape(*lead, w.shape[-1])
