"""Data sources, the prepared store and the input pipeline (SPEC section 4)."""
from sass_jax.data import movielens

# config.data.name -> prepare(data_cfg, out_dir) -> Path
PREPARERS = {"movielens": movielens.prepare}
