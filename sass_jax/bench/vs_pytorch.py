"""sass_jax vs the PyTorch reference, alternating in one process tree (BENCHMARKS.md).

The parent prepares the config's data once into ``WORKDIR/data`` and then, for each round,
starts one child process per implementation -- sass_jax (one per ``--jax_embedding_optimizer``)
and ``torch_reference`` -- in alternating order (round r runs them reversed when r is odd), so
slow drifts of a shared machine's load hit both sides alike. Each child builds the same model
from the same config, takes the same initial parameters (the JAX model's init, copied into
torch with ``load_flax_params``), builds the same ``--batches`` batches with
``pipeline.BatchFn`` (NumPy, placed / converted beforehand), runs ``--warmup`` steps, then
``--repeats`` timed runs of ``--steps`` steps each (JAX: closed by ``block_until_ready``), and
prints one JSON line. The first step's loss is reported by both sides: with the same
parameters and batch they must agree (a check that the two compute the same model).

The PyTorch reference runs twice per round: eager (``torch``) and with its loss function under
``torch.compile`` (``torch_compile``; ``--torch_variants``); the faster of the two in a round is
that round's anchor. Both sides compute the same formulation (``--override
model.scenario_compute=grouped|onehot``, ``--override train.negatives=...``).

Around every child the parent records the 1-minute load average before and after and the CPU
time that *other* processes used meanwhile (``cpu_meter``: ``/proc/stat`` busy jiffies minus
this process's and its children's own CPU time, ``getrusage``), in cores. A round in which any
child saw more than ``--foreign_limit`` cores (default 0.10) of foreign use is marked
``contended`` and left out of the ratios (every round stays in the JSON).

Each sass_jax child also reports XLA's flops of its compiled step (``cost_analysis``), a
matmul probe (``[4096, 1024] x [1024, 1024]`` float32 ``jnp.dot``, median of 5 timed calls,
GFLOP/s) measured right after its timed runs, and the *floor* = flops / probe rate: the step
time if all its arithmetic ran at the probe's matmul rate (``step_over_floor`` = median step
time / floor). With 'grouped' compute those flops are the minimal arithmetic of the step.

The parent prints a table and the ratio sass_jax samples/s / best torch samples/s (median over
the clean rounds of the per-round ratios, and the ratio of the medians), writes
``WORKDIR/compare.json``.

Usage (from the repository root; torch from ``pip install .[bench]``)::

  .venv/bin/python -m sass_jax.bench.vs_pytorch --config configs/movielens.py \
      --workdir /tmp/cmp_ml --batch_size 4096 --rounds 3
  .venv/bin/python -m sass_jax.bench.vs_pytorch --config configs/aliccp_scale.py \
      --workdir /tmp/cmp_acs --batch_size 4096 --jax_embedding_optimizer dense,lazy_adam
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sass_jax import hostmem

ROOT = Path(__file__).resolve().parents[2]  # the repository root: configs/ lives there


def _parse_value(text: str):
  import ast

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def load_config(spec: str, batch_size: int | None, overrides=()):
  """``path[:arg]`` -> the config, with the stage batch sizes set and ``overrides``
  (``'a.b=value'`` strings, values read as Python literals or else as strings) applied.
  Raises KeyError naming an override whose field does not exist."""
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
  mod = importlib.util.module_from_spec(mod_spec)
  sys.path.insert(0, str(ROOT))
  mod_spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg else mod.get_config()
  if batch_size:
    cfg.train.batch_size = cfg.pretrain.batch_size = int(batch_size)
  for o in overrides:
    key, _, val = o.partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for k in parents:
      node = node[k]
    if leaf not in node:
      raise KeyError(f"--override {o!r}: the config has no field {key!r}")
    node[leaf] = _parse_value(val)
  return cfg


def _busy_jiffies() -> int:
  """Busy CPU time of the whole machine so far, in clock ticks (``/proc/stat`` 'cpu' line:
  user + nice + system + irq + softirq + steal)."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  return sum(v[:8]) - v[3] - (v[4] if len(v) > 4 else 0)


