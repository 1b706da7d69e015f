"""XLA flops (and, unless ``--flops_only``, samples/s) of the training steps over scenario counts.

For each K in ``--ks`` the config's data is prepared with ``data.num_scenarios = K`` (synthetic
data: ``configs/synthetic.py``, 1e5 rows, about a second each) into ``WORKDIR/k<K>``; ``--ks``
empty keeps the config's own data (e.g. ``configs/aliccp_scale.py``, K = 3). Then for every
model, ``--negatives`` reading, ``--compute`` (``model.scenario_compute``) and stage, the step
that training runs (``sparse.build`` with ``train.embedding_optimizer``, default dense AdamW) is
compiled and XLA's ``cost_analysis`` flops are recorded (deterministic: no timing needed), per
step and per sample. Without ``--flops_only`` each step is also timed: ``--warmup`` steps, then
``--repeats`` runs of ``--steps`` steps on ``--batches`` distinct batches built beforehand, each
closed by ``block_until_ready``; per run the 1-minute load average before / after and the CPU
time other processes used during it (``/proc/stat`` busy jiffies minus this process's own,
``cpu_meter``) are recorded, and a run where others used more than 10% of one core is marked
``contended`` and left out of the median (every run is kept in the JSON).

Writes ``WORKDIR/scaling.json`` and prints a table (samples/s, GFLOP per step, kFLOP per sample).

Usage (repository root)::

  .venv/bin/python -m sass_jax.bench.scaling --workdir /tmp/scaling --flops_only
  .venv/bin/python -m sass_jax.bench.scaling --workdir /tmp/scaling            # flops + timings
  .venv/bin/python -m sass_jax.bench.scaling --config configs/aliccp_scale.py --ks "" \\
      --models sass --batch_size 4096 --stages finetune,pretrain --compute grouped,onehot \\
      --workdir /tmp/acs --flops_only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from sass_jax import hostmem
from sass_jax.bench.vs_pytorch import cpu_meter, load_config

FOREIGN_LIMIT = 0.10  # cores: a run where other processes used more is marked contended


def _one(cfg, data, stage, args) -> dict:
  import jax

  from sass_jax.bench import throughput
  from sass_jax.data import pipeline
  from sass_jax.partition import Partitioner
  from sass_jax.train import loop, sparse, steps
  from sass_jax.train.stages import stage_config

  scfg = stage_config(cfg, stage)
  bs = int(scfg.batch_size)
  model = loop.build_model(cfg, data)
  tx = steps.make_optimizer(scfg, int(scfg.num_steps))
  part = Partitioner(cfg.mesh)
  init_fn, step = sparse.build(
    cfg, stage, model, tx, loop.example_batch(data), cfg.seed, int(scfg.num_steps)
  )
  state, shardings = part.init(init_fn)
  fn_batch = pipeline.BatchFn(data, stage, bs, cfg.seed)
  n_batches = 1 if args.flops_only else args.batches
  batches = [part.shard_batch(fn_batch(i)) for i in range(n_batches)]
  compiled = part.compile_step(step, shardings).lower(state, batches[0]).compile()
  # counted on the dense-softmax twin: XLA counts the row-blocked softmax's loop body once
  cost = throughput.counted_cost(
    cfg, stage, model, data, cfg.seed, part, state, shardings, batches[0], compiled
  )
  flops = cost["flops"]
  out = {"stage": stage, "batch_size": bs, "flops": flops, "flops_per_sample": flops / bs}
  if args.flops_only:
    return out
  i = 0
  for _ in range(args.warmup):
    state, m = compiled(state, batches[i % n_batches])
    i += 1
  jax.block_until_ready(state)
  runs = []
  for _ in range(args.repeats):
    load0, meter = os.getloadavg()[0], cpu_meter()
    t = time.perf_counter()
    for _ in range(args.steps):
      state, m = compiled(state, batches[i % n_batches])
      i += 1
    jax.block_until_ready((state, m))
    dt = time.perf_counter() - t
    foreign = meter()
    runs.append(
      {
        "ms_per_step": dt / args.steps * 1e3,
        "samples_per_s": bs * args.steps / dt,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "foreign_cores": foreign,
        "contended": foreign > FOREIGN_LIMIT,
      }
    )
  clean = [r["samples_per_s"] for r in runs if not r["contended"]]
  out.update(
    runs=runs,
    samples_per_s_median=statistics.median(clean) if clean else None,
    clean_runs=len(clean),
  )
  return out


def main(argv=None):
  hostmem.keep_freed_memory_or_exit()  # before JAX starts its threads
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/synthetic.py")
  ap.add_argument("--workdir", default="/tmp/sass_jax_scaling")
  ap.add_argument("--ks", default="2,4,8,16,32", help="scenario counts; '' = the config's own")
  from sass_jax.model import registry

  ap.add_argument("--models", default=",".join(registry.names()))
  ap.add_argument("--negatives", default="all,same_scenario")
  ap.add_argument("--compute", default="grouped", help="model.scenario_compute values")
  ap.add_argument("--stages", default="finetune")
  ap.add_argument("--batch_size", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--batches", type=int, default=2)
  ap.add_argument("--flops_only", action="store_true", help="compile and count; no timing")
  ap.add_argument("--override", action="append", default=[], help="config field=value")
  args = ap.parse_args(argv)
  from sass_jax.train import loop

  ks = [int(k) for k in args.ks.split(",") if k.strip()] or [None]
  rows = []
  for k in ks:
    base = load_config(args.config, args.batch_size, args.override)
    if k is not None:
      base.data.num_scenarios = k
    wd = Path(args.workdir) / (f"k{k}" if k is not None else "data_own")
    data = loop.prepare(base, wd)
    for name in [m for m in args.models.split(",") if m]:
      for compute in [c for c in args.compute.split(",") if c]:
        for neg in [n for n in args.negatives.split(",") if n]:
          for stage in [s for s in args.stages.split(",") if s]:
            if stage == "pretrain" and neg != args.negatives.split(",")[0]:
              continue  # negatives only change fine-tuning
            cfg = load_config(args.config, args.batch_size, args.override)
            if k is not None:
              cfg.data.num_scenarios = k
            cfg.model.name = name
            cfg.model.scenario_compute = compute
            cfg.train.negatives = neg
            r = _one(cfg, data, stage, args)
            r.update(
              k=data.num_scenarios,
              model=name,
              compute=compute,
              negatives=neg if stage == "finetune" else "-",
            )
            rows.append(r)
            sps = r.get("samples_per_s_median")
            print(
              f"K={r['k']:3d} {name:14s} {compute:8s} {r['negatives']:14s} {stage:9s} "
              f"{r['flops'] / 1e9:9.3f} GFLOP/step {r['flops_per_sample'] / 1e3:10.1f} "
              f"kFLOP/sample" + (f" {sps:10,.0f} samples/s" if sps else ""),
              flush=True,
            )
  out = {
    "config": args.config,
    "batch_size": args.batch_size,
    "flops_only": args.flops_only,
    "rows": rows,
    "cpu_count": os.cpu_count(),
    "command": " ".join([Path(sys.executable).name] + sys.argv),
  }
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  (Path(args.workdir) / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
  print(table(out))


def table(out: dict) -> str:
  """Markdown: one row per (model, compute, negatives, stage), one column pair per K."""
  rows = out["rows"]
  ks = sorted({r["k"] for r in rows})
  keys = []
  for r in rows:
    key = (r["model"], r["compute"], r["negatives"], r["stage"])
    if key not in keys:
      keys.append(key)
  timed = not out["flops_only"]
  head = (
    "| model | compute | negatives | stage | "
    + " | ".join(f"K={k} kFLOP/sample" + (f" | K={k} samples/s" if timed else "") for k in ks)
    + " |"
  )
  lines = [head, "|" + "---|" * (4 + len(ks) * (2 if timed else 1))]
  for key in keys:
    cells = []
    for k in ks:
      r = next(
        (
          r
          for r in rows
          if (r["model"], r["compute"], r["negatives"], r["stage"]) == key and r["k"] == k
        ),
        None,
      )
      cells.append(f"{r['flops_per_sample'] / 1e3:,.0f}" if r else "")
      if timed:
        sps = r and r.get("samples_per_s_median")
        cells.append(f"{sps:,.0f}" if sps else "")
    lines.append("| " + " | ".join(key) + " | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
