"""Data sources, the prepared store and the input pipeline (docs/design.md §4).

Every source module exposes ``prepare(data_cfg, out_dir) -> Path`` that reads the source's real
released layout and writes a store (``sass_jax.data.store.write_store``).
"""

from __future__ import annotations

import importlib
from typing import Callable

# config.data.name -> "module:function" (imported on first use, so one source's optional
# dependencies never affect another).
_PREPARERS = {
  "movielens": "sass_jax.data.movielens:prepare",
  "douban_gadtcdr": "sass_jax.data.douban:prepare_gadtcdr",
  "douban_sample": "sass_jax.data.douban:prepare_sample",
  "amazon_cdrib": "sass_jax.data.amazon:prepare",
  "mind": "sass_jax.data.mind:prepare",
  "aliccp": "sass_jax.data.aliccp:prepare",
  "kuairand": "sass_jax.data.kuairand:prepare",
  "table": "sass_jax.data.table:prepare",
  "synthetic": "sass_jax.data.synthetic:prepare",
}
PREPARERS = tuple(_PREPARERS)


def get_preparer(name: str) -> Callable:
  """The ``prepare(data_cfg, out_dir)`` function of data set ``name``.

  Raises ValueError listing the known names for an unknown one.
  """
  if name not in _PREPARERS:
    raise ValueError(f"config.data.name={name!r}; expected one of {sorted(_PREPARERS)}")
  module, fn = _PREPARERS[name].split(":")
  return getattr(importlib.import_module(module), fn)
