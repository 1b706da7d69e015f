"""A sharded step over 8 fake CPU devices equals the 1-device step (SPEC section 6).

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

    one = Partitioner(cfg.mesh.__class__({"data": 1, "model": 1, "shard_min_rows": 0}),
                      devices=jax.devices()[:1])
    eight = Partitioner(cfg.mesh.__class__({"data": 2, "model": 4, "shard_min_rows": 0}))
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
    print("OK")
""")


def test_sharded_step_matches_single_device(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  r = subprocess.run([sys.executable, "-c", SCRIPT, str(DATA), str(tmp_path / "wd")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")
