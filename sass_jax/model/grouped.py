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

**On a mesh** the batch is split over the 'data' axis in S contiguous blocks. Sorting the whole
batch by scenario would mix the blocks, and XLA would then run every layer on the whole global
batch on every device. So the rows are grouped *within* each block: the layout has a leading
block axis ``[S, ...]`` (block s = rows ``s N / S .. (s + 1) N / S - 1``) and every gather and
dot is batched over it, which the SPMD partitioner keeps split. S comes from ``batch_blocks``,
a trace-time context that ``Partitioner.compile_step`` enters with the data-axis size (1
elsewhere); the results do not depend on S.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sass_jax.model import mixed

SCENARIO_COMPUTE = ("grouped", "onehot")

# (S, sharding of a [S, ...] array or None) while a step is traced for a mesh.
_BLOCKS: contextvars.ContextVar = contextvars.ContextVar("sass_jax_batch_blocks", default=(1, None))


@contextlib.contextmanager
def batch_blocks(num_blocks: int, sharding: Any = None):
  """Within this context ``make_groups`` groups rows within ``num_blocks`` contiguous blocks
  (the batch's split over the mesh's 'data' axis) whenever N divides by it; ``sharding``
  (a ``NamedSharding`` with the block axis over 'data') is applied to the block-major arrays.
  Used at trace time by ``sass_jax.partition.Partitioner.compile_step``."""
  token = _BLOCKS.set((max(1, int(num_blocks)), sharding))
  try:
    yield
  finally:
    _BLOCKS.reset(token)


def current_blocks() -> int:
  """S of the enclosing ``batch_blocks`` context (1 outside one)."""
  return _BLOCKS.get()[0]


def _constrain(x):
  """Keep a block-major ``[S, ...]`` array split over 'data' when S is the context's S (a
  layout that fell back to one block is left to XLA)."""
  blocks, sharding = _BLOCKS.get()
  if sharding is None or x.shape[0] != blocks or blocks == 1:
    return x
  return jax.lax.with_sharding_constraint(x, sharding)


class Groups(NamedTuple):
  """Tile layout of N rows by scenario in S blocks of N / S rows (all int32).

  scenario ``[N]``: each row's scenario in [0, K); src ``[S, NT * T]``: the row (within its
  block) in each padded slot (N / S for an empty slot); dest ``[S, N / S]``: each row's slot in
  its block; tile_group ``[S, NT]``: each tile's scenario (tiles past the last used one hold
  only empty slots). NT and T are per block.
  """

  scenario: jnp.ndarray
  src: jnp.ndarray
  dest: jnp.ndarray
  tile_group: jnp.ndarray

  @property
  def tile(self) -> int:
    return self.src.shape[-1] // self.tile_group.shape[-1]

  @property
  def blocks(self) -> int:
    return self.src.shape[0]


