"""Ahead-of-time compilation: per-chip memory, FLOPs and collectives of the real steps for a
device topology that need not be present, and the memory preflight of real runs.

``--mode compile`` (``compile_workdir``) builds the product's ``Partitioner`` mesh over the
devices of ``config.compile.topology`` -- a TPU topology description such as 'v5e:16x16' or
'v5p:8x8x8' (``jax.experimental.topologies``; needs libtpu, not a TPU) or 'cpu' (the
process's CPU devices, e.g. 64 of them with
``XLA_FLAGS=--xla_force_host_platform_device_count=64`` standing for 8 x 8 GPUs) -- and
lowers and compiles ``pretrain_step`` and ``finetune_step`` (``sass_jax.train.sparse.build``,
as ``loop.train_stage`` does) for every embedding optimiser from abstract state and batch
(``jax.ShapeDtypeStruct`` with shardings: no data is read, nothing is allocated). The field
vocabularies come from ``config.compile.user_fields`` / ``item_fields`` / ``num_scenarios``
(data-free) or from a prepared store in ``WORKDIR/data``. It writes ``WORKDIR/compile.json``:
per compiled step the per-chip argument / output / temporary / aliased / total bytes against
the chip's memory, per-chip FLOPs, the collectives of the optimised HLO (kind, count, bytes),
compile seconds, the biggest arrays, every table's per-chip bytes and any all-gather of a whole
table.

``preflight`` (called by ``loop.train_stage``) compiles a stage's step the same way before
the state is allocated and raises ``MemoryPreflightError`` (a ValueError: one ``error:`` line
from the CLI) when the per-device bytes exceed the device's limit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sass_jax.schema import FieldSpec
from sass_jax.train.stages import STAGES, labelled_batch_size, stage_config, stage_seed

log = logging.getLogger("sass_jax")
GiB = 1 << 30
# HBM per chip by device_kind (vendor figures); config.compile.hbm_bytes overrides.
HBM_BYTES = {
  "TPU v2": 8 * GiB,
  "TPU v3": 16 * GiB,
  "TPU v4": 32 * GiB,
  "TPU v4 lite": 8 * GiB,
  "TPU v5 lite": 16 * GiB,
  "TPU v5e": 16 * GiB,
  "TPU v5": 95 * GiB,
  "TPU v5p": 95 * GiB,
  "TPU v6 lite": 32 * GiB,
  "TPU v6e": 32 * GiB,
}
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
  "collective-broadcast",
  "ragged-all-to-all",
)
_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "token": 0,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")


class MemoryPreflightError(ValueError):
  """A compiled step needs more memory per device than the device has (raised before the
  run allocates its state); the message names the stage, the bytes, the limit, the biggest
  arrays and the fix."""


# ---- fields and batches without data ------------------------------------------------------
def specs_from_config(compile_cfg) -> tuple[tuple[FieldSpec, ...], tuple[FieldSpec, ...], int]:
  """(user specs, item specs, K) from ``config.compile.user_fields`` / ``item_fields``
  (``(name, vocab_size, multi_hot)`` triples) and ``num_scenarios``; raises ValueError naming
  the field for a malformed entry."""
  out = []
  for side in ("user", "item"):
    specs = []
    for i, f in enumerate(tuple(compile_cfg[f"{side}_fields"] or ())):
      f = tuple(f)
      ok = (
        len(f) in (2, 3)
        and isinstance(f[0], str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in f[1:])
        and f[1] >= 1
        and (len(f) == 2 or f[2] >= 0)
      )
      if not ok:
        raise ValueError(
          f"config.compile.{side}_fields[{i}]={f!r}: expected (name, "
          "vocab_size >= 1, multi_hot length or 0)"
        )
      specs.append(FieldSpec(f[0], int(f[1]), int(f[2]) if len(f) == 3 else 0))
    out.append(tuple(specs))
  return out[0], out[1], int(compile_cfg.num_scenarios or 0)


def resolve_specs(cfg, workdir) -> tuple[tuple[FieldSpec, ...], tuple[FieldSpec, ...], int, str]:
  """(user specs, item specs, K, source): from ``config.compile`` when it names fields, else
  from the prepared store ``WORKDIR/data`` (its manifest only). Raises ValueError when neither
  gives them."""
  from sass_jax.data import store

  user, item, k = specs_from_config(cfg.compile)
  if user or item:
    if not (user and item and k >= 1):
      raise ValueError(
        "config.compile.user_fields, item_fields and num_scenarios must all be "
        f"set (got {len(user)} user fields, {len(item)} item fields, K={k})"
      )
    return user, item, k, "config.compile"
  path = Path(workdir) / "data"
  if store.is_complete(path):
    m = json.loads((path / "manifest.json").read_text())
    return (
      tuple(FieldSpec(**d) for d in m["user_fields"]),
      tuple(FieldSpec(**d) for d in m["item_fields"]),
      len(m["scenario_names"]),
      str(path),
    )
  raise ValueError(
    f"--mode compile needs the field vocabularies: set config.compile."
    f"user_fields / item_fields / num_scenarios, or prepare the data into "
    f"{path} first (--mode prepare)"
  )


def _features(specs: Sequence[FieldSpec], n: int, make: Callable) -> dict:
  out = {}
  for s in specs:
    shape = (n, s.multi_hot) if s.multi_hot else (n,)
    out[s.name] = make(shape, np.int32)
    if s.multi_hot:
      out[f"{s.name}_mask"] = make(shape, np.bool_)
  return out


def example_batch(user_specs, item_specs) -> dict:
  """A 2-row all-zero batch ({'user', 'item', 'scenario'}) for ``model.init`` (the shapes of
  ``loop.example_batch`` without data)."""
  z = lambda shape, dt: np.zeros(shape, dt)
  return {
    "user": _features(user_specs, 2, z),
    "item": _features(item_specs, 2, z),
    "scenario": np.zeros(2, np.int32),
  }


def abstract_batch(
  user_specs, item_specs, stage: str, batch_size: int, sharding=None, labelled: int = 0
) -> dict:
  """ShapeDtypeStructs of one global batch of ``stage`` ('pretrain' / 'finetune'), as
  ``pipeline.BatchFn`` builds it: features int32 [B] / [B, L] (+ bool masks), 'scenario',
  'user_index', 'item_index' int32 [B], 'item_logq' float32 [B] (finetune) or 'user_views' /
  'item_views' int32 [B, 2] (pretrain); every array with ``sharding`` when given. ``labelled``
  > 0 (finetune): also 'labelled' = {'user', 'item': features, 'scenario' int32, 'label'
  float32} of that many rows (``stages.labelled_batch_size``)."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, jnp.dtype(dt), sharding=sharding)
  b = int(batch_size)
  batch = {
    "user": _features(user_specs, b, sds),
    "item": _features(item_specs, b, sds),
    "scenario": sds((b,), np.int32),
    "user_index": sds((b,), np.int32),
    "item_index": sds((b,), np.int32),
  }
  if stage == "finetune":
    batch["item_logq"] = sds((b,), np.float32)
    if labelled:
      n = int(labelled)
      batch["labelled"] = {
        "user": _features(user_specs, n, sds),
        "item": _features(item_specs, n, sds),
        "scenario": sds((n,), np.int32),
        "label": sds((n,), np.float32),
      }
  else:
    batch["user_views"] = sds((b, 2), np.int32)
    batch["item_views"] = sds((b, 2), np.int32)
  return batch


