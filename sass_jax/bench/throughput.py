"""Throughput benchmarks: ``--mode bench`` and ``--mode bench_input``.

``bench(cfg, workdir)`` prepares ``config.data`` (reusing ``WORKDIR/data``) and measures, after
warm-up, ``config.bench.repeats`` times each (median, min, max and every run):

- ``steps``: the compiled ``pretrain_step`` (when the data has >= 2 scenarios) and
  ``finetune_step`` -- the fine-tune step once per ``config.bench.embedding_optimizers``
  ('dense' AdamW on whole tables, 'lazy_adam', 'rowwise_adagrad'; sass_jax/train/sparse.py),
  the pre-train step with ``config.train.embedding_optimizer`` -- on ``config.bench.batches``
  distinct batches built and placed beforehand (so no input work overlaps the step), cycled;
  each timed run is ``config.bench.steps`` steps closed by ``jax.block_until_ready``. Per step:
  ms and samples/s, compile seconds, XLA's compiled ``cost_analysis`` (flops, bytes accessed)
  and ``memory_analysis`` (argument / output / temp bytes), the device's peak memory where the
  backend reports it (``memory_stats``), and the *floor* (``_floor``): flops / the measured
  matmul rate, and the least bytes a step must move (params and optimiser state read and
  written once; touched rows only for the row-sparse tables) / the measured copy bandwidth
  (``probe``), with ``step_over_floor`` = step time / the larger of the two.
- ``sparse_check``: one step of each row-sparse optimiser and of its dense masked reference
  (``SparseOptions(masked=True)``) from the same state and batch: the largest difference on
  the touched rows, whether every untouched row is bitwise unchanged, and the largest
  difference of the other parameters.
- ``table_update``: the embedding-table part of the fine-tune step alone, per optimiser (from
  the per-occurrence gradients the towers hand to the table gathers, to updated tables and
  state), and ``table_update_speedup`` = dense time / row-sparse time.
- ``input``: the input source alone at the fine-tune batch size: the grain pipeline
  (``pipeline.make_iterator`` as training builds it; NumPy ``BatchFn`` calls when grain is not
  installed) and that plus placement on the mesh; or, with ``config.train.resident_on_device``,
  the device-side sampler (``data.resident.ResidentSampler``).
- ``loop``: the whole fine-tune loop as ``loop.train_stage`` runs it (next batch from the input
  source, placement, step) with ``config.train.embedding_optimizer``.
- ``eval``: encoding ``config.bench.eval_items`` items in every scenario and
  ``config.bench.eval_users`` users, exact top-K of those users (at most
  ``config.bench.eval_topk_scores`` / items of them) over a corpus of the data's item count, and -- when users x items <= ``config.bench.full_eval_max_pairs`` -- the whole
  ``evaluate()`` (the second of two calls, so without compilation).
- ``probe``: the device's float32 (and bfloat16) matmul FLOP/s and copy bandwidth, measured.

Everything is written to ``WORKDIR/bench.json`` and returned; ``summary_table`` renders the
headline numbers. Timings are wall clock on whatever else the machine runs at the time;
``machine.load_avg_start`` / ``load_avg_end`` record the load.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sass_jax import config_check
from sass_jax.data import pipeline
from sass_jax.partition import Partitioner
from sass_jax.train import inbatch, loop, sparse, steps
from sass_jax.train.stages import STAGES, stage_block, stage_config, stage_seed

log = logging.getLogger("sass_jax")


def _stats(values: list[float]) -> dict:
  """{'median', 'min', 'max', 'runs'} of a list of numbers."""
  return {
    "median": float(statistics.median(values)),
    "min": float(min(values)),
    "max": float(max(values)),
    "runs": [float(v) for v in values],
  }


def _rates(seconds_per_batch: list[float], batch_size: int) -> dict:
  """Step ms and samples/s statistics from seconds per batch."""
  return {
    "step_ms": _stats([s * 1e3 for s in seconds_per_batch]),
    "samples_per_s": _stats([batch_size / max(s, 1e-12) for s in seconds_per_batch]),
  }


def _load_avg() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def _machine() -> dict:
  dev = jax.devices()[0]
  try:
    import grain

    grain_version = getattr(grain, "__version__", "?")
  except ImportError:
    grain_version = None
  return {
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "num_devices": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "jax_version": jax.__version__,
    "grain_version": grain_version,
    "numpy_version": np.__version__,
    "python": platform.python_version(),
    "system": f"{platform.system()} {platform.machine()}",
  }


def _bench_cfg(cfg) -> ml_collections.ConfigDict:
  """``config.bench`` (values checked by ``config_check.validate``)."""
  return ml_collections.ConfigDict(cfg.bench.to_dict())


def _with(cfg, **train_overrides):
  c = ml_collections.ConfigDict(cfg.to_dict())
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


# ---- probe: what the device can do --------------------------------------------------------
def _median_time(fn: Callable[[], Any], reps: int = 5) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(statistics.median(ts))


def probe(matmul_n: int = 0, copy_bytes: int = 0) -> dict:
  """Measured matmul FLOP/s (float32, and bfloat16 accumulated in float32 as
  ``sass_jax.model.mixed`` multiplies; [n, n] @ [n, n]) and copy bandwidth
  (``y = x * 2 + 1`` over ``copy_bytes`` of float32: bytes read + written per second) of the
  default device. Sizes default to 2048 / 256 MiB on CPU and 8192 / 2 GiB on accelerators."""
  accel = jax.devices()[0].platform != "cpu"
  n = int(matmul_n) or (8192 if accel else 2048)
  nbytes = int(copy_bytes) or ((2 << 30) if accel else (256 << 20))
  out = {"matmul_n": n, "copy_bytes": nbytes}
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  for dt in ("float32", "bfloat16"):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    t = _median_time(lambda: mm(a, a))  # noqa: F821 (a is bound; ruff misreads the del below)
    out[f"matmul_{dt}_flops_per_s"] = 2.0 * n**3 / t
    del a
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 2.0 + 1.0)
  out["copy_bytes_per_s"] = 2.0 * x.nbytes / _median_time(lambda: f(x))  # noqa: F821
  del x
  return out


# ---- compiled-step facts --------------------------------------------------------------------
def _cost(compiled) -> dict:
  try:
    ca = compiled.cost_analysis()
  except Exception as e:  # backend without cost analysis
    return {"error": repr(e)}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = dict(ca or {})
  return {
    "flops": float(ca.get("flops", float("nan"))),
    "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
    "transcendentals": float(ca.get("transcendentals", 0.0)),
  }


def counted_cost(cfg, stage, model, data, seed, part, state, shardings, batch, compiled) -> dict:
  """XLA's cost analysis (``_cost``) of ``compiled``, the step ``sparse.build`` makes for (cfg,
  stage, model), counted on the model's dense-softmax twin (``inbatch.dense_twin``: the
  row-blocked softmax runs in a loop whose body the cost analysis counts once). Compiles that
  twin's step, unless the model already is its own twin (then ``compiled`` is counted)."""
  twin = inbatch.dense_twin(model)
  if twin is model:
    return _cost(compiled)
  scfg = stage_config(cfg, stage)
  n = int(scfg.num_steps)
  tx = steps.make_optimizer(scfg, n)
  _, step = sparse.build(cfg, stage, twin, tx, loop.example_batch(data), seed, n)
  return _cost(part.compile_step(step, shardings).lower(state, batch).compile())


