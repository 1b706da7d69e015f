"""Input-pipeline benchmark (``--mode bench_input``): is the grain pipeline fast enough to feed
the fine-tuning step?

``bench_input(cfg, workdir)`` prepares ``config.data`` (reusing ``WORKDIR/data``), then at
``config.train.batch_size`` times, each ``repeats`` times after ``warmup`` batches / steps:

- ``input``: ``next(it)`` of the training iterators (``pipeline.make_iterator`` with its default
  threads and prefetch, exactly as ``loop.train_stage`` builds them) for the fine-tune stream and,
  when the data has >= 2 scenarios, the pre-train stream;
- ``input_placed``: the same plus ``Partitioner.shard_batch`` (placement onto the mesh), blocked
  until the arrays are ready;
- ``step``: the fine-tune step compiled by ``Partitioner.compile_step``, on batches fetched and
  placed beforehand (so no input work overlaps it), blocked with ``jax.block_until_ready`` at the
  end of each timed run.

Every measurement reports batches/s and samples/s (= batches/s * batch size) as median, min and
max over the repeats. ``input_over_step`` is the fine-tune input median samples/s divided by the
step median samples/s; the target of issue 3 is >= 2. The result is written to
``WORKDIR/bench_input.json`` and returned. Timings are wall clock on whatever else the machine
runs at the time; ``machine.load_avg_*`` records the load when the run started and ended.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import grain
import jax
import numpy as np

from sass_jax.data import pipeline
from sass_jax.partition import Partitioner
from sass_jax.train import loop, steps

log = logging.getLogger("sass_jax")


def _stats(rates: list[float], batch_size: int) -> dict:
  """{'batches_per_s': {median, min, max, runs}, 'samples_per_s': the same times batch_size}."""
  b = {"median": float(statistics.median(rates)), "min": float(min(rates)),
       "max": float(max(rates)), "runs": [float(r) for r in rates]}
  return {"batches_per_s": b,
          "samples_per_s": {k: ([v * batch_size for v in x] if k == "runs" else x * batch_size)
                            for k, x in b.items()}}


def _timed(run: Callable[[], None], n: int) -> float:
  """Batches (or steps) per second of ``run()``, which does ``n`` of them."""
  t = time.perf_counter()
  run()
  return n / max(time.perf_counter() - t, 1e-12)


def _time_iterator(make_it: Callable[[], object], consume: Callable, num_batches: int,
                   warmup: int, repeats: int) -> list[float]:
  rates = []
  for _ in range(repeats):
    it = make_it()
    for _ in range(warmup):
      consume(next(it))

    def run():
      for _ in range(num_batches):
        consume(next(it))
    rates.append(_timed(run, num_batches))
    del it
  return rates


def _machine() -> dict:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "jax_version": jax.__version__, "grain_version": getattr(grain, "__version__", "?"),
          "numpy_version": np.__version__, "python": platform.python_version(),
          "system": f"{platform.system()} {platform.machine()}"}


def _load_avg() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def bench_input(cfg, workdir: str | Path, num_batches: int = 200, warmup: int = 10,
                repeats: int = 3, config_name: str | None = None) -> dict:
  """Time the input pipeline, input + placement, and the fine-tune step; see the module doc.

  Args:
    cfg: the run config (``config.data``, ``config.train``, ``config.model``, ``config.mesh``).
    workdir: run directory; data is prepared into ``WORKDIR/data`` and the result written to
      ``WORKDIR/bench_input.json``.
    num_batches: batches (and steps) per timed run; warmup: untimed ones before each run;
      repeats: timed runs per measurement.
    config_name: how the config was named on the command line (recorded only).

  Returns the JSON-ready dict. Raises ValueError for non-positive counts or a batch size the
  mesh cannot split.
  """
  if num_batches < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"need num_batches >= 1, repeats >= 1, warmup >= 0; got {num_batches}, "
                     f"{repeats}, {warmup}")
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  load_start = _load_avg()
  data = loop.prepare(cfg, workdir)
  bs = int(cfg.train.batch_size)
  part = Partitioner(cfg.mesh)
  part.check_batch_size(bs, "config.train.batch_size")
  total = warmup + num_batches
  streams = ["finetune"] + (["pretrain"] if data.num_scenarios >= 2 else [])
  seeds = {"pretrain": cfg.seed, "finetune": cfg.seed + 1}   # as loop.train_stage

  def make(stream):
    return lambda: pipeline.make_iterator(data, stream, bs, seeds[stream], total,
                                          jax.process_index(), jax.process_count())

  place = lambda b: jax.block_until_ready(part.shard_batch(b))
  result_input, result_placed = {}, {}
  for stream in streams:
    log.info("bench_input: %s input, %d x %d batches of %d", stream, repeats, num_batches, bs)
    result_input[stream] = _stats(
        _time_iterator(make(stream), lambda b: None, num_batches, warmup, repeats), bs)
    log.info("bench_input: %s input + placement", stream)
    result_placed[stream] = _stats(
        _time_iterator(make(stream), place, num_batches, warmup, repeats), bs)

  # The fine-tune step on pre-placed batches (distinct ones, as in training).
  log.info("bench_input: fine-tune step, %d x %d steps", repeats, num_batches)
  model = loop.build_model(cfg, data)
  tx = steps.make_optimizer(cfg.train, int(cfg.train.num_steps))
  init_fn = steps.make_init_fn(model, tx, loop.example_batch(data), cfg.seed + 1)
  state, shardings = part.init(init_fn)
  step_fn = part.compile_step(
      steps.make_finetune_step(model, tx, cfg.model.tau, cfg.train.get("logq_strength", 1.0)),
      shardings)
  it = make("finetune")()
  batches = [place(next(it)) for _ in range(total)]
  del it
  t = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t
  step_rates = []
  for _ in range(repeats):
    for b in batches[:warmup]:
      state, m = step_fn(state, b)
    jax.block_until_ready((state, m))
    t = time.perf_counter()
    for b in batches[warmup:]:
      state, m = step_fn(state, b)
    jax.block_until_ready((state, m))
    step_rates.append(num_batches / max(time.perf_counter() - t, 1e-12))
  loss = float(jax.device_get(m["loss"]))
  del batches, state
  result_step = {"finetune": _stats(step_rates, bs)}

  median = lambda r, s="finetune": r[s]["samples_per_s"]["median"]
  step_sps = median(result_step)
  out = {
      "config": config_name or f"{cfg.data.name} / {cfg.model.name}",
      "data": {"name": cfg.data.name, "rows": int(data.manifest["num_interactions"]),
               "users": data.num_users, "items": data.num_items,
               "scenarios": data.num_scenarios,
               "finetune_stream_rows": int(len(data.rows("train", labeled_positive=True))),
               "pretrain_stream_rows": int(len(data.rows("train")))},
      "model": cfg.model.name,
      "batch_size": bs, "num_batches": num_batches, "warmup": warmup, "repeats": repeats,
      "mesh": {k: int(v) for k, v in part.mesh.shape.items()},
      "machine": {**_machine(), "load_avg_start": load_start, "load_avg_end": _load_avg()},
      "input": result_input,
      "input_placed": result_placed,
      "step": result_step,
      "step_compile_s": compile_s,
      "step_final_loss": loss,
      "input_samples_per_s": median(result_input),
      "input_placed_samples_per_s": median(result_placed),
      "step_samples_per_s": step_sps,
      "input_over_step": median(result_input) / step_sps,
      "input_placed_over_step": median(result_placed) / step_sps,
  }
  out["input_ge_2x_step"] = bool(out["input_over_step"] >= 2.0)
  if jax.process_index() == 0:
    (workdir / "bench_input.json").write_text(json.dumps(out, indent=2) + "\n")
  log.info("bench_input: input %.0f samples/s, input+placement %.0f, step %.0f; ratio %.2f",
           out["input_samples_per_s"], out["input_placed_samples_per_s"], step_sps,
           out["input_over_step"])
  return out