# ---- devices ---------------------------------------------------------------------------------
def topology_devices(topology: str) -> list:
  """The devices of ``topology``: 'cpu' (this process's CPU devices) or a TPU topology name
  ('v5e:2x2', 'v5e:16x16', 'v5p:8x8x8', 'v4:8x8x8', 'v6e:16x16', ...), described by libtpu
  without a TPU. Raises ValueError when the name does not resolve."""
  topology = str(topology).strip()
  if topology.lower() == "cpu":
    return list(jax.devices("cpu"))
  # Only a description is loaded, never a chip: let it coexist with another process that
  # holds libtpu (a training run, another compile), which libtpu's lockfile would refuse.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  except Exception as e:  # libtpu missing or an unknown name: one line
    raise ValueError(
      f"config.compile.topology={topology!r} does not resolve to a TPU topology "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); use a "
      "name like 'v5e:16x16' or 'v5p:8x8x8' (needs libtpu installed: pip "
      "install 'jax[tpu]'), or 'cpu'"
    ) from None
  return list(topo.devices)


def chip_memory(device, override: int = 0) -> int | None:
  """Bytes of memory per device: ``override`` when > 0, else the device's reported
  ``bytes_limit`` (a live device), else the chip's HBM by ``device_kind`` (``HBM_BYTES``),
  else None (e.g. CPU)."""
  if override and int(override) > 0:
    return int(override)
  try:
    stats = device.memory_stats()
  except Exception:
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return HBM_BYTES.get(getattr(device, "device_kind", ""))