def tile_size(n: int, k: int) -> int:
  """Rows per tile for N rows and K scenarios: the power of two <= min(sqrt(64 N / K), N / K),
  within [8, 256].

  Two costs pull T apart. The layout's static size pads N by up to K (T - 1) rows (extra
  arithmetic, falling as T shrinks), while each of the NT tiles gathers its scenario's whole
  kernel (memory traffic, and one small matmul per tile, falling as T grows): about
  ``(N + K T) c`` flops against ``(N / T + K) c`` kernel bytes for a ``c``-element kernel, which
  is least near T ~ sqrt(N / K) times a machine constant. The constant 64 is measured
  (BENCHMARKS.md, "tile size"): on the 2-core CPU, SASS's fine-tune step at N = 1024 ran fastest
  at T = 128 / 64 / 64 / 32 for K = 3 / 8 / 16 / 32 among the T tried (8 to 128), and at
  N = 4096, K = 3 at T = 256 over 128. The bound N / K (which none of those measured choices
  reaches past) keeps the padding at most N rows for small batches, where sqrt(64 N / K) alone
  would lay 64 rows of K = 4 out in 5 tiles of 32 (160 rows). The rule before (the power of two
  <= N / (8 K), within [8, 128]) gave T = 8 at N = 1024, K = 32: 1.4x slower.
  """
  k = max(1, int(k))
  t = max(1, min(math.isqrt(64 * int(n) // k), int(n) // k))
  t = 1 << (t.bit_length() - 1)
  return int(min(256, max(8, t)))


def make_groups(
  scenario: jnp.ndarray, num_scenarios: int, tile: int | None = None, blocks: int | None = None
) -> Groups:
  """The tile layout of rows ``scenario`` (int ``[N]``, values in [0, K)); ``tile`` overrides
  ``tile_size``; ``blocks`` (S) overrides ``batch_blocks``' S and must divide N (from the
  context, an S that does not divide N falls back to 1). Values outside [0, K) are not checked
  (their rows get undefined results). Raises ValueError for an explicit S not dividing N."""
  scenario = jnp.asarray(scenario, jnp.int32).reshape(-1)
  n, k = scenario.shape[0], int(num_scenarios)
  if blocks is None:
    blocks = _BLOCKS.get()[0]
    blocks = blocks if n % blocks == 0 else 1
  elif n % int(blocks):
    raise ValueError(f"{n} rows do not split into {blocks} blocks")
  s = int(blocks)
  m = n // s
  t = int(tile or tile_size(m, k))
  num_tiles = (m + k * (t - 1)) // t
  sc = _constrain(scenario.reshape(s, m))
  onehot = jax.nn.one_hot(sc, k, dtype=jnp.int32)  # [S, M, K]
  counts = onehot.sum(1)  # [S, K]
  rank = jnp.take_along_axis(jnp.cumsum(onehot, 1), sc[..., None], 2)[..., 0] - 1
  padded = (counts + t - 1) // t * t
  start = jnp.cumsum(padded, 1) - padded  # [S, K] first slot
  dest = (jnp.take_along_axis(start, sc, 1) + rank).astype(jnp.int32)  # [S, M]
  src = jax.vmap(
    lambda d: (
      jnp.full((num_tiles * t,), m, jnp.int32)
      .at[d]
      .set(jnp.arange(m, dtype=jnp.int32), unique_indices=True)
    )
  )(dest)
  tile_end = jnp.cumsum(padded, 1) // t  # [S, K]
  tile_group = jnp.minimum(
    jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(num_tiles, dtype=jnp.int32), side="right"))(
      tile_end
    ),
    k - 1,
  ).astype(jnp.int32)
  return Groups(scenario, _constrain(src), _constrain(dest), _constrain(tile_group))


@jax.custom_vjp
def _permute_rows(x: jnp.ndarray, idx: jnp.ndarray, inv: jnp.ndarray) -> jnp.ndarray:
  """``x[idx]`` (``[len(idx), ...]``; 0 where ``idx`` is out of range) when ``idx`` lists every
  row of x exactly once (plus out-of-range padding) and ``inv`` is its inverse (row r is at
  position ``inv[r]``). The gradient is then the gather ``g[inv]`` (padding positions of
  ``inv`` read 0), not a scatter-add into a zero-filled ``x``: on CPU the scatter and the
  zero fill were a large share of the grouped layers' backward pass."""
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


def _permute_rows_fwd(x, idx, inv):
  return _permute_rows(x, idx, inv), (idx, inv)


def _permute_rows_bwd(res, g):
  idx, inv = res
  return jnp.take(g, inv, axis=0, mode="fill", fill_value=0), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)
permute_rows = _permute_rows  # public name (sass_jax/train/inbatch.py lays rows out in tiles)


def grouped_matmul(x: jnp.ndarray, w: jnp.ndarray, groups: Groups) -> jnp.ndarray:
  """Row n of ``x [N, d_in]`` times ``w[scenario[n]]`` (``w [K, d_in, d_out]``) -> ``[N, d_out]``
  in the promoted dtype of x and w. Both row gathers are permutations (``src`` and ``dest``
  are inverse), so each one's gradient is the other gather (``_permute_rows``)."""
  n, d_in = x.shape
  s, t, nt = groups.blocks, groups.tile, groups.tile_group.shape[-1]
  permute = jax.vmap(_permute_rows)
  xb = _constrain(x.reshape(s, n // s, d_in))
  xp = permute(xb, groups.src, groups.dest).reshape(s, nt, t, d_in)
  wt = jnp.take(w, groups.tile_group, axis=0)  # [S, NT, d_in, d_out]
  y = mixed.einsum("stri,stio->stro", xp, wt).reshape(s, nt * t, w.shape[-1])
  return permute(y, groups.dest, groups.src).reshape(n, w.shape[-1])


def grouped_dense(
  x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None, groups: Groups
) -> jnp.ndarray:
  """``grouped_matmul`` over any leading shape: x ``[..., d_in]`` with ``prod(...) = N`` rows in
  ``groups``' order, plus ``b[scenario]`` (b ``[K, d_out]``, added in float32:
  ``mixed.add_bias``) when given -> ``[..., d_out]``."""
  lead = x.shape[:-1]
  y = grouped_matmul(x.reshape(-1, x.shape[-1]), w, groups)
  if b is not None:  # a float32 gather and sum (mixed.add_bias)
    y = mixed.add_bias(y, jnp.take(b.astype(jnp.float32), groups.scenario, axis=0))
  return y.reshape(*lead, w.shape[-1])
