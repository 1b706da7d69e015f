"""A sharded step over 8 fake CPU devices equals the 1-device step (docs/design.md §6).

Runs in a subprocess because the device count must be fixed before JAX starts.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "movielens_1m_sample"

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from configs import test as test_config
    from sass_jax.data import pipeline
    from sass_jax.partition import Partitioner
    from sass_jax.train import loop, steps

    assert len(jax.devices()) == 8, jax.devices()
    cfg = test_config.get_config()
    cfg.data.dir = sys.argv[1]
    cfg.mesh.shard_min_rows = 0
    data = loop.prepare(cfg, sys.argv[2])
    model = loop.build_model(cfg, data)

    def run(part, stage, n):
        scfg = cfg.pretrain if stage == "pretrain" else cfg.train
        tx = steps.make_optimizer(scfg, 100)
        state, sh = part.init(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
        if stage == "pretrain":
            fn = steps.make_pretrain_step(model, tx, scfg.tau)
        else:
            fn = steps.make_finetune_step(model, tx, cfg.model.tau, 1.0)
        fn = part.compile_step(fn, sh)
        it = pipeline.make_iterator(data, stage, scfg.batch_size, 0, n)
        losses = []
        for _ in range(n):
            state, m = fn(state, part.shard_batch(next(it)))
            losses.append(float(m["loss"]))
        return state, losses

    one = Partitioner(cfg.mesh.__class__({"data": 1, "model": 1, "shard_min_rows": 0,
                                           "table_layout": "auto"}),
                      devices=jax.devices()[:1])
    eight = Partitioner(cfg.mesh.__class__({"data": 2, "model": 4, "shard_min_rows": 0,
                                             "table_layout": "model"}))
    assert dict(eight.mesh.shape) == {"data": 2, "model": 4}
    for stage, n in (("finetune", 5), ("pretrain", 3)):
        s1, l1 = run(one, stage, n)
        s8, l8 = run(eight, stage, n)
        table = s8.params["user_tower"]["embed"]["user_id"]
        assert table.sharding.spec == P("model", None), table.sharding
        assert len({d for d in table.sharding.device_set}) == 8
        shard_rows = {s.data.shape[0] for s in table.addressable_shards}
        assert shard_rows == {table.shape[0] // 4}, shard_rows
        np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
        assert l1[0] != l1[-1]
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        print(stage, "losses", l1, "match")

    # Every embedding table (rows >= shard_min_rows) is row-split over 'model', its Adam
    # moments too; every other parameter (dense, per-scenario, scenario embedding) replicated.
    assert eight.data_shard() == (0, 1)      # one process feeds the whole global batch
    split = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(s8.params)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if "embed" in keys:
            assert leaf.sharding.spec == P("model", None), (keys, leaf.sharding)
            assert {s.data.shape[0] for s in leaf.addressable_shards} == {leaf.shape[0] // 4}
            split += 1
        else:
            assert leaf.sharding.is_fully_replicated, (keys, leaf.sharding)
    assert split == 8, split                  # 5 user + 3 item fields
    moments = [x for x in jax.tree.leaves(s8.opt_state) if x.shape == table.shape]
    assert len(moments) == 2 and all(x.sharding.spec == P("model", None) for x in moments)
    # The threshold: with shard_min_rows above every vocabulary the tables are replicated.
    big = Partitioner(cfg.mesh.__class__({"data": 2, "model": 4, "shard_min_rows": 10**9,
                                           "table_layout": "auto"}))
    tx = steps.make_optimizer(cfg.train, 100)
    _, sh = big.abstract_state(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
    assert sh.params["user_tower"]["embed"]["user_id"].spec == P(None, None)
    user_rows = table.shape[0]
    mid = Partitioner(cfg.mesh.__class__({"data": 2, "model": 4, "shard_min_rows": user_rows,
                                          "table_layout": "model"}))
    _, sh = mid.abstract_state(steps.make_init_fn(model, tx, loop.example_batch(data), 0))
    assert sh.params["user_tower"]["embed"]["user_id"].spec == P("model", None)
    assert sh.params["user_tower"]["embed"]["gender"].spec == P(None, None)
    print("OK")
""")