# ---- compiled-program facts -----------------------------------------------------------------
def _array_bytes(type_str: str) -> tuple[int, list]:
  """(bytes, [(dtype, dims)]) of every array in an HLO type string (a tuple counts all)."""
  total, arrays = 0, []
  for dt, dims in _ARRAY.findall(type_str):
    if dt not in _DTYPE_BYTES:
      continue
    shape = tuple(int(x) for x in dims.split(",") if x)
    arrays.append((dt, shape))
    total += int(math.prod(shape) * _DTYPE_BYTES[dt])
  return total, arrays


def hlo_instructions(hlo_text: str):
  """Yield (computation, name, result type, opcode, rest of line) of every instruction of an
  HLO module's text, skipping fused computations (their values are never materialised)."""
  comp = None
  for line in hlo_text.splitlines():
    s = line.strip()
    if not s or s.startswith("//"):
      continue
    if s.endswith("{") and "=" not in s.split("(")[0]:
      comp = s.split()[1] if s.startswith("ENTRY") else s.split()[0]
      comp = comp.lstrip("%")
      continue
    if s == "}":
      comp = None
      continue
    if comp is None or "fused" in comp or comp.startswith("fusion"):
      continue
    m = _INSTR.match(s)
    if m:
      yield comp, m.group(1), m.group(2), m.group(3), m.group(4)


def collectives(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} of the collectives in optimised HLO text (per device; async
  pairs counted once, at their '-done'; ops inside loops counted once)."""
  out: dict = defaultdict(lambda: {"count": 0, "bytes": 0})
  for _, _, typ, op, _ in hlo_instructions(hlo_text):
    kind = op[:-5] if op.endswith("-done") else op
    if op.endswith("-start") or kind not in COLLECTIVES:
      continue
    out[kind]["count"] += 1
    out[kind]["bytes"] += _array_bytes(typ)[0]
  return {k: dict(v) for k, v in sorted(out.items())}


def largest_collectives(hlo_text: str, n: int = 12) -> list[dict]:
  """The ``n`` largest collectives of optimised HLO text (per device): {'kind', 'bytes',
  'shape', 'source'} (source: the JAX operation from the HLO metadata, when kept)."""
  out = []
  for _, name, typ, op, rest in hlo_instructions(hlo_text):
    kind = op[:-5] if op.endswith("-done") else op
    if op.endswith("-start") or kind not in COLLECTIVES:
      continue
    src = re.search(r'op_name="([^"]*)"', rest)
    out.append(
      {
        "kind": kind,
        "bytes": _array_bytes(typ)[0],
        "shape": re.sub(r"\{[^}]*\}", "", typ),
        "source": (src.group(1) if src else name)[-120:],
      }
    )
  out.sort(key=lambda v: -v["bytes"])
  return out[:n]


def table_all_gathers(hlo_text: str, tables: Sequence[dict]) -> list[str]:
  """All-gathers (or all-to-alls) whose result holds a whole table's rows (the leading dim
  of an array equal to a sharded table's rows): each as 'name: type'."""
  rows = {t["rows"] for t in tables if t["shards"] > 1}
  bad = []
  for _, name, typ, op, _ in hlo_instructions(hlo_text):
    kind = op[:-5] if op.endswith("-done") else op
    if kind in ("all-gather", "all-to-all", "collective-permute") and not op.endswith("-start"):
      if any(dims and dims[0] in rows for _, dims in _array_bytes(typ)[1]):
        bad.append(f"{name}: {typ.split(' ')[0]}")
  return bad


