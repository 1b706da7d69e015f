"""Tests for sass_jax.checkpoint (docs/design.md §6: orbax checkpoints)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sass_jax.checkpoint import Checkpointer

REPO_ROOT = Path(__file__).resolve().parents[1]

# orbax logs through absl -> python logging; keep test output quiet.
logging.getLogger("absl").setLevel(logging.WARNING)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 []
  params: dict  # nested dict of arrays
  opt_state: optax.OptState  # (ScaleByAdamState, EmptyState)
  rng: jax.Array  # uint32 [2]


def _make_state(seed: int = 0, step: int = 1) -> TrainState:
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
    "dense": {
      "kernel": jax.random.normal(k1, (3, 5), jnp.float32),
      "bias": jnp.arange(5, dtype=jnp.float32) + seed,
    },
    "scale": jax.random.normal(k2, (4,), jnp.float32),
  }
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    opt_state=opt_state,
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def _assert_tree_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)


METADATA = {"stage": "finetune", "config": {"lr": 0.001, "layers": [2, 4], "name": "x"}}


def test_state_is_nontrivial():
  s = _make_state()
  adam = s.opt_state[0]
  assert int(adam.count) == 1
  assert all(np.abs(np.asarray(x)).min() > 0 for x in jax.tree.leaves(adam.mu))
  assert all(np.asarray(x).min() > 0 for x in jax.tree.leaves(adam.nu))


def test_save_restore_roundtrip(tmp_path):
  s1 = _make_state(seed=0, step=1)
  s2 = _make_state(seed=1, step=2)
  with Checkpointer(tmp_path / "ft", max_to_keep=3) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(1, s1, metadata=METADATA, data_state={"step": 7})
    assert ckpt.save(2, s2, metadata={**METADATA, "stage": "s2"}, data_state={"step": 14})
    assert ckpt.latest_step() == 2
    assert ckpt.all_steps() == [1, 2]

    abstract = jax.eval_shape(lambda: s1)
    restored, meta, data_state = ckpt.restore(abstract)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert isinstance(restored.opt_state[1], optax.EmptyState)
    _assert_tree_equal(restored, s2)
    assert int(restored.step) == 2
    assert meta == {**METADATA, "stage": "s2"}
    assert data_state == {"step": 14}
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))

    # Explicit older step; concrete target (its values must be ignored).
    target = jax.tree.map(jnp.zeros_like, s2)
    restored1, meta1, data_state1 = ckpt.restore(target, step=1)
    _assert_tree_equal(restored1, s1)
    assert int(restored1.step) == 1
    assert meta1 == METADATA
    assert data_state1 == {"step": 7}
    # s1 and s2 really differ, so the above is not vacuous.
    assert not np.array_equal(
      np.asarray(restored1.params["dense"]["kernel"]),
      np.asarray(s2.params["dense"]["kernel"]),
    )

    params = ckpt.restore_params(abstract.params)
    _assert_tree_equal(params, s2.params)
    params1 = ckpt.restore_params(abstract.params, step=1)
    _assert_tree_equal(params1, s1.params)

    with pytest.raises(FileNotFoundError, match="step 5"):
      ckpt.restore(abstract, step=5)


def test_reopen_and_no_data_state(tmp_path):
  s = _make_state(seed=3, step=10)
  d = tmp_path / "pre"
  with Checkpointer(d) as ckpt:
    ckpt.save(10, s, metadata={"stage": "pretrain"})
  # Fresh manager (as in a new process) sees the checkpoint.
  with Checkpointer(d) as ckpt:
    assert ckpt.latest_step() == 10
    restored, meta, data_state = ckpt.restore(jax.eval_shape(lambda: s))
    _assert_tree_equal(restored, s)
    assert meta == {"stage": "pretrain"}
    assert data_state is None


def test_metadata_numpy_values_are_converted(tmp_path):
  with Checkpointer(tmp_path / "m") as ckpt:
    ckpt.save(
      1,
      _make_state(),
      metadata={"lr": np.float32(0.5), "shape": (2, 3), "n": np.int64(7)},
      data_state={"pos": np.arange(3)},
    )
    _, meta, data_state = ckpt.restore(jax.eval_shape(_make_state))
  assert meta == {"lr": 0.5, "shape": [2, 3], "n": 7}
  assert data_state == {"pos": [0, 1, 2]}


def test_max_to_keep(tmp_path):
  with Checkpointer(tmp_path / "k", max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.save(step, _make_state(seed=step, step=step), metadata={})
    assert ckpt.all_steps() == [2, 3]
    assert ckpt.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / "k").iterdir() if p.name.isdigit()) == ["2", "3"]
  restored, _, _ = Checkpointer(tmp_path / "k").restore(
    jax.eval_shape(lambda: _make_state()), step=2
  )
  _assert_tree_equal(restored, _make_state(seed=2, step=2))


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path / "i", save_interval_steps=5) as ckpt:
    s = _make_state()
    assert ckpt.save(0, s) is True
    assert ckpt.save(3, s) is False
    assert ckpt.save(5, s) is True
    assert ckpt.save(7, s, force=True) is True
    assert ckpt.all_steps() == [0, 5, 7]


def test_async_save(tmp_path):
  states = {k: _make_state(seed=k, step=k) for k in (1, 2, 3)}
  ckpt = Checkpointer(tmp_path / "a", async_save=True, max_to_keep=2)
  for k, s in states.items():
    assert ckpt.save(k, s, metadata={"a": k}, data_state={"pos": 10 * k})
    assert ckpt.latest_step() == k  # in-flight step is already tracked
  # restore waits for the pending save of step 3.
  restored, meta, data_state = ckpt.restore(jax.eval_shape(lambda: states[1]))
  _assert_tree_equal(restored, states[3])
  assert meta == {"a": 3} and data_state == {"pos": 30}
  ckpt.close()
  assert Checkpointer(tmp_path / "a").all_steps() == [2, 3]


def test_restore_empty_dir_raises(tmp_path):
  d = tmp_path / "empty_stage"
  with Checkpointer(d) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError) as ei:
      ckpt.restore(jax.eval_shape(lambda: _make_state()))
    assert str(d) in str(ei.value)
    with pytest.raises(FileNotFoundError) as ei:
      ckpt.restore_params({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert str(d) in str(ei.value)


def test_interrupted_save_is_not_latest(tmp_path):
  d = tmp_path / "tmpdir"
  s = _make_state()
  with Checkpointer(d) as ckpt:
    ckpt.save(1, s)
  # Simulate a save of step 2 killed before the final rename.
  (d / "2.orbax-checkpoint-tmp-123").mkdir()
  with Checkpointer(d) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    restored, _, _ = ckpt.restore(jax.eval_shape(lambda: s))
    _assert_tree_equal(restored, s)


_RESHARD_SCRIPT = textwrap.dedent(
  """
    import os, sys, tempfile
    assert "jax" not in sys.modules
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
    from sass_jax.checkpoint import Checkpointer

    assert jax.device_count() == 8, jax.devices()
    auto = (jax.sharding.AxisType.Auto,)
    mesh8 = jax.make_mesh((8,), ("model",), axis_types=auto)
    row8 = NamedSharding(mesh8, P("model", None))
    value = np.arange(64, dtype=np.float32).reshape(16, 4) * 1.5 - 7.0
    x = jax.device_put(value, row8)
    assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (2, 4)
    state = {"params": {"w": x, "b": jax.device_put(np.arange(8, dtype=np.int32), NamedSharding(mesh8, P("model")))},
             "step": jnp.int32(3)}

    d = tempfile.mkdtemp()
    with Checkpointer(d) as ckpt:
        assert ckpt.save(3, state, metadata={"mesh": 8})

    # 1) different mesh: 4 devices, rows sharded -> 4 shards of [4, 4].
    mesh4 = jax.make_mesh((4,), ("data",), axis_types=auto, devices=jax.devices()[4:])
    row4 = NamedSharding(mesh4, P("data", None))
    rep4 = NamedSharding(mesh4, P())
    abstract = {"params": {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=row4),
                           "b": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep4)},
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep4)}
    with Checkpointer(d) as ckpt:
        restored, meta, _ = ckpt.restore(abstract)
        w = restored["params"]["w"]
        assert w.sharding == row4, w.sharding
        assert restored["params"]["b"].sharding == rep4
        assert {s.device for s in w.addressable_shards} == set(jax.devices()[4:])
        assert all(s.data.shape == (4, 4) for s in w.addressable_shards)
        np.testing.assert_array_equal(np.asarray(w), value)
        np.testing.assert_array_equal(np.asarray(restored["params"]["b"]), np.arange(8))
        assert int(restored["step"]) == 3 and meta == {"mesh": 8}

        # 2) single device, params only.
        dev = jax.devices()[5]
        single = SingleDeviceSharding(dev)
        params = ckpt.restore_params(
            {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=single),
             "b": jax.ShapeDtypeStruct((8,), jnp.int32, sharding=single)})
        assert params["w"].sharding == single, params["w"].sharding
        assert params["w"].devices() == {dev}
        np.testing.assert_array_equal(np.asarray(params["w"]), value)
        np.testing.assert_array_equal(np.asarray(params["b"]), np.arange(8))

        # 3) 2-D mesh with column sharding, full restore.
        mesh2x2 = jax.make_mesh((2, 2), ("a", "b"), axis_types=auto * 2, devices=jax.devices()[:4])
        col = NamedSharding(mesh2x2, P("a", "b"))
        abstract["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=col)
        restored, _, _ = ckpt.restore(abstract)
        assert restored["params"]["w"].sharding == col
        assert all(s.data.shape == (8, 2) for s in restored["params"]["w"].addressable_shards)
        np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), value)
    print("RESHARD_OK")
    """
)


def test_restore_onto_different_mesh():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  proc = subprocess.run(
    [sys.executable, "-c", _RESHARD_SCRIPT],
    cwd=REPO_ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  assert "RESHARD_OK" in proc.stdout


def _table_state(rows: int, dim: int = 4, seed: int = 0) -> dict:
  r = np.random.default_rng(seed)
  table = jnp.asarray(r.normal(size=(rows, dim)), jnp.float32)
  return {
    "params": {"embed": {"user_id": table}, "bias": jnp.ones(3)},
    "opt_state": {"m": table * 0.5, "acc": jnp.ones(rows)},
  }


def _abstract(state: dict, rows: int | None = None, dim: int | None = None) -> dict:
  def one(x):
    shape = x.shape
    if rows is not None and shape and shape[0] == state["opt_state"]["acc"].shape[0]:
      shape = (rows, *shape[1:])
    if dim is not None and len(shape) == 2:
      shape = (shape[0], dim)
    return jax.ShapeDtypeStruct(shape, x.dtype)

  return jax.tree.map(one, state)


def test_a_table_saved_before_the_1024_row_padding_restores_zero_padded(tmp_path, caplog):
  from sass_jax.model.embedding import padded_rows

  old_rows, new_rows = 70_000, padded_rows(70_000, 8)  # a multiple of 8 then, of 1024 now
  assert new_rows == 70_656
  saved = _table_state(old_rows)
  with Checkpointer(tmp_path / "ck") as c:
    c.save(5, saved, metadata={"stage": "finetune"})
  with Checkpointer(tmp_path / "ck") as c, caplog.at_level(logging.WARNING, "sass_jax"):
    state, _, _ = c.restore(_abstract(saved, rows=new_rows))
    params = c.restore_params(_abstract(saved, rows=new_rows)["params"])
  assert "params/embed/user_id: 70,000 -> 70,656 rows" in caplog.text
  for got in (state["params"]["embed"]["user_id"], params["embed"]["user_id"]):
    got = np.asarray(got)
    assert got.shape == (new_rows, 4)
    np.testing.assert_array_equal(got[:old_rows], np.asarray(saved["params"]["embed"]["user_id"]))
    assert not got[old_rows:].any()
  np.testing.assert_array_equal(np.asarray(state["opt_state"]["acc"])[old_rows:], 0)


def test_a_checkpoint_of_another_model_is_one_error_naming_the_leaf(tmp_path):
  from sass_jax.checkpoint import CheckpointMismatchError

  saved = _table_state(1000)
  with Checkpointer(tmp_path / "ck") as c:
    c.save(1, saved, metadata={})
    c.save(2, saved, metadata={})
  with Checkpointer(tmp_path / "ck") as c:
    # another embedding size: not a padding difference, and no fallback to step 1 either
    with pytest.raises(CheckpointMismatchError) as e:
      c.restore(_abstract(saved, dim=8))
    assert c.restored_step is None and not c.unreadable_steps
    # a table that grew by more than the padding (another vocabulary)
    with pytest.raises(
      CheckpointMismatchError, match=r"saved with shape \(1000, 4\) .* \(70656, 4\)"
    ):
      c.restore_params(_abstract(saved, rows=70_656)["params"])
  msg = str(e.value)
  assert "checkpoint step 2 in" in msg and "opt_state/m is saved" in msg  # the first leaf
  assert "(1000, 4)" in msg and "(1000, 8)" in msg and "\n" not in msg