TOPK_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import AxisType
    from sass_jax.eval.retrieval import sharded_topk_scores, topk_scores

    assert jax.device_count() == 8
    auto = (AxisType.Auto,) * 2
    mesh24 = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
    mesh18 = jax.make_mesh((1, 8), ("data", "model"), axis_types=auto)
    rng = np.random.default_rng(0)

    def check(u, it, k, exclude, mesh, axes=None, chunk=16, exact=True):
        s0, i0 = topk_scores(u, it, k, exclude=exclude, chunk_size=chunk)
        s1, i1 = sharded_topk_scores(u, it, k, mesh, exclude=exclude, chunk_size=chunk, axes=axes)
        assert s1.dtype == np.float32 and i1.dtype == np.int32
        np.testing.assert_array_equal(i1, i0)
        if exact:
            np.testing.assert_array_equal(s1, s0)
        else:   # float inputs: a [chunk, N/8] matmul may sum D in another order than [chunk, N]
            np.testing.assert_allclose(s1, s0, rtol=1e-6, atol=1e-6)
        return i0

    # Small-integer vectors: every score is exact, so many exact ties (and duplicate items).
    U, N, D = 37, 53, 4
    u = rng.integers(-2, 3, (U, D)).astype(np.float32)
    it = rng.integers(-2, 3, (N, D)).astype(np.float32)
    it[40:45] = it[3]                                  # the same item five times
    ex = [rng.choice(N, rng.integers(0, 50), replace=False) for _ in range(U)]
    ex[3] = np.arange(N)                               # everything excluded: -inf rows
    ex[4] = np.arange(N - 2)                           # only 2 allowed items
    ex[5] = np.array([], np.int64)
    ties = 0
    for k in (1, 7, 20, N, 100):
        for e in (None, ex):
            for mesh, axes in ((mesh24, None), (mesh18, None), (mesh24, ("model",))):
                idx = check(u, it, k, e, mesh, axes)
        s, _ = topk_scores(u, it, k)
        ties += int((np.diff(s, axis=1) == 0).sum())
    assert ties > 100, ties                            # the tie-breaking really is exercised
    s, idx = sharded_topk_scores(u, it, 20, mesh24, exclude=ex)
    for r in range(U):                                 # exclusions honoured: -inf iff excluded
        assert all((i in ex[r]) == np.isneginf(v) for v, i in zip(s[r], idx[r])), r
    s, idx = sharded_topk_scores(u, it, 5, mesh24, exclude=ex)
    assert np.isneginf(s[3]).all() and np.isneginf(s[4, 2:]).all() and np.isfinite(s[4, :2]).all()
    assert set(idx[4, :2]) == {N - 2, N - 1}

    # Random float vectors, more users than a chunk, N not a multiple of 8, and N < 8.
    u = rng.normal(size=(300, 16)).astype(np.float32)
    it = rng.normal(size=(1001, 16)).astype(np.float32)
    csr_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 30, 300))])
    csr = (csr_ptr, rng.integers(0, 1001, csr_ptr[-1]))
    check(u, it, 50, csr, mesh24, chunk=128, exact=False)
    check(u, it, 50, None, mesh18, chunk=1024, exact=False)
    check(u[:9], it[:5], 3, [np.array([1])] * 9, mesh24, exact=False)
    assert sharded_topk_scores(u[:0], it, 4, mesh24)[1].shape == (0, 4)
    try:
        sharded_topk_scores(u, it, 4, mesh24, axes=("nope",))
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "nope" in str(e)
    print("OK")
""")


def test_sharded_step_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(DATA), str(tmp_path / "wd")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")


def test_sharded_topk_matches_unsharded():
  """Exact top-K with the items split over 8 devices == the single-device top-K (docs/design.md §6)."""
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
  )
  r = subprocess.run(
    [sys.executable, "-c", TOPK_SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")