def biggest_arrays(hlo_text: str, n: int = 8) -> list[dict]:
  """The ``n`` largest values (per device) of the compiled program outside fusions: {'bytes',
  'shape', 'op', 'source'} (source: the JAX operation from the HLO metadata)."""
  vals = []
  seen = set()
  for comp, name, typ, op, rest in hlo_instructions(hlo_text):
    if op in ("get-tuple-element", "tuple", "bitcast", "copy-done", "copy-start"):
      continue
    nbytes, arrays = _array_bytes(typ)
    if not arrays:
      continue
    src = re.search(r'op_name="([^"]*)"', rest)
    key = (typ.split("{")[0], op, src.group(1) if src else "")
    if key in seen:
      continue
    seen.add(key)
    vals.append(
      {
        "bytes": nbytes,
        "shape": re.sub(r"\{[^}]*\}", "", typ),
        "op": op,
        "source": (src.group(1) if src else name)[-120:],
      }
    )
  vals.sort(key=lambda v: -v["bytes"])
  return vals[:n]


def memory_report(compiled) -> dict:
  """Per-device bytes of a compiled step: arguments, outputs, temporaries, aliased (outputs
  written in place of donated arguments), generated code, and total = arguments + outputs +
  temporaries - aliased (what the step holds at its peak)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  r = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "generated_code_bytes": int(m.generated_code_size_in_bytes),
  }
  r["total_bytes"] = r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
  return r


def cost_report(compiled) -> dict:
  """Per-device FLOPs and bytes accessed of one step (XLA's cost analysis)."""
  try:
    ca = compiled.cost_analysis()
  except Exception as e:  # a backend without cost analysis
    return {"error": repr(e)}
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  ca = dict(ca or {})
  return {
    "flops": float(ca.get("flops", float("nan"))),
    "bytes_accessed": float(ca.get("bytes accessed", float("nan"))),
  }


# ---- the steps ------------------------------------------------------------------------------
def _with_optimizer(cfg, optimizer: str | None):
  c = cfg.copy_and_resolve_references()
  if optimizer is not None:
    c.train.embedding_optimizer = optimizer
  return c


def lower_stage(
  cfg,
  stage: str,
  model,
  part,
  user_specs,
  item_specs,
  num_steps: int | None = None,
  init_params=None,
):
  """(jitted step, abstract state, abstract batch, state shardings, init_fn) of ``stage``
  exactly as ``loop.train_stage`` builds them (``sparse.build`` for
  ``config.train.embedding_optimizer``, the nan policy, ``Partitioner.compile_step``), with
  nothing allocated (``init_fn``, for ``Partitioner.init``, allocates the state when called)."""
  from sass_jax.train import sparse, steps

  scfg = stage_config(cfg, stage)
  num_steps = int(scfg.num_steps) if num_steps is None else int(num_steps)
  tx = steps.make_optimizer(scfg, num_steps)
  seed = stage_seed(cfg, stage)
  init_fn, step = sparse.build(
    cfg,
    stage,
    model,
    tx,
    example_batch(user_specs, item_specs),
    seed,
    num_steps,
    init_params,
    batch_sharding=part.batch_sharding(),
  )
  step = steps.with_nan_policy(step, cfg.train.nan_policy, int(cfg.train.debug_nan_at_step))
  abstract, shardings = part.abstract_state(init_fn)
  batch = abstract_batch(
    user_specs,
    item_specs,
    stage,
    int(scfg.batch_size),
    part.batch_sharding(),
    labelled=labelled_batch_size(cfg, stage),
  )
  return part.compile_step(step, shardings), abstract, batch, shardings, init_fn


def table_report(model, part, abstract_state, hlo_text: str) -> list[dict]:
  """Per embedding table: rows, dim, global bytes, shards, per-chip bytes (from the compiled
  program's parameter of the table's shard shape) and its mesh axes."""
  from flax import traverse_util

  params = (
    {"params": abstract_state.params} if not isinstance(abstract_state, dict) else abstract_state
  )
  flat = traverse_util.flatten_dict(params["params"])
  param_shapes = defaultdict(int)
  for comp, _, typ, op, _ in hlo_instructions(hlo_text):
    if op == "parameter" and ("main" in comp or "ENTRY" in comp or comp.startswith("main")):
      for dt, dims in _array_bytes(typ)[1]:
        param_shapes[(dt, dims)] += 1
  out = []
  for path, leaf in flat.items():
    if "embed" not in path or len(leaf.shape) != 2:
      continue
    shard = leaf.sharding.shard_shape(leaf.shape)
    itemsize = jnp.dtype(leaf.dtype).itemsize
    dt = {4: "f32", 2: "bf16"}.get(itemsize, "f32")
    out.append(
      {
        "table": "/".join(path),
        "rows": int(leaf.shape[0]),
        "dim": int(leaf.shape[1]),
        "bytes": int(math.prod(leaf.shape) * itemsize),
        "shards": int(leaf.shape[0] // shard[0]),
        "spec": str(leaf.sharding.spec),
        "per_chip_bytes": int(math.prod(shard) * itemsize),
        "hlo_parameters_of_shard_shape": param_shapes.get((dt, tuple(shard)), 0),
      }
    )
  return out


def compile_one(
  cfg, stage: str, optimizer: str | None, model, part, user_specs, item_specs, hbm: int | None
) -> dict:
  """Lower and compile one stage's step; the report dict of ``compile_workdir``."""
  c = _with_optimizer(cfg, optimizer)
  fn, state, batch, _, _ = lower_stage(c, stage, model, part, user_specs, item_specs)
  t = time.perf_counter()
  lowered = fn.lower(state, batch)
  t_lower = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t
  text = compiled.as_text()
  mem = memory_report(compiled)
  tables = table_report(model, part, state, text)
  coll = collectives(text)
  table_bytes = sum(t["per_chip_bytes"] for t in tables)
  r = {
    "stage": stage,
    "embedding_optimizer": c.train.embedding_optimizer,
    "batch_size": int(stage_config(c, stage).batch_size),
    "lower_seconds": round(t_lower, 2),
    "compile_seconds": round(t_compile, 2),
    "memory": mem,
    "cost": cost_report(compiled),
    "collectives": coll,
    "collective_bytes": int(sum(v["bytes"] for v in coll.values())),
    "largest_collectives": largest_collectives(text),
    "table_bytes_per_chip": int(table_bytes),
    "table_all_gathers": table_all_gathers(text, tables),
    "biggest_arrays": biggest_arrays(text),
    "tables": tables,
  }
  if hbm and mem:
    r["hbm_bytes"] = int(hbm)
    r["fits"] = mem["total_bytes"] <= hbm
    r["headroom"] = round(1.0 - mem["total_bytes"] / hbm, 4)
  return r


def build_partitioner(cfg, devices):
  """The Partitioner over ``devices`` with ``config.compile.mesh`` (data, model) when set,
  else ``config.mesh``'s sizes."""
  import ml_collections
  from sass_jax.partition import Partitioner

  mesh = cfg.mesh.to_dict()
  shape = tuple(cfg.compile.mesh or ())
  if shape:
    if len(shape) != 2:
      raise ValueError(f"config.compile.mesh={shape}: expected (data, model), e.g. (16, 16)")
    mesh["data"], mesh["model"] = int(shape[0]), int(shape[1])
  return Partitioner(ml_collections.ConfigDict(mesh), devices=devices)


def compile_workdir(cfg, workdir, print_fn: Callable[[str], Any] | None = print) -> dict:
  """``--mode compile``: compile every stage x embedding optimiser of ``config.compile`` for
  ``config.compile.topology`` and write ``WORKDIR/compile.json`` (module docstring).

  Returns the report: 'topology', 'device_kind', 'num_devices', 'mesh', 'table_layout',
  'hbm_bytes', 'fields' (source, rows, table bytes) and 'steps' (one dict per compiled step:
  'memory', 'cost', 'collectives', 'collective_bytes', 'largest_collectives',
  'compile_seconds', 'tables',
  'table_all_gathers', 'biggest_arrays', 'fits', 'headroom').
  Raises ValueError for an invalid config, an unknown topology or missing field sizes.
  """
  from sass_jax import config_check
  from sass_jax.model import registry

  cc = cfg.compile
  stages = tuple(cc.stages)
  opts = tuple(cc.embedding_optimizers)
  config_check.validate(cfg, stages=())  # config.compile.* before any topology is built
  devices = topology_devices(cc.topology)
  part = build_partitioner(cfg, devices)
  config_check.validate(cfg, partitioner=part, stages=stages)
  user_specs, item_specs, k, source = resolve_specs(cfg, workdir)
  model = registry.build(cfg.model, user_specs, item_specs, k)
  hbm = chip_memory(devices[0], int(cc.hbm_bytes or 0))
  from sass_jax.model.embedding import padded_rows

  rows = sum(padded_rows(s.vocab_size, cfg.model.vocab_pad_to) for s in user_specs + item_specs)
  report = {
    "topology": str(cc.topology),
    "platform": devices[0].platform,
    "device_kind": getattr(devices[0], "device_kind", ""),
    "num_devices": len(devices),
    "mesh": dict(part.mesh.shape),
    "table_layout": part.table_layout,
    "hbm_bytes": hbm,
    "model": cfg.model.name,
    "fields": {
      "source": source,
      "num_scenarios": k,
      "user": [list(map(str, (s.name, s.vocab_size, s.multi_hot))) for s in user_specs],
      "item": [list(map(str, (s.name, s.vocab_size, s.multi_hot))) for s in item_specs],
      "table_rows": int(rows),
      "table_bytes": int(rows * cfg.model.embed_dim * 4),
    },
    "steps": [],
  }
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  for stage in stages:
    if stage == "pretrain" and int(cfg.pretrain.num_steps) <= 0:
      continue
    for opt in opts:
      r = compile_one(cfg, stage, opt, model, part, user_specs, item_specs, hbm)
      report["steps"].append(r)
      if print_fn:
        print_fn(step_line(r))
      tmp = out / ".compile.json.tmp"  # complete after every step; replaced atomically
      tmp.write_text(json.dumps(report, indent=2))
      tmp.replace(out / "compile.json")
  return report


def _gb(x) -> str:
  return f"{x / 1e9:.2f}"


def step_line(r: dict) -> str:
  m = r["memory"]
  fit = ""
  if "hbm_bytes" in r:
    fit = (
      f" of {_gb(r['hbm_bytes'])} GB ({'fits' if r['fits'] else 'DOES NOT FIT'}, "
      f"headroom {100 * r['headroom']:.0f}%)"
    )
  return (
    f"{r['stage']:8s} {r['embedding_optimizer']:15s} total {_gb(m['total_bytes'])} GB"
    f"{fit}; args {_gb(m['argument_bytes'])} temps {_gb(m['temp_bytes'])} GB; "
    f"{r['cost'].get('flops', float('nan')) / 1e9:.1f} GFLOP; collectives "
    f"{r['collective_bytes'] / 1e6:.1f} MB; compiled in {r['compile_seconds']:.1f}s"
  )


def summary_table(report: dict) -> str:
  """Markdown table of a compile report, one row per compiled step (per-chip numbers)."""
  head = (
    f"{report['topology']} ({report['num_devices']} x {report['device_kind'] or report['platform']}), "
    f"mesh {report['mesh']}, tables '{report['table_layout']}', "
    f"{report['fields']['table_rows']:,} table rows ({_gb(report['fields']['table_bytes'])} GB)"
  )
  lines = [
    head,
    "",
    "| stage | embedding optimiser | args GB | outputs GB | temps GB | aliased GB | "
    "total GB | HBM GB | headroom | GFLOP | collective MB | table all-gathers | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["steps"]:
    m = r["memory"]
    head = f"{100 * r['headroom']:.0f}%" if "headroom" in r else "n/a"
    lines.append(
      f"| {r['stage']} | {r['embedding_optimizer']} | {_gb(m['argument_bytes'])} | "
      f"{_gb(m['output_bytes'])} | {_gb(m['temp_bytes'])} | {_gb(m['alias_bytes'])} | "
      f"{_gb(m['total_bytes'])} | {_gb(r['hbm_bytes']) if 'hbm_bytes' in r else 'n/a'} | "
      f"{head} | "
      f"{r['cost'].get('flops', float('nan')) / 1e9:.1f} | {r['collective_bytes'] / 1e6:.1f} | "
      f"{len(r['table_all_gathers'])} | {r['compile_seconds']:.1f} |"
    )
  return "\n".join(lines)


# ---- preflight of real runs -----------------------------------------------------------------
def memory_limit(cfg, part) -> int | None:
  """The per-device byte limit a run's steps are checked against: ``config.mesh.
  memory_limit_bytes`` when > 0, else the smallest ``bytes_limit`` the mesh's local devices
  report, else None (e.g. CPU: no check)."""
  given = int(cfg.mesh.memory_limit_bytes or 0)
  if given > 0:
    return given
  limits = []
  for d in part.mesh.local_devices:
    try:
      s = d.memory_stats()
    except Exception:
      s = None
    if s and s.get("bytes_limit"):
      limits.append(int(s["bytes_limit"]))
  return min(limits) if limits else None


def preflight(stage: str, jitted, abstract_state, abstract_batch_, limit: int, where: str):
  """Compile ``jitted`` for the abstract state and batch and check its per-device memory.

  Returns the compiled executable (callable on the real state and batches). Raises
  MemoryPreflightError when arguments + outputs + temporaries - aliased > ``limit``; the
  message names the stage, the bytes, the limit, the biggest arrays and the fixes.
  """
  compiled = jitted.lower(abstract_state, abstract_batch_).compile()
  mem = memory_report(compiled)
  if mem and mem["total_bytes"] > limit:
    big = ", ".join(
      f"{a['shape']} {a['bytes'] / 1e6:.0f} MB ({a['source'].split('/')[-1]})"
      for a in biggest_arrays(compiled.as_text(), 3)
    )
    raise MemoryPreflightError(
      f"the {stage} step needs {_gb(mem['total_bytes'])} GB per device (arguments "
      f"{_gb(mem['argument_bytes'])} + outputs {_gb(mem['output_bytes'])} + temporaries "
      f"{_gb(mem['temp_bytes'])} - aliased {_gb(mem['alias_bytes'])} GB) but a device has "
      f"{_gb(limit)} GB ({where}); biggest arrays: {big}. Nothing was allocated. Use a "
      "row-sparse optimiser (config.train.embedding_optimizer='lazy_adam' or "
      "'rowwise_adagrad'), split the tables over more devices (config.mesh.table_layout='all', "
      f"more devices), or a smaller config.{'pretrain' if stage == 'pretrain' else 'train'}"
      ".batch_size"
    )
  log.info(
    "%s: compiled step needs %s GB per device of %s GB",
    stage,
    _gb(mem.get("total_bytes", 0)),
    _gb(limit),
  )
  return compiled
