"""Shared fixtures: the MovieLens sample location and a tiny SASS model config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sass_jax.schema import FieldSpec
from sass_jax.model.towers import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
ML_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "movielens_1m_sample"

TINY_USER_SPECS = (FieldSpec("user_id", 10), FieldSpec("gender", 3))
TINY_ITEM_SPECS = (
  FieldSpec("movie_id", 12),
  FieldSpec("genres", 5, multi_hot=3),
  FieldSpec("year", 4),
)


@pytest.fixture(scope="session")
def ml_sample_dir() -> Path:
  assert (ML_SAMPLE_DIR / "users.dat").is_file(), f"MovieLens sample missing at {ML_SAMPLE_DIR}"
  return ML_SAMPLE_DIR


@pytest.fixture
def tiny_cfg():
  """Factory: a small ModelConfig (K=3) over TINY_*_SPECS; keyword overrides allowed."""

  def make(**kw):
    base = dict(
      user_specs=TINY_USER_SPECS,
      item_specs=TINY_ITEM_SPECS,
      num_scenarios=3,
      embed_dim=4,
      scenario_dim=4,
      widths=(8, 6),
      out_dim=5,
      bias_hidden=4,
    )
    base.update(kw)
    return ModelConfig(**base)

  return make


@pytest.fixture
def tiny_features():
  """Factory: (user_features, item_features) of batch size B with ids inside TINY_*_SPECS."""

  def make(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    user = {
      "user_id": rng.integers(0, 10, batch).astype(np.int32),
      "gender": rng.integers(0, 3, batch).astype(np.int32),
    }
    mask = rng.random((batch, 3)) < 0.7
    mask[:, 0] = True
    item = {
      "movie_id": rng.integers(0, 12, batch).astype(np.int32),
      "genres": rng.integers(0, 5, (batch, 3)).astype(np.int32),
      "genres_mask": mask,
      "year": rng.integers(0, 4, batch).astype(np.int32),
    }
    return user, item

  return make


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The environment of a `python -m sass_jax.main` subprocess: this checkout on PYTHONPATH, CPU,
  one process, and a JAX compilation cache shared by the module's runs."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(
    os.environ,
    PYTHONPATH=str(REPO_ROOT),
    SASS_DISTRIBUTED="0",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
