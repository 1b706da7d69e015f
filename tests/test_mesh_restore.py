"""A checkpoint saved on one mesh restores on another (docs/design.md §6): trained on (2 data x 4
model) over 8 fake CPU devices, it is evaluated on (1 x 4), on 1 device and by a plain
one-device process with identical metrics, and training resumed on (1 x 4) and on 1 device
continues the (2 x 4) run's loss curve.

Runs in subprocesses because the device count must be fixed before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import jax, numpy as np
    import ml_collections
    from jax.sharding import PartitionSpec as P
    from configs import test as test_config
    from sass_jax.eval import evaluate as eval_lib
    from sass_jax.partition import Partitioner
    from sass_jax.train import loop

    assert jax.device_count() == 8, jax.devices()
    tmp = Path(sys.argv[1])
    wd = tmp / "wd"
    cfg = test_config.get_config()
    cfg.pretrain.num_steps = 0
    cfg.train.num_steps, cfg.train.log_every = 10, 1
    cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep = 5, 3
    cfg.mesh.data, cfg.mesh.model, cfg.mesh.shard_min_rows = 2, 4, 0

    m24 = loop.train(cfg, wd, show_progress=False)          # trains and evaluates on 2 x 4
    data = loop.prepare(cfg, wd)
    model = loop.build_model(cfg, data)
    mesh_cfg = lambda d, m: ml_collections.ConfigDict(
        {"data": d, "model": m, "shard_min_rows": 0, "table_layout": "auto"})
    p24 = Partitioner(mesh_cfg(2, 4))
    p14 = Partitioner(mesh_cfg(1, 4), devices=jax.devices()[4:])
    p1 = Partitioner(mesh_cfg(1, 1), devices=jax.devices()[3:4])
    ref = jax.tree.map(np.asarray, loop.restore_variables(cfg, wd, "finetune", model, p24, data))

    def close(a, b, tol):
      if isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        return all(close(a[k], b[k], tol) for k in a)
      if isinstance(a, float):
        assert abs(a - b) <= tol or (a != a and b != b), (a, b)   # NaN (n/a) on both sides
        return True
      assert a == b, (a, b)
      return True

    for name, part in (("1x4", p14), ("1", p1)):
      v = loop.restore_variables(cfg, wd, "finetune", model, part, data)
      table = v["params"]["user_tower"]["embed"]["user_id"]
      assert table.sharding.mesh == part.mesh, table.sharding
      if name == "1x4":     # really row-sharded over the 4 devices of the new mesh
        assert table.sharding.spec == P("model", None), table.sharding
        assert {s.device for s in table.addressable_shards} == set(jax.devices()[4:])
        assert {s.data.shape[0] for s in table.addressable_shards} == {table.shape[0] // 4}
      else:
        assert table.devices() == {jax.devices()[3]}
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)   # restored bit for bit
      m = loop.evaluate_workdir(cfg, wd, data=data, model=model, part=part)
      close(m, m24, 1e-6)
      print(name, "eval identical: overall recall@50", m["overall"]["recall@50"])
      if name == "1":       # the single-device path without the sharded top-K agrees too
        plain = eval_lib.evaluate(model, v, data, cfg.eval.split, tuple(cfg.eval.ks),
                                  cfg.eval.mask, cfg.eval.user_chunk)
        close({"model": m["model"], "dataset": m["dataset"],
               "checkpoint_step": m["checkpoint_step"], **plain}, m24, 1e-6)

      # Training: resume the (2 x 4) run from its step-5 checkpoint on the new mesh.
      wd2 = tmp / f"resume_{name}"
      shutil.copytree(wd, wd2)
      shutil.rmtree(wd2 / "checkpoints" / "finetune" / "10")
      (wd2 / "finetune_log.jsonl").unlink()
      state = loop.train_stage("finetune", cfg, data, model, part, wd2, show_progress=False)
      log = [json.loads(l) for l in (wd2 / "finetune_log.jsonl").read_text().splitlines()]
      full = {r["step"]: r["loss"] for r in
              map(json.loads, (wd / "finetune_log.jsonl").read_text().splitlines())}
      assert [r["step"] for r in log] == [6, 7, 8, 9, 10], log
      np.testing.assert_allclose([r["loss"] for r in log], [full[s] for s in range(6, 11)],
                                 rtol=1e-5, atol=1e-5)
      for a, b in zip(jax.tree.leaves(state.variables), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5)
      print(name, "resumed losses match", [round(r["loss"], 5) for r in log])
    json.dump(m24, open(tmp / "m24.json", "w"))
    print("OK")
""")


def _env(**kw):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.update(kw)
  return env


def test_checkpoint_restores_on_other_meshes(tmp_path):
  r = subprocess.run(
    [sys.executable, "-c", SCRIPT, str(tmp_path)],
    cwd=REPO,
    env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  assert r.stdout.strip().endswith("OK")

  # A plain one-device process (the CLI, default mesh) evaluates the (2 x 4) checkpoint.
  wd = tmp_path / "wd"
  (wd / "metrics.json").unlink()
  r = subprocess.run(
    [
      sys.executable,
      "-m",
      "sass_jax.main",
      "--config",
      "configs/test.py",
      "--workdir",
      str(wd),
      "--mode",
      "eval",
      "--config.pretrain.num_steps=0",
      "--config.train.num_steps=10",
    ],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
  got = json.loads((wd / "metrics.json").read_text())
  want = json.loads((tmp_path / "m24.json").read_text())

  def close(a, b):
    if isinstance(a, dict):
      assert a.keys() == b.keys()
      for k in a:
        close(a[k], b[k])
    elif isinstance(a, float):
      assert abs(a - b) <= 1e-6 or (a != a and b != b), (a, b)
    else:
      assert a == b

  close(got, want)
  assert 0 < want["overall"]["recall@50"] < 1