def _memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception as e:
    return {"error": repr(e)}
  if m is None:
    return {}
  return {
    k: int(getattr(m, k))
    for k in dir(m)
    if k.endswith("_in_bytes")
    and not k.startswith("_")
    and isinstance(getattr(m, k), (int, np.integer))
  }


def _peak_device_bytes() -> int | None:
  try:
    s = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return int(s["peak_bytes_in_use"]) if s and "peak_bytes_in_use" in s else None


def _host_peak_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _state_bytes(memory: dict, state, opt: str, model, touched_rows: int | None) -> int | None:
  """The least DRAM traffic of a step: every byte of its arguments (params, optimiser state,
  batch) read once and of its outputs written once (``memory_analysis``); for a row-sparse
  step the tables and their state count only their touched rows."""
  if "argument_size_in_bytes" not in memory:
    return None
  total = memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
  if opt == "dense" or touched_rows is None:
    return int(total)
  tables = sparse.find_tables(model, state.params)
  _, tabs = sparse.split_params(state.params, tables)
  tstate = state.opt_state["tables"]
  full = 0
  for t in tables:
    node = tstate
    for k in t.path:
      node = node[k]
    full += tabs[t.path].nbytes + sum(x.nbytes for x in jax.tree.leaves(node))
  d = tables[0].dim
  per_row = 4 * d + (8 * d if opt == "lazy_adam" else 4)
  return int(total - 2 * full + 2 * touched_rows * per_row)


def _floor(cost: dict, state_bytes: int | None, pr: dict | None, compute_dtype: str) -> dict | None:
  """The step's floor on this device: ``compute_ms`` = XLA's flops / the measured matmul rate
  of ``compute_dtype``; ``state_ms`` = the least traffic (``_state_bytes``) / the measured copy
  bandwidth; ``floor_ms`` = the larger, ``bound`` names it. ``xla_bytes_ms`` = XLA's
  'bytes accessed' / the copy bandwidth: every HLO's operands and results, intermediates that
  stay in cache included -- an upper bound of the traffic, not a floor."""
  if not pr or "flops" not in cost:
    return None
  compute_ms = cost["flops"] / pr[f"matmul_{compute_dtype}_flops_per_s"] * 1e3
  state_ms = (state_bytes or 0) / pr["copy_bytes_per_s"] * 1e3
  return {
    "compute_ms": compute_ms,
    "state_ms": state_ms,
    "state_bytes": state_bytes,
    "xla_bytes_ms": cost["bytes_accessed"] / pr["copy_bytes_per_s"] * 1e3,
    "floor_ms": max(compute_ms, state_ms),
    "bound": "compute" if compute_ms >= state_ms else "memory",
  }


