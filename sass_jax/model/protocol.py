"""The two-tower model protocol (docs/design.md, "The two-tower model protocol").

Everything outside ``sass_jax/model/`` -- the steps and losses, the row-sparse optimisers, the
partitioner, checkpointing, evaluation, export -- uses a model only through this interface, so
it never branches on the model type. A model is a ``flax.linen.Module`` class built as
``Model(cfg)`` with ``cfg`` a ``sass_jax.model.towers.ModelConfig`` and registered under its
``config.model.name`` in ``sass_jax.model.registry`` (one line).

Layouts (``features``: the batch's fields of one side, ``{name: int32 [B]}`` or, for a multi-hot
field of length L, ``{name: int32 [B, L], name + '_mask': bool [B, L]}``; K =
``cfg.num_scenarios``; D the output width)::

    encode_user(features, scenario, train) / encode_item(features, scenario, train)
      selected:       scenario int32 [B]  -> float32 [B, D]     row b in its scenario[b]
      all-scenarios:  scenario None       -> float32 [B, K, D]  slice k: every row in scenario k
    __call__(user_features, item_features, scenario int32 [B], train) -> ([B, D], [B, D])

The vectors are L2-normalised (the score is ``<u, i> / config.model.tau``), the selected layout
equals the all-scenarios layout taken at each row's scenario (up to float rounding), and
``train`` switches dropout (rng 'dropout') and the updates of non-trained collections such as
STAR's ``'batch_stats'`` (the steps pass those collections as mutable when training).
``__call__`` is what ``init`` runs. Optional: ``rank_user`` / ``rank_item`` (same arguments
and layouts, width D' >= D): the vectors whose ``<u, i> / tau`` scores a labelled exposure
(the labelled BCE of fine-tuning, AUC and GAUC; ``ranking_methods``), when that score is not
the retrieval score (SASS's preference head, ``config.model.preference_dim``). Optional: ``encodes_views = True`` for a model that also
takes scenario int32 ``[B, V]`` -> ``[B, V, D]`` (V chosen scenarios per row) when
``cfg.scenario_compute == 'grouped'`` (SASS; pre-training then encodes only the two views).

Parameters: every param carries logical axes (``nn.with_logical_partitioning``; the partitioner
maps them, ``sass_jax.partition.RULES``). The embedding tables are exactly the params with the
'vocab' axis; with ``config.train.embedding_optimizer`` 'lazy_adam' / 'rowwise_adagrad'
(``sass_jax.train.sparse``) they must sit at ``params['user_tower']['embed'][field]`` and
``params['item_tower']['embed'][field]``, float32 ``[padded_rows(vocab_size, cfg.vocab_pad_to),
embed_dim]`` (``sass_jax.model.embedding.FieldEmbedder`` named 'embed' in a submodule named
'user_tower' / 'item_tower'), addressed directly by the batch ids, and the model must rebuild
with ``model.clone(cfg=dataclasses.replace(cfg, user_specs=..., item_specs=...,
vocab_pad_to=1))`` over smaller tables. A model whose tables are laid out otherwise (DSSM-S
with separate per-scenario tables) trains with the dense optimiser only (``find_tables``
raises naming the table).

Settings: ``config_problems(model_cfg)`` (a classmethod) returns one line per bad value of the
model's *own* ``config.model`` settings, each naming the field (``config.model.<key>=<value>:
expected ...``), [] when they are fine. ``sass_jax.config_check`` reports them with the other
problems before any work, and ``registry.build`` raises them; the settings every model shares
are checked there and by ``ModelConfig.from_config``.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import jax.numpy as jnp


@runtime_checkable
class TwoTowerModel(Protocol):
  """What a registered model provides (module docstring: layouts, shapes, dtypes, tables).

  ``isinstance(model, TwoTowerModel)`` checks that the members exist, not their signatures.
  """

  cfg: Any  # sass_jax.model.towers.ModelConfig: a frozen dataclass (jit-static, hashable)

  @classmethod
  def config_problems(cls, model_cfg) -> list[str]:
    """One line per bad value of the model's own ``config.model`` settings; [] when none."""
    ...

  def encode_user(
    self, features: Mapping[str, jnp.ndarray], scenario=None, train: bool = False
  ) -> jnp.ndarray:
    """float32 ``[B, D]`` (scenario int32 ``[B]``) or ``[B, K, D]`` (scenario None)."""
    ...

  def encode_item(
    self, features: Mapping[str, jnp.ndarray], scenario=None, train: bool = False
  ) -> jnp.ndarray:
    """float32 ``[B, D]`` (scenario int32 ``[B]``) or ``[B, K, D]`` (scenario None)."""
    ...

  def __call__(
    self,
    user_features: Mapping[str, jnp.ndarray],
    item_features: Mapping[str, jnp.ndarray],
    scenario,
    train: bool = False,
  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(user ``[B, D]``, item ``[B, D]``) in the rows' scenarios; what ``init`` runs."""
    ...


RANK_METHODS = ("rank_user", "rank_item")


def ranking_methods(model) -> tuple[str, str]:
  """The (user, item) method names whose vectors score labelled exposures: ``RANK_METHODS``
  when the model has them and they differ from the retrieval vectors (SASS with
  ``cfg.preference_dim`` > 0), else ('encode_user', 'encode_item') (the retrieval score is
  the ranking score)."""
  pdim = int(getattr(getattr(model, "cfg", None), "preference_dim", 0) or 0)
  if pdim > 0 and all(hasattr(model, m) for m in RANK_METHODS):
    return RANK_METHODS
  return ("encode_user", "encode_item")