def _own_cpu_s() -> float:
  r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def cpu_meter():
  """Start measuring; returns ``stop()`` -> the CPU time other processes used since, per second
  of wall time (cores; 0.0 on a quiet machine). Own = this process and its waited-for children
  (``getrusage``), so a child must have exited before ``stop()`` for its time to count as own.
  Returns a ``stop`` giving ``float('nan')`` where ``/proc/stat`` is unreadable."""
  try:
    b0 = _busy_jiffies()
  except OSError:
    return lambda: float("nan")
  hz = os.sysconf("SC_CLK_TCK")
  o0, t0 = _own_cpu_s(), time.monotonic()

  def stop() -> float:
    busy = (_busy_jiffies() - b0) / hz
    own = _own_cpu_s() - o0
    return max(0.0, busy - own) / max(time.monotonic() - t0, 1e-9)

  return stop


def matmul_probe(
  n: int = 4096, k: int = 1024, m: int = 1024, calls: int = 5, dtype: str = "float32"
) -> dict:
  """``jnp.dot`` of ``[n, k] x [k, m]`` operands of ``dtype`` ('float32', or 'bfloat16'
  accumulated in float32, as ``sass_jax.model.mixed`` multiplies) on JAX's default device:
  median of ``calls`` timed calls after one warm-up, as GFLOP/s."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, k), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (k, m), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(calls):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t)
  sec = statistics.median(ts)
  return {
    "shape": [n, k, m],
    "dtype": dtype,
    "seconds": ts,
    "gflop_per_s": 2.0 * n * k * m / sec / 1e9,
  }


def _batches(data, stage, bs, seed, n):
  from sass_jax.data import pipeline

  fn = pipeline.BatchFn(data, stage, bs, seed)
  return [fn(i) for i in range(n)]


def _jax_params(cfg, data, model, stage):
  """The JAX model's initial params (as ``sass_jax.train.loop.train_stage`` would make them)."""
  import flax.linen as nn
  import jax

  from sass_jax.train import loop, steps
  from sass_jax.train.stages import stage_config, stage_seed

  scfg = stage_config(cfg, stage)
  tx = steps.make_optimizer(scfg, int(scfg.num_steps))
  seed = stage_seed(cfg, stage)
  init = steps.make_init_fn(model, tx, loop.example_batch(data), seed)
  return jax.device_get(jax.jit(lambda: nn.meta.unbox(init()).params)())


