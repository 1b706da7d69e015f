"""grain input pipelines over a prepared store (docs/design.md §4; section 7 "input pipeline").

Each stream is a ``grain.MapDataset`` over *batch indices*: batch i covers positions
``[i*B, (i+1)*B)`` of an endless sequence made by concatenating seeded permutations of the
stream's rows (epoch e uses permutation ``default_rng([seed, e])``). Nothing is dropped at an
epoch boundary, batches are built with vectorised NumPy gathers from the memory-mapped columns
(no per-record Python work), and batch i is a pure function of (seed, i) -- so a resumed
iterator (``get_state`` / ``set_state``) yields exactly the batches an uninterrupted one would.
With several JAX processes, process p takes rows ``[p*B/P, (p+1)*B/P)`` of every global batch
(disjoint shards that together cover it).

Streams:
- ``finetune``: labelled positives (label 1) of the training split, with each item's logQ
  (log of its share of the training positives).
- ``pretrain``: the entire space -- every training exposure, clicked or not -- with two
  distinct random scenarios per row for the user's views and two for the item's.

With ``labelled`` > 0 (``config.train.labelled_weight`` > 0; fine-tune stream only) each batch
also carries ``batch['labelled']``: ``labelled`` rows of a second endless sequence of seeded
permutations of *every* labelled training exposure (label 1 and 0: the entire space), batch i
covering its positions ``[i*B_l, (i+1)*B_l)`` -- also a pure function of (seed, i), so resuming
is unchanged -- as ``{'user', 'item': features, 'scenario': int32 [B_l], 'label': float32
[B_l]}``. With ``labelled`` = 0 the batch is exactly as before (no such key).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from sass_jax.data.store import PreparedData

# Extra seed word of the labelled exposures' permutations (distinct from the positives' order).
LABELLED_SALT = 104_729

if TYPE_CHECKING:  # grain is imported where the iterator is built (it is optional at import)
  import grain


def gather_features(table: dict, masks: dict, rows: np.ndarray) -> dict:
  """Feature dict for entity ``rows``: field -> ids [B] / [B, L]; '<field>_mask' -> bool [B, L]."""
  out = {name: np.asarray(col[rows], np.int32) for name, col in table.items()}
  out.update({f"{name}_mask": np.asarray(m[rows], bool) for name, m in masks.items()})
  return out


def item_logq(data: PreparedData) -> np.ndarray:
  """float32 [num_items]: log of each item's share of the training positives (unseen: 1 count)."""
  rows = data.rows("train", labeled_positive=True)
  counts = np.bincount(np.asarray(data.inter["item"])[rows], minlength=data.num_items)
  counts = np.maximum(counts, 1).astype(np.float64)
  return np.log(counts / counts.sum()).astype(np.float32)


