"""Field embeddings shared by all scenarios (docs/design.md §1, "a shared embedding layer")."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from sass_jax.schema import FieldSpec


# Tables of at least LARGE_TABLE_ROWS rows are padded to a multiple of lcm(pad_to,
# LARGE_TABLE_PAD_TO): their rows then split evenly over any power-of-two number of devices up
# to 1,024 (whatever the mesh, so a checkpoint restores on any mesh), for at most 1/64 more rows.
LARGE_TABLE_PAD_TO = 1024
LARGE_TABLE_ROWS = 64 * LARGE_TABLE_PAD_TO


def padded_rows(vocab_size: int, pad_to: int) -> int:
  """Embedding table rows for ``vocab_size`` ids (>= 1).

  ``pad_to`` > 1: ``vocab_size`` rounded up to a multiple of ``pad_to``, and a table of at least
  ``LARGE_TABLE_ROWS`` (65,536) rows further to a multiple of ``lcm(pad_to, 1024)``, so that it
  row-splits evenly over 2, 4, ..., 1024 devices (and over ``pad_to`` devices).
  ``pad_to`` = 1: exactly ``vocab_size`` rows (no padding; the row-sparse view of
  ``sass_jax.train.sparse`` uses it for its gathered buffers).
  The padding depends on the vocabulary only, never on the mesh, so a checkpoint restores on
  any mesh. Padded rows are never looked up because ids are < vocab_size.
  """
  pad_to = max(1, int(pad_to))
  rows = -(-int(vocab_size) // pad_to) * pad_to
  if pad_to > 1 and rows >= LARGE_TABLE_ROWS:
    big = math.lcm(pad_to, LARGE_TABLE_PAD_TO)
    rows = -(-rows // big) * big
  return rows


def repadded(saved_rows: int, rows: int) -> bool:
  """Whether a table of ``rows`` rows is the same table as one of ``saved_rows`` saved before
  large tables were padded to a multiple of 1024 (``padded_rows``): it was large
  (``saved_rows >= LARGE_TABLE_ROWS``), ``rows`` is a multiple of 1024 and adds less than a
  64th. Checkpoints of such tables restore with the added rows zero (never addressed)."""
  saved_rows, rows = int(saved_rows), int(rows)
  return (
    saved_rows >= LARGE_TABLE_ROWS
    and rows > saved_rows
    and rows % LARGE_TABLE_PAD_TO == 0
    and (rows - saved_rows) * 64 < rows
  )


class FieldEmbedder(nn.Module):
  """Looks up every field of one tower and concatenates the vectors.

  Attributes:
    specs: the tower's fields (FieldSpec: name, vocab_size, multi_hot length or 0).
    dim: embedding size d per field.
    pad_to: table rows rounded up to a multiple of this.
    dtype: compute dtype of the output (parameters stay float32).

  Call: ``features`` maps field name -> int32 ids ``[..., ]`` (single) or ``[..., L]``
  (multi-hot, with bool ``[..., L]`` mask under ``"<name>_mask"``; mean-pooled over the mask).
  Returns ``[..., F * d]`` in ``dtype``. Each table is a param ``[rows, d]`` with logical axes
  ``('vocab', 'embed')`` so the partitioner can row-shard it over the 'model' axis.
  Raises KeyError naming the field if a feature is missing.
  """

  specs: Sequence[FieldSpec]
  dim: int
  pad_to: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    outs = []
    for s in self.specs:
      if s.name not in features:
        raise KeyError(f"feature {s.name!r} missing from the batch (have {sorted(features)})")
      table = self.param(
        s.name,
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.1), ("vocab", "embed")),
        (padded_rows(s.vocab_size, self.pad_to), self.dim),
        jnp.float32,
      )
      ids = features[s.name]
      e = jnp.take(table, ids, axis=0).astype(self.dtype)
      if s.multi_hot:
        m = features[f"{s.name}_mask"].astype(self.dtype)[..., None]
        e = (e * m).sum(-2) / jnp.maximum(m.sum(-2), 1.0)
      outs.append(e)
    return jnp.concatenate(outs, axis=-1)