def child(args) -> dict:
  """Time one implementation; returns the JSON-ready result."""
  import numpy as np

  from sass_jax.train import loop
  from sass_jax.train.stages import stage_config, stage_seed

  cfg = load_config(args.config, args.batch_size, args.override)
  data = loop.prepare(cfg, args.workdir)
  model = loop.build_model(cfg, data)
  stage = args.stage
  scfg = stage_config(cfg, stage)
  bs = int(scfg.batch_size)
  seed = stage_seed(cfg, stage)
  host_batches = _batches(data, stage, bs, seed, args.batches)
  params0 = _jax_params(cfg, data, model, stage)
  runs, first_loss, extra = [], None, {}
  if args.child in ("torch", "torch_compile"):
    import torch
    from sass_jax.bench import torch_reference as tr

    if args.threads:
      torch.set_num_threads(args.threads)
    tm = tr.TorchSASS.from_model_config(model.cfg)
    tm.load_flax_params(params0)
    tm.to(args.device)
    step = tr.make_step(
      tm,
      stage,
      scfg.tau if stage == "pretrain" else cfg.model.tau,
      float(scfg.learning_rate),
      int(scfg.num_steps),
      int(scfg.get("warmup_steps", 0)),
      float(scfg.get("weight_decay", 0.0)),
      float(cfg.train.get("logq_strength", 1.0)),
      str(cfg.pretrain.pairs),
      str(cfg.train.get("negatives", "all")),
      compile=args.child == "torch_compile",
    )
    batches = [tr.to_torch(b, args.device) for b in host_batches]
    t = time.perf_counter()
    first_loss = float(step(batches[0]))
    compile_s = time.perf_counter() - t
    i = 1
    for _ in range(args.warmup):
      step(batches[i % len(batches)])
      i += 1
    for _ in range(args.repeats):
      t = time.perf_counter()
      for _ in range(args.steps):
        loss = step(batches[i % len(batches)])
        i += 1
      float(loss)
      runs.append((time.perf_counter() - t) / args.steps)
    impl = {
      "impl": "torch eager" if args.child == "torch" else "torch.compile (loss)",
      "torch_version": torch.__version__,
      "device": args.device,
      "threads": torch.get_num_threads(),
      "embedding_optimizer": "dense (AdamW)",
      "compute": tm.compute,
      "compute_dtype": tm.compute_dtype,
    }
  else:
    import jax

    from sass_jax.bench import throughput
    from sass_jax.partition import Partitioner
    from sass_jax.train import sparse, steps

    c = cfg
    c.train.embedding_optimizer = args.child.split(":", 1)[1]
    part = Partitioner(cfg.mesh)
    tx = steps.make_optimizer(scfg, int(scfg.num_steps))
    init_fn, step = sparse.build(
      c, stage, model, tx, loop.example_batch(data), seed, int(scfg.num_steps), init_params=params0
    )
    state, shardings = part.init(init_fn)
    batches = [part.shard_batch(b) for b in host_batches]
    t = time.perf_counter()
    fn = part.compile_step(step, shardings).lower(state, batches[0]).compile()
    # counted on the dense-softmax twin: XLA counts the row-blocked softmax's loop body once
    cost = throughput.counted_cost(
      c, stage, model, data, seed, part, state, shardings, batches[0], fn
    )
    extra["flops"] = cost["flops"]
    state, m = fn(state, batches[0])
    first_loss = float(m["loss"])
    compile_s = time.perf_counter() - t
    i = 1
    for _ in range(args.warmup):
      state, m = fn(state, batches[i % len(batches)])
      i += 1
    jax.block_until_ready(state)
    for _ in range(args.repeats):
      t = time.perf_counter()
      for _ in range(args.steps):
        state, m = fn(state, batches[i % len(batches)])
        i += 1
      jax.block_until_ready((state, m))
      runs.append((time.perf_counter() - t) / args.steps)
    # the floor at the rate of the towers' compute dtype (for bfloat16 a lower bound: the
    # losses' products and the optimiser stay float32)
    probe = matmul_probe(dtype=cfg.model.compute_dtype)
    floor_ms = extra["flops"] / (probe["gflop_per_s"] * 1e9) * 1e3
    extra.update(
      probe=probe,
      floor_ms=floor_ms,
      flops_per_sample=extra["flops"] / bs,
      step_over_floor=float(np.median(runs)) * 1e3 / floor_ms,
      compute=model.cfg.scenario_compute,
    )
    impl = {
      "impl": f"sass_jax ({c.train.embedding_optimizer})",
      "jax_version": jax.__version__,
      "device": jax.devices()[0].device_kind,
      "embedding_optimizer": c.train.embedding_optimizer,
      "compute_dtype": cfg.model.compute_dtype,
    }
  sps = [bs / r for r in runs]
  return {
    **impl,
    "stage": stage,
    "batch_size": bs,
    "first_loss": first_loss,
    "first_step_s": compile_s,
    "step_ms": [r * 1e3 for r in runs],
    "samples_per_s": sps,
    "samples_per_s_median": float(np.median(sps)),
    "negatives": str(cfg.train.get("negatives", "all")),
    **extra,
    "load_avg": list(os.getloadavg()),
  }