# ---- batches --------------------------------------------------------------------------------
def _input_kind(cfg) -> str:
  """The input source timed (``loop.batch_source``): 'resident' with
  ``config.train.resident_on_device``, else 'grain', or 'numpy' where grain is not installed."""
  if cfg.train.resident_on_device:
    return "resident"
  try:
    import grain  # noqa: F401

    return "grain"
  except ImportError:
    return "numpy"


# ---- timed steps ----------------------------------------------------------------------------
def _time_steps(fn, state, batches: list, n_steps: int, warmup: int, repeats: int):
  """(state, metrics, seconds per step of each repeat), cycling through ``batches``."""
  i, runs, m = 0, [], None
  for _ in range(repeats):
    for _ in range(warmup):
      state, m = fn(state, batches[i % len(batches)])
      i += 1
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(n_steps):
      state, m = fn(state, batches[i % len(batches)])
      i += 1
    jax.block_until_ready((state, m))
    runs.append((time.perf_counter() - t) / n_steps)
  return state, m, runs


def _bench_step(cfg, stage, opt, model, data, part, batches, bs, b, pr):
  """Compile and time one (stage, embedding optimiser) step on the placed ``batches``.
  Returns (result dict, the compiled step, the state after the timed steps)."""
  scfg = stage_config(cfg, stage)
  c = _with(cfg, embedding_optimizer=opt)
  tx = steps.make_optimizer(scfg, int(scfg.num_steps))
  seed = stage_seed(cfg, stage)
  init_fn, step = sparse.build(
    c, stage, model, tx, loop.example_batch(data), seed, int(scfg.num_steps)
  )
  state, shardings = part.init(init_fn)
  t = time.perf_counter()
  compiled = part.compile_step(step, shardings).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  state, m, runs = _time_steps(
    compiled, state, batches, int(b.steps), int(b.warmup), int(b.repeats)
  )
  cost = counted_cost(c, stage, model, data, seed, part, state, shardings, batches[0], compiled)
  res = {
    "stage": stage,
    "embedding_optimizer": opt,
    "batch_size": bs,
    **_rates(runs, bs),
    "compile_s": compile_s,
    "cost": cost,
    "memory": _memory(compiled),
    "peak_device_bytes": _peak_device_bytes(),
    "host_peak_rss_bytes": _host_peak_rss_bytes(),
    "final_loss": float(jax.device_get(m["loss"])),
  }
  if "touched_rows" in m:
    res["touched_rows"] = int(jax.device_get(m["touched_rows"]))
  fl = _floor(
    cost,
    _state_bytes(res["memory"], state, opt, model, res.get("touched_rows")),
    pr,
    cfg.model.compute_dtype,
  )
  if fl:
    res["floor"] = fl
    res["step_over_floor"] = res["step_ms"]["median"] / max(fl["floor_ms"], 1e-12)
  return res, compiled, state


def _sparse_check(cfg, kind, model, data, part, batch, compiled_sparse, state) -> dict:
  """One step of the row-sparse optimiser ``kind`` (``compiled_sparse``) and of its masked
  dense reference from the same ``state`` (a state of that optimiser) and batch; differences
  computed on the device."""
  scfg = cfg.train
  n = int(scfg.num_steps)
  tx = steps.make_optimizer(scfg, n)
  init_fn, ref_step = sparse.build(
    _with(cfg, embedding_optimizer=kind),
    "finetune",
    model,
    tx,
    loop.example_batch(data),
    stage_seed(cfg, "finetune"),
    n,
    masked=True,
  )
  shardings = part.state_shardings(jax.eval_shape(init_fn))
  copy = lambda st: jax.tree.map(jnp.copy, st)
  s_sparse, _ = compiled_sparse(copy(state), batch)
  s_ref, _ = part.compile_step(ref_step, shardings)(copy(state), batch)
  tables = sparse.find_tables(model, state.params)

  @jax.jit
  def diffs(a, b, before, batch):
    ra, ta = sparse.split_params(a, tables)
    rb, tb = sparse.split_params(b, tables)
    _, t0 = sparse.split_params(before, tables)
    touched_max, untouched_changed, n_touched = 0.0, 0, 0
    for t in tables:
      mask = sparse.touched_mask(t, batch[t.side][t.field])[:, None]
      d = jnp.abs(ta[t.path] - tb[t.path])
      touched_max = jnp.maximum(touched_max, jnp.max(jnp.where(mask, d, 0.0)))
      untouched_changed += jnp.sum(jnp.where(mask, False, ta[t.path] != t0[t.path]))
      untouched_changed += jnp.sum(jnp.where(mask, False, tb[t.path] != t0[t.path]))
      n_touched += mask.sum()
    rest_max = jnp.max(
      jnp.stack([jnp.max(jnp.abs(x - y)) for x, y in zip(jax.tree.leaves(ra), jax.tree.leaves(rb))])
    )
    return touched_max, untouched_changed, rest_max, n_touched

  tm, uc, rm, nt = jax.device_get(diffs(s_sparse.params, s_ref.params, state.params, batch))
  return {
    "touched_rows": int(nt),
    "max_abs_diff_touched_rows": float(tm),
    "untouched_rows_changed": int(uc),
    "untouched_rows_unchanged": bool(uc == 0),
    "max_abs_diff_other_params": float(rm),
    "equal_within_1e-5": bool(tm <= 1e-5 and rm <= 1e-5 and uc == 0),
  }