class _EpochRows:
  """Position -> row of the endless concatenation of seeded permutations of ``rows``."""

  def __init__(self, rows: np.ndarray, seed: int, salt: tuple[int, ...] = ()):
    if len(rows) == 0:
      raise ValueError("the stream has no rows (check the split and the labels of the data)")
    self.rows, self.seed = np.asarray(rows, np.int64), int(seed)
    self.salt = tuple(int(x) for x in salt)  # () for the main streams: their permutations

  @functools.lru_cache(maxsize=4)
  def perm(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, epoch, *self.salt])
    return self.rows[rng.permutation(len(self.rows))]

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    n = len(self.rows)
    epochs, offsets = positions // n, positions % n
    out = np.empty(len(positions), np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self.perm(int(e))[offsets[sel]]
    return out


class BatchFn:
  """grain MapTransform-like callable: batch index -> dict of NumPy arrays (this process's part)."""

  def __init__(
    self,
    data: PreparedData,
    stream: str,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    labelled: int = 0,
  ):
    if stream not in ("finetune", "pretrain"):
      raise ValueError(f"unknown stream {stream!r}")
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    if labelled and stream != "finetune":
      raise ValueError(f"labelled exposures go with the fine-tune stream only, not {stream!r}")
    if labelled % process_count:
      raise ValueError(
        f"labelled batch size {labelled} is not divisible by {process_count} processes"
      )
    self.data, self.stream, self.seed = data, stream, int(seed)
    self.global_batch = int(batch_size)
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    rows = data.rows("train", labeled_positive=True if stream == "finetune" else None)
    self.positions = _EpochRows(rows, seed)
    self.logq = item_logq(data) if stream == "finetune" else None
    self.k = data.num_scenarios
    if stream == "pretrain" and self.k < 2:
      raise ValueError(
        "scenario-view pre-training needs at least 2 scenarios; the data has "
        f"{self.k} (set config.pretrain.num_steps=0)"
      )
    self.inter = {c: np.asarray(v) for c, v in data.inter.items()}
    self.labelled_global = int(labelled)
    self.labelled_local = self.labelled_global // process_count
    self.labelled_offset = process_index * self.labelled_local
    # Every labelled training exposure (label 1 and 0), in its own seeded order.
    self.labelled_positions = (
      _EpochRows(data.rows("train"), seed, salt=(LABELLED_SALT,)) if labelled else None
    )

  def __call__(self, index: int) -> dict:
    pos = np.arange(self.local, dtype=np.int64) + index * self.global_batch + self.offset
    rows = self.positions(pos)
    d = self.data
    u, it = self.inter["user"][rows], self.inter["item"][rows]
    batch = {
      "user": gather_features(d.users, d.user_masks, u),
      "item": gather_features(d.items, d.item_masks, it),
      "scenario": self.inter["scenario"][rows].astype(np.int32),
      "user_index": u.astype(np.int32),
      "item_index": it.astype(np.int32),
    }
    if self.stream == "finetune":
      batch["item_logq"] = self.logq[it]
      if self.labelled_positions is not None:
        batch["labelled"] = self.labelled_batch(index)
    else:
      # Views are drawn for the whole global batch and sliced, so they do not depend on the
      # number of processes.
      rng = np.random.default_rng([self.seed, 1_000_003, index])
      sl = slice(self.offset, self.offset + self.local)
      batch["user_views"] = _two_scenarios(rng, self.k, self.global_batch)[sl]
      batch["item_views"] = _two_scenarios(rng, self.k, self.global_batch)[sl]
    return batch

  def labelled_batch(self, index: int) -> dict:
    """``batch['labelled']`` of batch ``index``: this process's rows of labelled batch
    ``index`` (features, 'scenario' int32 and 'label' float32, each [B_l / processes])."""
    n = self.labelled_global
    pos = np.arange(self.labelled_local, dtype=np.int64) + index * n + self.labelled_offset
    rows = self.labelled_positions(pos)
    d = self.data
    return {
      "user": gather_features(d.users, d.user_masks, self.inter["user"][rows]),
      "item": gather_features(d.items, d.item_masks, self.inter["item"][rows]),
      "scenario": self.inter["scenario"][rows].astype(np.int32),
      "label": (self.inter["label"][rows] > 0.5).astype(np.float32),
    }


class BatchIterator:
  """``fn(0), fn(1), ...`` of a ``BatchFn`` called inline, in this thread: the grain pipeline's
  batches where grain is not installed (benchmarks; no ``get_state``, so not for training)."""

  def __init__(self, fn: BatchFn):
    self.fn, self.i = fn, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    b = self.fn(self.i)
    self.i += 1
    return b


def _two_scenarios(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
  """int32 [n, 2]: per row two distinct scenarios drawn uniformly from the k(k-1) ordered pairs."""
  a = rng.integers(0, k, n)
  b = (a + rng.integers(1, k, n)) % k
  return np.stack([a, b], 1).astype(np.int32)


def make_iterator(
  data: PreparedData,
  stream: str,
  batch_size: int,
  seed: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 4,
  threads: int = 2,
  labelled: int = 0,
) -> grain.DatasetIterator:
  """A checkpointable grain iterator over ``num_batches`` batches of ``stream``.

  Returns a ``grain.DatasetIterator``; ``get_state()`` / ``set_state()`` save and restore its
  position. Batches are dicts (see ``BatchFn``) of this process's ``batch_size / process_count``
  rows; ``labelled`` > 0 adds ``batch['labelled']`` (module docstring).
  """
  import grain  # here, so that BatchFn and the bench path import without grain

  fn = BatchFn(data, stream, batch_size, seed, process_index, process_count, labelled)
  ds = grain.MapDataset.range(num_batches).map(fn)
  return iter(
    ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  )
