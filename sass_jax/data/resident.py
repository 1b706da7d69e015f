"""A device-resident data set and a device-side batch sampler (docs/design.md §4).

When a stream's rows and the user / item tables fit in device memory
(``config.train.resident_on_device``), ``ResidentSampler`` copies them to the device once and
builds every batch there with one compiled gather: no host work and no host-to-device copy per
step. Batch i covers positions ``[i*B, (i+1)*B)`` of the endless concatenation of per-epoch
permutations of the stream's rows (as ``pipeline.BatchFn``, every row once per epoch), but the
permutations come from ``jax.random`` (``fold_in(key(seed), epoch)``), so the batches differ
from the grain pipeline's. Batch i is a pure function of (seed, i): ``get_state`` /
``set_state`` hold the next index only.

The batch has the keys and dtypes of ``pipeline.BatchFn`` ('user' / 'item' feature dicts,
'scenario', 'user_index', 'item_index', and 'item_logq' (fine-tune) or 'user_views' /
'item_views' (pre-train)), placed with ``sharding`` (the partitioner's batch sharding).
Single process only. This module never imports grain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sass_jax.data.pipeline import item_logq
from sass_jax.data.store import PreparedData


def nbytes(tree) -> int:
  """Bytes of every array in a pytree."""
  return int(
    sum(
      np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in jax.tree.leaves(tree)
    )
  )


class ResidentSampler:
  """Batches of a stream sampled on the device from device-resident copies of the data.

  Args:
    data: a prepared store. stream: 'finetune' (labelled training positives) or 'pretrain'
      (every training exposure, two distinct scenarios per row for each side's views).
    batch_size: rows per batch B (<= the stream's rows). seed: the sampling seed.
    sharding: where the batch goes (e.g. ``Partitioner.batch_sharding()``); None: the default
      device. The data itself is replicated on ``sharding``'s devices (or the default device).

  ``sampler(i)`` returns batch i; iterating yields batches 0, 1, ... (``get_state`` /
  ``set_state`` checkpoint the position). ``resident_bytes`` is the size of the device copy.
  Raises ValueError for an unknown stream, an empty stream, B larger than the stream, a
  pre-train stream with < 2 scenarios, or several JAX processes.
  """

  def __init__(
    self,
    data: PreparedData,
    stream: str,
    batch_size: int,
    seed: int,
    sharding: jax.sharding.Sharding | None = None,
  ):
    if stream not in ("finetune", "pretrain"):
      raise ValueError(f"unknown stream {stream!r}; expected 'finetune' or 'pretrain'")
    if jax.process_count() > 1:
      raise ValueError(
        "config.train.resident_on_device supports a single JAX process; "
        "use the grain pipeline with several processes"
      )
    rows = np.asarray(data.rows("train", labeled_positive=True if stream == "finetune" else None))
    if len(rows) == 0:
      raise ValueError("the stream has no rows (check the split and the labels of the data)")
    if batch_size > len(rows):
      raise ValueError(
        f"batch size {batch_size} exceeds the {len(rows)} rows of the {stream} stream"
      )
    self.k = data.num_scenarios
    if stream == "pretrain" and self.k < 2:
      raise ValueError(
        "scenario-view pre-training needs at least 2 scenarios; the data has "
        f"{self.k} (set config.pretrain.num_steps=0)"
      )
    self.stream, self.batch_size, self.seed, self.n = stream, int(batch_size), int(seed), len(rows)
    rep = None
    if sharding is not None:
      rep = (
        jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(sharding, jax.sharding.NamedSharding)
        else sharding
      )
    put = lambda x: jax.device_put(np.asarray(x), rep)
    inter = data.inter
    host = {
      "user": np.asarray(inter["user"])[rows].astype(np.int32),
      "item": np.asarray(inter["item"])[rows].astype(np.int32),
      "scenario": np.asarray(inter["scenario"])[rows].astype(np.int32),
      "users": {f: np.asarray(c, np.int32) for f, c in data.users.items()},
      "user_masks": {f: np.asarray(m, bool) for f, m in data.user_masks.items()},
      "items": {f: np.asarray(c, np.int32) for f, c in data.items.items()},
      "item_masks": {f: np.asarray(m, bool) for f, m in data.item_masks.items()},
    }
    if stream == "finetune":
      host["logq"] = item_logq(data)
    self.arrays = jax.tree.map(put, host)
    self.resident_bytes = nbytes(self.arrays)
    self._perms: dict[int, jax.Array] = {}
    self._perm_fn = jax.jit(
      lambda e: jax.random.permutation(
        jax.random.fold_in(jax.random.key(self.seed), e), self.n
      ).astype(jnp.int32)
    )
    self._fn = jax.jit(self._batch, out_shardings=sharding)
    self.index = 0

  def _perm(self, epoch: int) -> jax.Array:
    if epoch not in self._perms:
      for e in [e for e in self._perms if e < epoch - 1]:
        del self._perms[e]
      self._perms[epoch] = self._perm_fn(epoch)
    return self._perms[epoch]

  def _batch(self, a: dict, perm0, perm1, start, index):
    """Batch of positions start .. start + B - 1 (start < n; perm1 is the next epoch's)."""
    pos = start + jnp.arange(self.batch_size, dtype=jnp.int32)
    rows = jnp.where(
      pos < self.n, perm0[jnp.minimum(pos, self.n - 1)], perm1[jnp.maximum(pos - self.n, 0)]
    )
    u, it = a["user"][rows], a["item"][rows]
    feats = lambda cols, masks, r: {
      **{f: c[r] for f, c in cols.items()},
      **{f"{f}_mask": m[r] for f, m in masks.items()},
    }
    batch = {
      "user": feats(a["users"], a["user_masks"], u),
      "item": feats(a["items"], a["item_masks"], it),
      "scenario": a["scenario"][rows],
      "user_index": u,
      "item_index": it,
    }
    if self.stream == "finetune":
      batch["item_logq"] = a["logq"][it]
    else:
      key = jax.random.fold_in(jax.random.key(self.seed + 1_000_003), index)
      ku, ki = jax.random.split(key)
      batch["user_views"] = _two_scenarios(ku, self.k, self.batch_size)
      batch["item_views"] = _two_scenarios(ki, self.k, self.batch_size)
    return batch

  def __call__(self, index: int) -> dict:
    """Batch ``index`` (>= 0), on the device."""
    start = int(index) * self.batch_size
    epoch, off = divmod(start, self.n)
    perm0 = self._perm(epoch)
    perm1 = self._perm(epoch + 1) if off + self.batch_size > self.n else perm0
    return self._fn(self.arrays, perm0, perm1, np.int32(off), np.int32(index))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = self(self.index)
    self.index += 1
    return b

  def get_state(self) -> dict:
    """``{'sampler': 'resident', 'next_index': i}``: the position, for a checkpoint (the
    'sampler' key tells it from a grain iterator's state)."""
    return {"sampler": "resident", "next_index": self.index}

  def set_state(self, state: dict):
    """Resume at ``state['next_index']``; raises ValueError for another sampler's state."""
    if not isinstance(state, dict) or state.get("sampler") != "resident":
      raise ValueError(f"not a ResidentSampler state: {state!r}")
    self.index = int(state["next_index"])


def _two_scenarios(key, k: int, n: int):
  """int32 [n, 2]: two distinct scenarios per row, uniform over the k(k-1) ordered pairs."""
  ka, kb = jax.random.split(key)
  a = jax.random.randint(ka, (n,), 0, k)
  b = (a + jax.random.randint(kb, (n,), 1, k)) % k
  return jnp.stack([a, b], 1).astype(jnp.int32)