def _bench_table_update(cfg, model, params, batch, b) -> dict:
  """The embedding-table part of a fine-tune step alone, per embedding optimiser.

  From the per-occurrence gradient ``[N, d]`` that the towers' backward hands to each table's
  gather (N = the batch's ids of that field) to updated tables and optimiser state --
  'dense': scatter-add into a zero ``[R, d]`` gradient, then AdamW over every row (what the
  dense step does); row-sparse: ``sparse.dedup``, segment-sum into ``[U, d]``, the row rule on
  the U rows, scatter back (``sparse.apply_rows``). Tables, state and gradients are random
  (timing only), placed like ``params``' tables; tables and state are donated.
  Returns {optimiser: {'update_ms': stats, 'compile_s'}} plus 'rows' and 'ids'.
  """
  import optax

  tables = sparse.find_tables(model, params)
  flat_params = sparse.split_params(params, tables)[1]
  n_steps = int(cfg.train.num_steps)
  key = jax.random.key(7)
  ids = {"/".join(t.path): batch[t.side][t.field] for t in tables}
  g_occ = {
    "/".join(t.path): 1e-3
    * jax.random.normal(jax.random.fold_in(key, i), ids["/".join(t.path)].shape + (t.dim,))
    for i, t in enumerate(tables)
  }
  out = {
    "rows": int(sum(t.rows for t in tables)),
    "ids": int(sum(int(np.prod(v.shape)) for v in ids.values())),
  }
  for opt in b.embedding_optimizers:

    def fresh():
      return {
        "/".join(t.path): jax.device_put(
          0.1 * jax.random.normal(jax.random.fold_in(key, 100 + i), (t.rows, t.dim)),
          flat_params[t.path].sharding,
        )
        for i, t in enumerate(tables)
      }

    tabs = fresh()
    if opt == "dense":
      tx = steps.make_optimizer(cfg.train, n_steps)
      state = tx.init(tabs)

      def upd(tabs, state, g_occ, ids):
        g = {k: jnp.zeros_like(v).at[ids[k]].add(g_occ[k]) for k, v in tabs.items()}
        u, state = tx.update(g, state, tabs)
        return optax.apply_updates(tabs, u), state
    else:
      opts = sparse.options_from_config(
        _with(cfg, embedding_optimizer=opt).train, cfg.train, n_steps
      )
      state = {
        "/".join(t.path): sparse.table_state_init(opt, tabs["/".join(t.path)]) for t in tables
      }

      def upd(tabs, state, g_occ, ids, opts=opts):
        lr = opts.learning_rate(jnp.int32(n_steps // 2))
        new_t, new_s = {}, {}
        for t in tables:
          k = "/".join(t.path)
          uniq, inv = sparse.dedup(t, ids[k])
          g = (
            jnp.zeros((uniq.shape[0], t.dim), g_occ[k].dtype)
            .at[inv.reshape(-1)]
            .add(g_occ[k].reshape(-1, t.dim))
          )
          new_t[k], new_s[k], _, _ = sparse.apply_rows(
            opts, tabs[k], state[k], uniq, sparse.gather_rows(tabs[k], uniq), g, lr, jnp.int32(1)
          )
        return new_t, new_s

    t0 = time.perf_counter()
    f = jax.jit(upd, donate_argnums=(0, 1)).lower(tabs, state, g_occ, ids).compile()
    compile_s = time.perf_counter() - t0
    tabs, state = f(tabs, state, g_occ, ids)
    runs = []
    for _ in range(int(b.repeats)):
      jax.block_until_ready((tabs, state))
      t0 = time.perf_counter()
      for _ in range(int(b.steps)):
        tabs, state = f(tabs, state, g_occ, ids)
      jax.block_until_ready((tabs, state))
      runs.append((time.perf_counter() - t0) / int(b.steps) * 1e3)
    out[opt] = {"update_ms": _stats(runs), "compile_s": compile_s}
    del tabs, state, f
  return out


# ---- input and loop -------------------------------------------------------------------------
def _bench_input(cfg, kind, data, bs, seed, part, b) -> dict:
  n = int(b.input_batches)
  total = (2 * n + 1) * int(b.repeats) + 1
  it, place = loop.batch_source(cfg, data, "finetune", bs, seed, total, part, kind)
  out = {"source": kind}
  host_runs, placed_runs = [], []
  for _ in range(int(b.repeats)):
    jax.block_until_ready(place(next(it)))  # warm-up (compiles the sampler)
    if kind != "resident":
      t = time.perf_counter()
      for _ in range(n):
        next(it)
      host_runs.append((time.perf_counter() - t) / n)
    t = time.perf_counter()
    for _ in range(n):
      x = place(next(it))
    jax.block_until_ready(x)
    placed_runs.append((time.perf_counter() - t) / n)
  if host_runs:
    out["host"] = _rates(host_runs, bs)["samples_per_s"]
  out["placed"] = _rates(placed_runs, bs)["samples_per_s"]
  if kind == "resident":
    out["resident_bytes"] = int(it.resident_bytes)
  del it
  return out


def _bench_loop(cfg, kind, compiled, state, data, bs, seed, part, b):
  """The fine-tune loop from ``state``: next batch, placement, step (no metric fetch per
  step). Returns (result, state)."""
  n, w, r = int(b.loop_steps), int(b.warmup), int(b.repeats)
  it, place = loop.batch_source(cfg, data, "finetune", bs, seed, (n + w) * r + 1, part, kind)
  runs = []
  for _ in range(r):
    for _ in range(w):
      state, m = compiled(state, place(next(it)))
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(n):
      state, m = compiled(state, place(next(it)))
    jax.block_until_ready((state, m))
    runs.append((time.perf_counter() - t) / n)
  del it
  return {"source": kind, "steps": n, **_rates(runs, bs)}, state


def _bench_eval(cfg, model, variables, data, b) -> dict:
  from sass_jax.eval import evaluate as eval_lib
  from sass_jax.eval.retrieval import topk_scores

  chunk = 4096
  out = {}
  n_items = int(min(int(b.eval_items), data.num_items))
  sub = lambda table, n: {f: np.asarray(c[:n]) for f, c in table.items()}
  # Warm-up: one chunk (compiles the encoders), then the timed runs.
  warm = min(chunk, n_items)
  eval_lib.encode_all(
    model, variables, sub(data.items, warm), sub(data.item_masks, warm), "encode_item", None, chunk
  )
  t = time.perf_counter()
  item_vecs = eval_lib.encode_all(
    model,
    variables,
    sub(data.items, n_items),
    sub(data.item_masks, n_items),
    "encode_item",
    None,
    chunk,
  )
  out["encode_items"] = {
    "items": n_items,
    "items_per_s": n_items / (time.perf_counter() - t),
    "scenarios": int(item_vecs.shape[1]),
  }
  n_users = int(min(int(b.eval_users), data.num_users))
  eval_lib.encode_all(
    model,
    variables,
    sub(data.users, min(chunk, n_users)),
    sub(data.user_masks, min(chunk, n_users)),
    "encode_user",
    0,
    chunk,
  )
  t = time.perf_counter()
  uvec = eval_lib.encode_all(
    model,
    variables,
    sub(data.users, n_users),
    sub(data.user_masks, n_users),
    "encode_user",
    0,
    chunk,
  )
  out["encode_users"] = {"users": n_users, "users_per_s": n_users / (time.perf_counter() - t)}
  corpus = np.resize(item_vecs[:, 0], (data.num_items, item_vecs.shape[-1]))
  kmax = max(cfg.eval.ks)
  # Users per top-K call: config.eval.user_chunk, capped so one chunk's float32 scores
  # (chunk x num_items) stay under 1 GiB on a CPU (8 GiB on an accelerator).
  budget = (8 << 30) if jax.devices()[0].platform != "cpu" else (1 << 30)
  uc = max(1, min(int(cfg.eval.user_chunk), budget // (4 * int(data.num_items))))
  out["user_chunk"] = uc
  # Users ranked: at most config.bench.eval_topk_scores / num_items of them (>= one chunk).
  n_topk = int(min(n_users, max(uc, float(b.eval_topk_scores) // data.num_items)))
  topk_scores(uvec[: min(uc, n_topk)], corpus, kmax, chunk_size=uc)  # compile
  t = time.perf_counter()
  topk_scores(uvec[:n_topk], corpus, kmax, chunk_size=uc)
  out["topk"] = {
    "users": n_topk,
    "corpus": int(data.num_items),
    "k": int(kmax),
    "users_per_s": n_topk / (time.perf_counter() - t),
  }
  pairs = float(data.num_users) * float(data.num_items)
  if pairs <= float(b.full_eval_max_pairs):
    ev = lambda: eval_lib.evaluate(
      model,
      variables,
      data,
      cfg.eval.split,
      tuple(cfg.eval.ks),
      cfg.eval.mask,
      uc,
      corpus=cfg.eval.corpus,
    )
    ev()
    t = time.perf_counter()
    ev()
    out["full_evaluate_s"] = time.perf_counter() - t
  else:
    out["full_evaluate_s"] = None
    out["full_evaluate_skipped"] = f"users x items = {pairs:.3g} > config.bench.full_eval_max_pairs"
  return out


def bench(cfg, workdir: str | Path, config_name: str | None = None) -> dict:
  """Run the benchmark of the module docstring; write ``WORKDIR/bench.json``; return it.

  Raises ValueError for an invalid config (``config_check.validate``, ``config.bench`` included),
  a batch size the mesh cannot split, or an embedding optimiser the model's tables do not
  support (``sparse.find_tables``).
  """
  config_check.validate(cfg, stages=())  # as --mode bench: config values only
  b = _bench_cfg(cfg)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  load_start = _load_avg()
  t_all = time.perf_counter()
  data = loop.prepare(cfg, workdir)
  model = loop.build_model(cfg, data)
  part = Partitioner(cfg.mesh)
  pr = probe(int(b.probe_matmul_n), int(b.probe_bytes)) if b.probe else None
  if pr:
    log.info("bench: probe %s", {k: f"{v:.3g}" for k, v in pr.items()})
  kind = _input_kind(cfg)
  config_opt = str(cfg.train.embedding_optimizer)
  results, keep, checks = {}, {}, {}
  for stage in STAGES:
    if stage not in b.stages or (stage == "pretrain" and data.num_scenarios < 2):
      continue
    scfg = stage_config(cfg, stage)
    bs = int(scfg.batch_size)
    part.check_batch_size(bs, f"config.{stage_block(stage)}.batch_size")
    seed = stage_seed(cfg, stage)
    it, place = loop.batch_source(cfg, data, stage, bs, seed, int(b.batches), part, kind)
    batches = [place(next(it)) for _ in range(int(b.batches))]
    del it
    opts = list(b.embedding_optimizers) if stage == "finetune" else [config_opt]
    if stage == "finetune" and config_opt not in opts:
      opts.append(config_opt)
    for opt in opts:
      log.info("bench: %s step, embedding_optimizer=%s, batch %d", stage, opt, bs)
      res, compiled, state = _bench_step(cfg, stage, opt, model, data, part, batches, bs, b, pr)
      results[f"{stage}/{opt}"] = res
      log.info(
        "bench: %s/%s %.1f ms/step (%.0f samples/s), compile %.1fs",
        stage,
        opt,
        res["step_ms"]["median"],
        res["samples_per_s"]["median"],
        res["compile_s"],
      )
      if stage == "finetune" and b.check_sparse and opt != "dense":
        log.info("bench: %s vs its masked dense reference", opt)
        checks[opt] = _sparse_check(cfg, opt, model, data, part, batches[0], compiled, state)
      if stage == "finetune" and opt == config_opt:
        keep = {"compiled": compiled, "state": state, "bs": bs, "seed": seed, "batch": batches[0]}
      del compiled, state
    del batches

  out: dict[str, Any] = {
    "config": config_name or f"{cfg.data.name} / {cfg.model.name}",
    "data": {
      "name": cfg.data.name,
      "rows": int(data.manifest["num_interactions"]),
      "users": data.num_users,
      "items": data.num_items,
      "scenarios": data.num_scenarios,
      "user_fields": [s.name for s in data.user_specs],
      "item_fields": [s.name for s in data.item_specs],
    },
    "model": {
      "name": cfg.model.name,
      "compute_dtype": cfg.model.compute_dtype,
      "embed_dim": int(cfg.model.embed_dim),
      "widths": list(cfg.model.widths),
      "out_dim": int(cfg.model.out_dim),
    },
    "settings": {
      k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in b.to_dict().items()
    },
    "mesh": {k: int(v) for k, v in part.mesh.shape.items()},
    "input_source": kind,
    "probe": pr,
    "steps": results,
  }
  if "finetune" in b.stages:
    fin = keep
    params = fin["state"].params
    out["model"]["parameters"] = int(sum(x.size for x in jax.tree.leaves(params)))
    try:
      out["model"]["embedding_rows"] = int(sum(t.rows for t in sparse.find_tables(model, params)))
    except ValueError:  # tables the row-sparse path cannot address (e.g. dssm_single)
      out["model"]["embedding_rows"] = None
    dense = results.get("finetune/dense")
    out["sparse_speedup"] = {
      o: dense["step_ms"]["median"] / results[f"finetune/{o}"]["step_ms"]["median"]
      for o in b.embedding_optimizers
      if o != "dense" and dense is not None
    }
    if b.check_sparse:
      out["sparse_check"] = checks
    log.info("bench: embedding-table update alone")
    out["table_update"] = _bench_table_update(cfg, model, params, fin["batch"], b)
    if "dense" in out["table_update"]:
      du = out["table_update"]["dense"]["update_ms"]["median"]
      out["table_update_speedup"] = {
        o: du / out["table_update"][o]["update_ms"]["median"]
        for o in b.embedding_optimizers
        if o != "dense"
      }
    log.info("bench: input (%s)", kind)
    out["input"] = _bench_input(cfg, kind, data, fin["bs"], fin["seed"], part, b)
    step_sps = results[f"finetune/{config_opt}"]["samples_per_s"]["median"]
    host = out["input"].get("host", out["input"]["placed"])["median"]
    out["input_over_step"] = host / step_sps
    out["input_placed_over_step"] = out["input"]["placed"]["median"] / step_sps
    log.info("bench: whole fine-tune loop (%s input, %s)", kind, config_opt)
    out["loop"], fin["state"] = _bench_loop(
      cfg, kind, fin.pop("compiled"), fin["state"], data, fin["bs"], fin["seed"], part, b
    )
    out["loop"]["embedding_optimizer"] = config_opt
    out["loop_over_step"] = out["loop"]["samples_per_s"]["median"] / step_sps
    log.info("bench: evaluation")
    try:
      out["eval"] = _bench_eval(cfg, model, fin.pop("state").variables, data, b)
    except Exception as e:  # e.g. out of memory: keep the step results above
      log.warning("bench: evaluation failed: %r", e)
      out["eval"] = {"error": repr(e)}
  out["machine"] = {**_machine(), "load_avg_start": load_start, "load_avg_end": _load_avg()}
  out["total_s"] = time.perf_counter() - t_all
  if jax.process_index() == 0:
    (workdir / "bench.json").write_text(json.dumps(out, indent=2) + "\n")
  return out


def summary_table(res: dict) -> str:
  """A short Markdown table of a ``bench`` result: one row per timed step, then input, loop
  and evaluation."""
  lines = [
    f"bench: {res['config']} on {res['machine']['device_kind']} "
    f"(load {res['machine']['load_avg_start']} -> {res['machine']['load_avg_end']})",
    "",
    "| what | batch | ms/step (median [min-max]) | samples/s | step / floor |",
    "|---|---|---|---|---|",
  ]
  for name, r in res["steps"].items():
    ms = r["step_ms"]
    lines.append(
      f"| {name} | {r['batch_size']} | {ms['median']:.1f} [{ms['min']:.1f}-"
      f"{ms['max']:.1f}] | {r['samples_per_s']['median']:,.0f} | "
      f"{r.get('step_over_floor', float('nan')):.1f}x |"
    )
  if "input" in res:
    lines.append(
      f"| input ({res['input']['source']}), placed | | | "
      f"{res['input']['placed']['median']:,.0f} | |"
    )
    lp = res["loop"]
    lines.append(
      f"| whole loop ({lp['embedding_optimizer']}) | | "
      f"{lp['step_ms']['median']:.1f} | {lp['samples_per_s']['median']:,.0f} | |"
    )
    ev = res["eval"]
    if "error" not in ev:
      lines.append(
        f"| eval: encode items / users, top-{ev['topk']['k']} users | | | "
        f"{ev['encode_items']['items_per_s']:,.0f} / "
        f"{ev['encode_users']['users_per_s']:,.0f} / "
        f"{ev['topk']['users_per_s']:,.0f} | |"
      )
  for o, s in res.get("table_update_speedup", {}).items():
    tu = res["table_update"]
    lines.append(
      f"| table update alone: dense / {o} | | {tu['dense']['update_ms']['median']:.1f}"
      f" / {tu[o]['update_ms']['median']:.2f} | {s:.1f}x | |"
    )
  for o, s in res.get("sparse_speedup", {}).items():
    chk = res.get("sparse_check", {}).get(o, {})
    lines.append(
      f"| dense / {o} step time | | | {s:.2f}x | max diff touched "
      f"{chk.get('max_abs_diff_touched_rows', float('nan')):.1e}, untouched "
      f"unchanged {chk.get('untouched_rows_unchanged')} |"
    )
  return "\n".join(lines)


# ==== --mode bench_input ==========================================================
def _rate_stats(rates: list[float], batch_size: int) -> dict:
  """{'batches_per_s': {median, min, max, runs}, 'samples_per_s': the same times batch_size}."""
  bb = _stats(rates)
  return {
    "batches_per_s": bb,
    "samples_per_s": {
      k: ([v * batch_size for v in x] if k == "runs" else x * batch_size) for k, x in bb.items()
    },
  }


def _timed(run: Callable[[], None], n: int) -> float:
  """Batches (or steps) per second of ``run()``, which does ``n`` of them."""
  t = time.perf_counter()
  run()
  return n / max(time.perf_counter() - t, 1e-12)


def _time_iterator(
  make_it: Callable[[], object], consume: Callable, num_batches: int, warmup: int, repeats: int
) -> list[float]:
  rates = []
  for _ in range(repeats):
    it = make_it()
    for _ in range(warmup):
      consume(next(it))

    def run():
      for _ in range(num_batches):
        consume(next(it))  # noqa: F821 (bound in the enclosing loop)

    rates.append(_timed(run, num_batches))
    del it
  return rates


def bench_input(
  cfg,
  workdir: str | Path,
  num_batches: int = 200,
  warmup: int = 10,
  repeats: int = 3,
  config_name: str | None = None,
) -> dict:
  """Time the grain input pipeline, input + placement, and the fine-tune step.

  At ``config.train.batch_size``, each ``repeats`` times after ``warmup`` batches / steps:
  ``input`` (``next(it)`` of ``pipeline.make_iterator`` as ``loop.train_stage`` builds it) for
  the fine-tune stream and, with >= 2 scenarios, the pre-train stream; ``input_placed`` (plus
  ``Partitioner.shard_batch``, blocked); ``step`` (the fine-tune step on batches placed
  beforehand). Batches/s and samples/s as median, min, max; ``input_over_step`` = fine-tune
  input samples/s / step samples/s (target >= 2). Writes ``WORKDIR/bench_input.json``.

  Raises ValueError for non-positive counts or a batch size the mesh cannot split.
  """
  if num_batches < 1 or repeats < 1 or warmup < 0:
    raise ValueError(
      f"need num_batches >= 1, repeats >= 1, warmup >= 0; got {num_batches}, {repeats}, {warmup}"
    )
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  load_start = _load_avg()
  data = loop.prepare(cfg, workdir)
  bs = int(cfg.train.batch_size)
  part = Partitioner(cfg.mesh)
  part.check_batch_size(bs, "config.train.batch_size")
  total = warmup + num_batches
  streams = ["finetune"] + (["pretrain"] if data.num_scenarios >= 2 else [])
  seeds = {s: stage_seed(cfg, s) for s in STAGES}  # as loop.train_stage

  def make(stream):
    return lambda: pipeline.make_iterator(
      data, stream, bs, seeds[stream], total, *part.data_shard()
    )

  place = lambda x: jax.block_until_ready(part.shard_batch(x))
  result_input, result_placed = {}, {}
  for stream in streams:
    log.info("bench_input: %s input, %d x %d batches of %d", stream, repeats, num_batches, bs)
    result_input[stream] = _rate_stats(
      _time_iterator(make(stream), lambda x: None, num_batches, warmup, repeats), bs
    )
    log.info("bench_input: %s input + placement", stream)
    result_placed[stream] = _rate_stats(
      _time_iterator(make(stream), place, num_batches, warmup, repeats), bs
    )

  log.info("bench_input: fine-tune step, %d x %d steps", repeats, num_batches)
  model = loop.build_model(cfg, data)
  tx = steps.make_optimizer(cfg.train, int(cfg.train.num_steps))
  init_fn = steps.make_init_fn(model, tx, loop.example_batch(data), stage_seed(cfg, "finetune"))
  state, shardings = part.init(init_fn)
  step_fn = part.compile_step(
    steps.make_finetune_step(
      model, tx, cfg.model.tau, cfg.train.logq_strength, cfg.train.negatives
    ),
    shardings,
  )
  it = make("finetune")()
  batches = [place(next(it)) for _ in range(total)]
  del it
  t = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t
  step_rates = []
  for _ in range(repeats):
    for x in batches[:warmup]:
      state, m = step_fn(state, x)
    jax.block_until_ready((state, m))
    t = time.perf_counter()
    for x in batches[warmup:]:
      state, m = step_fn(state, x)
    jax.block_until_ready((state, m))
    step_rates.append(num_batches / max(time.perf_counter() - t, 1e-12))
  loss = float(jax.device_get(m["loss"]))
  del batches, state
  result_step = {"finetune": _rate_stats(step_rates, bs)}

  median = lambda r, s="finetune": r[s]["samples_per_s"]["median"]
  step_sps = median(result_step)
  out = {
    "config": config_name or f"{cfg.data.name} / {cfg.model.name}",
    "data": {
      "name": cfg.data.name,
      "rows": int(data.manifest["num_interactions"]),
      "users": data.num_users,
      "items": data.num_items,
      "scenarios": data.num_scenarios,
      "finetune_stream_rows": int(len(data.rows("train", labeled_positive=True))),
      "pretrain_stream_rows": int(len(data.rows("train"))),
    },
    "model": cfg.model.name,
    "batch_size": bs,
    "num_batches": num_batches,
    "warmup": warmup,
    "repeats": repeats,
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
  log.info(
    "bench_input: input %.0f samples/s, input+placement %.0f, step %.0f; ratio %.2f",
    out["input_samples_per_s"],
    out["input_placed_samples_per_s"],
    step_sps,
    out["input_over_step"],
  )
  return out
