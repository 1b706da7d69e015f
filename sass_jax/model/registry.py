"""``config.model.name`` -> the model: the one list of models (docs/design.md, "The two-tower
model protocol").

To add a model: write its module (a Flax module class implementing
``sass_jax.model.protocol.TwoTowerModel``) and add one line to ``MODELS`` below. The trainer,
the config checks, ``--mode compare`` / ``compile`` / ``export`` / ``bench`` and the tests read
the names and the per-model facts from here. Tests (or code outside the package) register a
model the same way, ``MODELS[name] = Entry(Model)`` (e.g. ``monkeypatch.setitem``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from sass_jax.model.baselines import PLE, STAR, DSSMMixed, DSSMSingle, MMoE, SharedBottom
from sass_jax.model.protocol import TwoTowerModel
from sass_jax.model.towers import SASS, ModelConfig
from sass_jax.schema import FieldSpec


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered model.

  Attributes:
    model: the Flax module class (``TwoTowerModel``), built as ``model(ModelConfig)``; its
      classmethod ``config_problems`` checks its own settings.
    pretrains: the model's protocol includes stage 1, pre-training (docs/design.md §2): True
      for SASS. ``--mode compare`` runs a model without it with ``pretrain.num_steps = 0``
      (docs/design.md §3: the baselines have no pre-training stage); ``--mode train`` runs
      whatever ``config.pretrain.num_steps`` says.
    non_structural: the model's own ``config.model`` keys that change no parameter shape, so a
      checkpoint may be resumed with other values (beyond the shared
      ``config_check.MODEL_NON_STRUCTURAL``).
  """

  model: type
  pretrains: bool = False
  non_structural: tuple[str, ...] = ()


# The models, in the order of the results tables. One line per model.
MODELS: dict[str, Entry] = {
  "sass": Entry(SASS, pretrains=True),
  "dssm_single": Entry(DSSMSingle),
  "dssm_mixed": Entry(DSSMMixed),
  "shared_bottom": Entry(SharedBottom),
  "mmoe": Entry(MMoE),
  "ple": Entry(PLE),
  "star": Entry(STAR, non_structural=("star_momentum",)),
}


def names() -> tuple[str, ...]:
  """The registered model names, in registration order."""
  return tuple(MODELS)


def get(name: str) -> Entry:
  """The entry of model ``name``. Raises ValueError (one line naming config.model.name and the
  known names) for an unknown one."""
  entry = MODELS.get(name) if isinstance(name, str) else None
  if entry is None:
    raise ValueError(
      f"config.model.name={name!r} is not a known model; expected one of {sorted(MODELS)}"
    )
  return entry


def config_problems(model_cfg) -> list[str]:
  """The problems of ``config.model``'s model-specific settings: one line each (the unknown
  name, else the model's ``config_problems``); [] when there are none."""
  try:
    entry = get(model_cfg.name)
  except ValueError as e:
    return [str(e)]
  out = list(entry.model.config_problems(model_cfg))
  if model_cfg.get("score_bias", False) and entry.model is not SASS:
    out.append(
      f"config.model.score_bias=True is a setting of SASS only; {model_cfg.name!r} has no "
      "score biases: set it False"
    )
  pdim = model_cfg.get("preference_dim", 0)
  if pdim and entry.model is not SASS:
    out.append(
      f"config.model.preference_dim={pdim!r} is a setting of SASS only; {model_cfg.name!r} has "
      "no preference head: set it 0"
    )
  return out


def non_structural_keys() -> tuple[str, ...]:
  """Every registered model's own keys that change no parameter shape (``Entry``)."""
  return tuple(sorted({k for e in MODELS.values() for k in e.non_structural}))


def build(
  model_cfg, user_specs: Sequence[FieldSpec], item_specs: Sequence[FieldSpec], num_scenarios: int
) -> TwoTowerModel:
  """The model named by ``config.model.name`` (``model_cfg``) for these fields and K scenarios.

  Raises ValueError: the unknown name or the model's own bad settings (``config_problems``,
  joined with '; '), or a bad shared setting (``ModelConfig.from_config``).
  """
  problems = config_problems(model_cfg)
  if problems:
    raise ValueError("; ".join(problems))
  entry = get(model_cfg.name)
  return entry.model(ModelConfig.from_config(model_cfg, user_specs, item_specs, num_scenarios))