def parent(args) -> dict:
  from sass_jax.train import loop

  cfg = load_config(args.config, args.batch_size, args.override)
  loop.prepare(cfg, args.workdir)  # once, before the children
  torch_impls = [
    {"eager": "torch", "compile": "torch_compile"}[v] for v in args.torch_variants.split(",") if v
  ]
  impls = [f"jax:{o}" for o in args.jax_embedding_optimizer.split(",") if o] + torch_impls
  common = [
    "--config",
    args.config,
    "--workdir",
    args.workdir,
    "--stage",
    args.stage,
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--repeats",
    str(args.repeats),
    "--batches",
    str(args.batches),
    "--threads",
    str(args.threads),
    "--device",
    args.device,
  ] + [f"--override={o}" for o in args.override]
  if args.batch_size:
    common += ["--batch_size", str(args.batch_size)]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  rounds = []
  load_start = list(os.getloadavg())
  for r in range(args.rounds):
    order = impls if r % 2 == 0 else impls[::-1]
    got = {}
    for impl in order:
      print(f"round {r + 1}/{args.rounds}: {impl} ...", file=sys.stderr, flush=True)
      load0, meter = os.getloadavg()[0], cpu_meter()
      p = subprocess.run(
        [sys.executable, "-m", "sass_jax.bench.vs_pytorch", "--child", impl] + common,
        env=env,
        capture_output=True,
        text=True,
        timeout=args.child_timeout,
      )
      foreign = meter()
      lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
      if p.returncode or not lines:
        raise RuntimeError(f"child {impl} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
      got[impl] = {
        **json.loads(lines[-1]),
        "parent_load_before": load0,
        "parent_load_after": os.getloadavg()[0],
        "foreign_cores": foreign,
      }
    worst = max(g["foreign_cores"] for g in got.values())
    got["_round"] = {
      "foreign_cores_max": worst,
      "contended": bool(worst > args.foreign_limit),
    }  # NaN (no /proc): not marked
    rounds.append(got)
  clean = [rd for rd in rounds if not rd["_round"]["contended"]]
  best = lambda rd: max(rd[t]["samples_per_s_median"] for t in torch_impls)
  summary = {
    "rounds": len(rounds),
    "clean_rounds": len(clean),
    "torch_anchor": "the faster of " + ", ".join(torch_impls) + " in each round",
  }
  for impl in impls[: len(impls) - len(torch_impls)]:
    if not clean:
      summary[impl] = {"note": "every round was contended; no ratio"}
      continue
    jax_sps = [rd[impl]["samples_per_s_median"] for rd in clean]
    torch_sps = [best(rd) for rd in clean]
    per_round = [j / t for j, t in zip(jax_sps, torch_sps)]
    summary[impl] = {
      "jax_samples_per_s_median": statistics.median(jax_sps),
      "torch_best_samples_per_s_median": statistics.median(torch_sps),
      **{
        f"{t}_samples_per_s_median": statistics.median(
          rd[t]["samples_per_s_median"] for rd in clean
        )
        for t in torch_impls
      },
      "ratio_per_round": per_round,
      "ratio_median_of_rounds": statistics.median(per_round),
      "ratio_of_medians": statistics.median(jax_sps) / statistics.median(torch_sps),
      "step_over_floor_median": statistics.median(rd[impl]["step_over_floor"] for rd in clean),
      "flops_per_sample": rounds[0][impl]["flops_per_sample"],
      "first_loss_abs_diff": max(
        abs(rounds[0][impl]["first_loss"] - rounds[0][t]["first_loss"]) for t in torch_impls
      ),
    }
  out = {
    "config": args.config,
    "stage": args.stage,
    "batch_size": rounds[0][impls[0]]["batch_size"],
    "steps": args.steps,
    "warmup": args.warmup,
    "repeats": args.repeats,
    "rounds": rounds,
    "summary": summary,
    "load_avg_start": load_start,
    "load_avg_end": list(os.getloadavg()),
    "cpu_count": os.cpu_count(),
    "command": " ".join([Path(sys.executable).name] + sys.argv),
  }
  Path(args.workdir).mkdir(parents=True, exist_ok=True)
  (Path(args.workdir) / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
  return out


def table(out: dict) -> str:
  lines = [
    f"{out['config']} {out['stage']} step, batch {out['batch_size']} "
    f"(load {out['load_avg_start'][0]:.2f} -> {out['load_avg_end'][0]:.2f})",
    "",
    "| round | implementation | samples/s (median of repeats) | ms/step | first loss |",
    "|---|---|---|---|---|",
  ]
  lines[2] += " floor ms | foreign cores | load before -> after |"
  lines[3] += "---|---|---|"
  for r, rd in enumerate(out["rounds"]):
    mark = " (contended)" if rd["_round"]["contended"] else ""
    for impl, res in rd.items():
      if impl == "_round":
        continue
      floor = f"{res['floor_ms']:.1f}" if "floor_ms" in res else ""
      lines.append(
        f"| {r + 1}{mark} | {res['impl']} | {res['samples_per_s_median']:,.0f} | "
        f"{statistics.median(res['step_ms']):.1f} | {res['first_loss']:.6f} | {floor} | "
        f"{res['foreign_cores']:.3f} | {res['parent_load_before']:.2f} -> "
        f"{res['parent_load_after']:.2f} |"
      )
  lines.append("")
  s_all = out["summary"]
  lines.append(
    f"clean rounds: {s_all['clean_rounds']} of {s_all['rounds']}; anchor: {s_all['torch_anchor']}"
  )
  for impl, s in s_all.items():
    if not isinstance(s, dict):
      continue
    if "ratio_per_round" not in s:
      lines.append(f"{impl}: {s['note']}")
      continue
    lines.append(
      f"{impl} / best torch samples/s: {s['ratio_median_of_rounds']:.2f}x (median of "
      f"per-round ratios {[round(x, 2) for x in s['ratio_per_round']]}; ratio of "
      f"medians {s['ratio_of_medians']:.2f}x); step / floor "
      f"{s['step_over_floor_median']:.2f}x; {s['flops_per_sample'] / 1e3:,.0f} "
      f"kFLOP/sample; first-step loss |diff| {s['first_loss_abs_diff']:.2e}"
    )
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument(
    "--config", default="configs/movielens.py", help="config file[:arg], repo-relative"
  )
  ap.add_argument("--workdir", default="/tmp/sass_jax_compare")
  ap.add_argument("--stage", default="finetune", choices=("finetune", "pretrain"))
  ap.add_argument("--batch_size", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3, help="timed runs per child")
  ap.add_argument("--batches", type=int, default=4, help="distinct batches cycled")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  ap.add_argument(
    "--device",
    default="cpu",
    help="torch device: 'cpu' or 'cuda' (sass_jax uses JAX's default device)",
  )
  ap.add_argument(
    "--jax_embedding_optimizer",
    default="dense",
    help="comma-separated sass_jax variants, e.g. dense,lazy_adam",
  )
  ap.add_argument(
    "--torch_variants",
    default="eager,compile",
    help="torch reference runs: 'eager', 'compile' (torch.compile of the loss)",
  )
  ap.add_argument(
    "--foreign_limit",
    type=float,
    default=0.10,
    help="cores of other processes' CPU use above which a round is contended",
  )
  ap.add_argument(
    "--override",
    action="append",
    default=[],
    help="config field=value, e.g. data.dir=/path (repeatable)",
  )
  ap.add_argument("--child_timeout", type=float, default=3600)
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    # the same host-memory policy for every child, JAX or PyTorch (sass_jax/hostmem.py)
    kept = hostmem.keep_freed_memory_or_exit()
    print(json.dumps({**child(args), "host_malloc": "keep" if kept else "system"}), flush=True)
    return
  out = parent(args)
  print(json.dumps(out["summary"], indent=2))
  print()
  print(table(out))


if __name__ == "__main__":
  main()
