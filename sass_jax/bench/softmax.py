"""The in-batch softmax losses alone: dense (``sass_jax/train/losses.py``) against row-blocked
(``sass_jax/train/inbatch.py``), value and gradient, jitted, on random unit vectors.

    python -m sass_jax.bench.softmax [--batch_size 4096] [--scenarios 3] [--dim 64]
        [--calls 8] [--rounds 3] [--out softmax.json]

Fine-tune: the sampled softmax with logQ correction over per-scenario item vectors ``[B, K, D]``
(negatives 'all'); pre-train: the symmetric InfoNCE with (user, item) ids. The variants run in
alternating rounds of ``--calls`` calls each; the table gives the median [min-max] ms per call
over all rounds, and the 1-minute load average before and after. Time it on a quiet machine
(BENCHMARKS.md, "What is measured and how").
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sass_jax import hostmem
from sass_jax.train import inbatch, losses


def _loadavg() -> float:
  with open("/proc/loadavg") as f:
    return float(f.read().split()[0])


def variants(b: int, k: int, d: int, seed: int = 0) -> dict:
  """name -> (loss function of two float32 arrays, its two arguments)."""
  r = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  u = jnp.asarray(unit(r.normal(size=(b, d))), jnp.float32)
  ia = jnp.asarray(unit(r.normal(size=(b, k, d))), jnp.float32)
  sc = jnp.asarray(r.integers(0, k, b), jnp.int32)
  ids = jnp.asarray(r.integers(0, 50 * b, b), jnp.int32)
  uid = jnp.asarray(r.integers(0, 25 * b, b), jnp.int32)
  lq = jnp.asarray(np.log(r.uniform(1e-6, 1e-4, b)), jnp.float32)
  tau, alpha = 0.2, 1.5

  def ft_blocked(dtype):
    return lambda u, ia: inbatch.softmax_ce(
      u, ia, tau, bias=-alpha * lq, scenario=sc, dup_ids=(ids,), dtype=dtype
    )

  def ft_dense(u, ia):
    return losses.sampled_softmax_logq(losses.scenario_logits(u, ia, sc), ids, lq, tau, alpha)

  pair = (uid, ids)
  return {
    "finetune dense": (ft_dense, (u, ia)),
    "finetune blocked float32": (ft_blocked("float32"), (u, ia)),
    "finetune blocked bfloat16": (ft_blocked("bfloat16"), (u, ia)),
    "pretrain dense": (lambda a, c: losses.info_nce(a, c, pair, tau), (u, ia[:, 0])),
    "pretrain blocked float32": (lambda a, c: inbatch.info_nce(a, c, pair, tau), (u, ia[:, 0])),
    "pretrain blocked bfloat16": (
      lambda a, c: inbatch.info_nce(a, c, pair, tau, "bfloat16"),
      (u, ia[:, 0]),
    ),
  }


def run(b: int, k: int, d: int, calls: int, rounds: int) -> dict:
  """Time every variant; returns {'load_before', 'load_after', 'ms': {name: [per call]}}."""
  vs = variants(b, k, d)
  fns = {n: jax.jit(jax.value_and_grad(f, (0, 1))) for n, (f, _) in vs.items()}
  for n, fn in fns.items():
    jax.block_until_ready(fn(*vs[n][1]))
  out = {"load_before": _loadavg(), "ms": {n: [] for n in fns}}
  for _ in range(rounds):
    for n, fn in fns.items():
      for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(fn(*vs[n][1]))
        out["ms"][n].append((time.perf_counter() - t) * 1e3)
  out["load_after"] = _loadavg()
  return out


def main(argv=None) -> None:
  hostmem.keep_freed_memory_or_exit()  # before JAX starts its threads
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--batch_size", type=int, default=4096)
  ap.add_argument("--scenarios", type=int, default=3)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--calls", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default="", help="write the JSON here too")
  a = ap.parse_args(argv)
  res = run(a.batch_size, a.scenarios, a.dim, a.calls, a.rounds)
  res.update(batch_size=a.batch_size, scenarios=a.scenarios, dim=a.dim, jax_version=jax.__version__)
  print(f"load {res['load_before']:.2f} -> {res['load_after']:.2f}")
  print("| loss, value and gradient | ms per call, median [min-max] |\n|---|---|")
  for n, ms in res["ms"].items():
    print(f"| {n} | {np.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
