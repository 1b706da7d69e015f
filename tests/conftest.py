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


# ---- the fast tier (launch/test.sh --fast = pytest -m "not slow") ------------------------------
# Tests marked 'slow' here are left out of the fast tier: whole training runs, subprocess CLI
# runs and compiles that each take seconds to minutes. The list was chosen from
# `pytest --durations=0` of the whole suite (everything over 3 s on 2 cores, and the tests that
# then paid for a slow test's module fixture); the fast tier still touches every module under
# sass_jax/. A name is a test file, or a file plus a test-function prefix ('file::test_x'
# marks every parametrisation of test_x).
SLOW_TESTS: tuple[str, ...] = (
  "test_mesh_restore.py",
  "test_precision.py",
  "test_resident_train.py",
  "test_resume.py",
  "test_sharding.py",
  "test_aot.py::test_all_device_tables_match_one_device",
  "test_aot.py::test_compile_mode_for_a_tpu_topology",
  "test_aot.py::test_preflight_refuses_a_step_over_the_memory_limit",
  "test_aot.py::test_row_sparse_steps_run_the_towers_on_the_chips_share_of_the_batch",
  "test_bad_inputs_data.py::test_cli_prepare_of_doubled_ratings_names_both_lines_and_writes_nothing",
  "test_bad_inputs_data.py::test_movielens_duplicate_policies_and_row_accounting",
  "test_bad_inputs_run.py::test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint",
  "test_bad_inputs_run.py::test_eval_refuses_an_unreadable_latest_step",
  "test_bad_inputs_run.py::test_export_cut_short_leaves_the_previous_export_whole",
  "test_bad_inputs_run.py::test_exported_encoder_rejects_out_of_range_inputs",
  "test_bad_inputs_run.py::test_misspelt_config_key_is_one_line",
  "test_bad_inputs_run.py::test_second_run_on_a_busy_workdir_fails_at_once",
  "test_baselines.py::test_cli_train_end_to_end",
  "test_baselines.py::test_dssm_single_scenarios_are_independent",
  "test_baselines.py::test_finetune_loss_decreases",
  "test_baselines.py::test_layouts_shapes_and_finite_loss",
  "test_baselines.py::test_star_eval_uses_each_scenarios_running_statistics",
  "test_bench.py::test_bench_cli_json_every_field",
  "test_bench.py::test_every_field_present_and_positive",
  "test_bench.py::test_json_written_and_returned",
  "test_bench.py::test_stats_consistent",
  "test_bench_scripts.py::test_scaling_flops_only_counts_each_scenario_path",
  "test_bench.py::test_torch_reference_same_losses_and_adamw_step",
  "test_cli_errors.py::test_cli_recommend_k0_is_one_error_line_and_debug_keeps_the_traceback",
  "test_cli_errors.py::test_eval_with_other_data_dir_refuses_to_replace_the_trained_data",
  "test_cli_errors.py::test_other_data_options_name_every_differing_field",
  "test_cli_errors.py::test_sigint_during_training_checkpoints_and_exits_zero",
  "test_config_validation.py::test_cli_rejects_unknown_key_and_invalid_value",
  "test_end_to_end.py::test_metrics_file_shape",
  "test_end_to_end.py::test_short_run_learns_beyond_random",
  "test_export.py::test_cli_export_to_config_dir",
  "test_export.py::test_cli_recommend",
  "test_export.py::test_layout_and_manifest",
  "test_export.py::test_recommend_matches_evaluation_ranking",
  "test_export.py::test_user_encoder_matches_model",
  "test_losses.py::test_finetune_step_reduces_loss",
  "test_losses.py::test_pretrain_loss_scenario_views_wiring",
  "test_losses.py::test_pretrain_step_reduces_loss",
  "test_model.py::test_all_scenarios_slice_equals_selected",
  "test_model.py::test_different_scenarios_give_different_vectors",
  "test_model.py::test_tower_shapes_and_unit_norm",
  "test_model.py::test_user_and_item_towers_have_separate_weights",
  "test_monitor.py::test_eval_metrics_per_scenario",
  "test_monitor.py::test_training_scalars_equal_the_jsonl_log",
  "test_multihost.py::test_two_processes_match_one_process",
  "test_registry.py::test_every_registered_model_satisfies_the_protocol",
  "test_registry.py::test_toy_model_appears_in_compare_results",
  "test_registry.py::test_toy_model_trains_with_row_sparse_tables_and_evaluates",
  "test_scenario_compute.py::test_bfloat16_every_model_and_layout_runs_and_agrees",
  "test_scenario_compute.py::test_grouped_bfloat16_close_to_onehot",
  "test_scenario_compute.py::test_grouped_does_less_arithmetic",
  "test_scenario_compute.py::test_grouped_equals_onehot",
  "test_scenario_compute.py::test_grouped_matmul_equals_per_row_kernel",
  "test_scenario_compute.py::test_same_scenario_negatives_reference",
  "test_scenario_compute.py::test_torch_reference_grouped_equals_onehot_and_jax",
  "test_scenario_compute.py::test_sass_views_equal_all_scenarios_slices",
  "test_scenario_compute.py::test_scenario_logits_grouped_equals_onehot_and_loop",
  "test_sparse.py::test_masked_dense_reference_equals_sparse",
  "test_sparse.py::test_non_table_params_match_dense_step",
  "test_sparse.py::test_sparse_update_matches_numpy_reference",
  "test_sparse.py::test_train_stage_sparse_checkpoint_resume",
  "test_synthetic_learning.py::test_sass_beats_shared_tower_in_every_scenario",
)


# Module fixtures that train a model first ('file::fixture'): every test using one is slow, so
# that no fast test pays for the training run.
SLOW_FIXTURES = (
  "test_bad_inputs_run.py::trained",
  "test_cli_errors.py::trained",
  "test_compare.py::compared",
  "test_monitor.py::run",
)


def pytest_collection_modifyitems(config, items):
  for item in items:
    path, _, name = item.nodeid.partition("::")
    file = path.rsplit("/", 1)[-1]
    func = name.split("[", 1)[0]
    uses = {f"{file}::{f}" for f in getattr(item, "fixturenames", ())}
    if file in SLOW_TESTS or f"{file}::{func}" in SLOW_TESTS or uses & set(SLOW_FIXTURES):
      item.add_marker(pytest.mark.slow)
