"""The field schema shared by the data and the model packages (docs/design.md §4).

A prepared store's manifest lists each tower's fields as ``FieldSpec`` dicts
(``sass_jax.data.store``); the model builds one embedding table per field
(``sass_jax.model.embedding``). Plain Python: importing it pulls in neither JAX nor Flax.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """One categorical feature field of a tower.

  Attributes:
    name: field name, e.g. ``"user_id"`` or ``"genres"``.
    vocab_size: number of ids including the unknown id 0 (ids lie in ``[0, vocab_size)``).
    multi_hot: 0 for a single id per row (column ``int32 [N]``); otherwise the padded length L
      of a multi-hot field (column ``int32 [N, L]`` with a ``bool [N, L]`` mask).
  """

  name: str
  vocab_size: int
  multi_hot: int = 0
