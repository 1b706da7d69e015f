"""Export a trained run for serving, and top-K recommendations for one user (docs/design.md §4,
"report / export").

``--mode export`` (:func:`export_workdir`) restores the latest fine-tuned parameters and writes
to ``config.export.dir`` (default ``WORKDIR/export``)::

    manifest.json            dims, scenarios, files, the user encoder's input signature,
                             model name, checkpoint step
    user_encoder.jax         the user tower as a serialised ``jax.export.Exported``
                             (parameters baked in; load with :func:`load_user_encoder`)
    item_ids.npy             str [num_items]: row -> raw item id (the same for every scenario)
    items/<scenario>.npy     float32 [num_items, D]: every item's vector in that scenario
    items/<scenario>.parquet columns item_index int32, item_id string,
                             embedding fixed_size_list<float32>[D]

User encoder signature (``f(features, scenario) -> float32 [b, D]``, b symbolic):

- ``features``: dict with one entry per user field of the prepared store, in vocabulary ids
  (after the vocabulary; 0 is the unknown value): ``int32 [b]`` for a single-valued field,
  ``int32 [b, L]`` plus ``'<field>_mask'`` ``bool [b, L]`` for a multi-valued field -- exactly
  what ``pipeline.gather_features(data.users, data.user_masks, rows)`` returns
  (:func:`user_features` does that from raw user ids). Valid ids lie in ``[0, vocab_size)``
  (``manifest['user_encoder']['valid_ranges']``; a multi-hot entry whose mask is False is not
  checked); a row with any other id comes back as NaN.
- ``scenario``: ``int32 [b]`` in ``[0, K)`` (index into ``manifest['scenario_names']``); a row
  with a scenario outside that range comes back as NaN. :func:`load_user_encoder`'s callable
  raises ValueError for such inputs instead of returning NaN rows.
- output: float32 ``[b, D]``, L2-normalised; the retrieval score of an item is the inner
  product with its row of ``items/<scenario>.npy`` (the model's logit is score / tau).

The export is written into a temporary sibling directory (``.<dir>.tmp-*``) and renamed into
place once complete, so a reader (or an export cut short) sees the previous export or the new
one, never a mix; the directory is replaced as a whole.

``--mode recommend`` (:func:`recommend`) prints the top-K items of one raw user id in one
scenario, scored exactly like the evaluation (docs/design.md §5), with the user's positives of
the masked splits (``config.eval.mask``) in that scenario removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sass_jax import checkpoint as ckpt_lib
from sass_jax.data import pipeline
from sass_jax.data.store import SPLITS, PreparedData
from sass_jax.schema import FieldSpec
from sass_jax.eval import evaluate as eval_lib
from sass_jax.eval.retrieval import topk_scores
from sass_jax.partition import Partitioner
from sass_jax.train import loop
from sass_jax.train.steps import as_variables

log = logging.getLogger("sass_jax")
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export lowering targets
USER_ENCODER_FILE = "user_encoder.jax"
MANIFEST_FILE = "manifest.json"
ITEM_IDS_FILE = "item_ids.npy"


class UnknownIdError(ValueError):
  """A raw user id or scenario name that the prepared data does not hold (message lists the
  valid values or examples of them)."""


# --------------------------------------------------------------------------- raw ids -> features


def user_rows(data: PreparedData, raw_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
  """int64 [B]: the user-table rows of raw user ids (compared as strings, e.g. ``'42'``).

  Raises UnknownIdError naming the first unknown id and a few valid ones.
  """
  q = np.atleast_1d(np.asarray(raw_ids)).astype(str)
  known = np.asarray(data.user_raw_ids).astype(str)
  order = np.argsort(known, kind="stable")
  pos = np.searchsorted(known[order], q)
  pos_c = np.minimum(pos, len(known) - 1)
  found = (pos < len(known)) & (known[order][pos_c] == q) if len(known) else np.zeros(len(q), bool)
  if not found.all():
    bad = str(q[np.flatnonzero(~found)[0]])
    examples = ", ".join(repr(str(x)) for x in known[:5])
    raise UnknownIdError(
      f"user {bad!r} is not in the prepared data at {data.path} "
      f"({len(known)} users, e.g. {examples})"
    )
  return order[pos_c].astype(np.int64)


def user_features(data: PreparedData, raw_ids: Sequence[Any] | np.ndarray) -> dict:
  """The user encoder's ``features`` for raw user ids: field -> int32 [B] / [B, L],
  '<field>_mask' -> bool [B, L] (``pipeline.gather_features`` of their rows).

  Raises UnknownIdError for an id the prepared data does not hold.
  """
  return pipeline.gather_features(data.users, data.user_masks, user_rows(data, raw_ids))


def scenario_index(data: PreparedData, name: str) -> int:
  """Index of scenario ``name``; raises UnknownIdError listing the valid names."""
  if name not in data.scenario_names:
    raise UnknownIdError(
      f"config.recommend.scenario={name!r} is not a scenario of the data; "
      f"expected one of {list(data.scenario_names)}"
    )
  return data.scenario_names.index(name)


# --------------------------------------------------------------------------- user encoder


def input_signature(user_specs: Sequence[FieldSpec]) -> dict:
  """The user encoder's feature inputs: name -> {'shape': ['b'] or ['b', L], 'dtype',
  'vocab_size' (id fields)}; masks are bool, ids int32."""
  sig = {}
  for s in user_specs:
    shape = ["b", s.multi_hot] if s.multi_hot else ["b"]
    sig[s.name] = {"shape": shape, "dtype": "int32", "vocab_size": int(s.vocab_size)}
    if s.multi_hot:
      sig[f"{s.name}_mask"] = {"shape": shape, "dtype": "bool"}
  return sig


def user_encoder_fn(
  model, variables, user_specs: Sequence[FieldSpec], num_scenarios: int
) -> Callable:
  """``f(features, scenario) -> float32 [B, D]`` with the variables closed over (host copies).

  Same values as ``model.apply(variables, features, scenario, method='encode_user')`` for ids
  in range; a row with an id outside ``[0, vocab_size)`` (a multi-hot entry counts only where
  its mask is True) or a scenario outside ``[0, num_scenarios)`` comes back as NaN, never as a
  normal-looking vector.
  """
  host = as_variables(jax.device_get(variables))
  vocab = {s.name: int(s.vocab_size) for s in user_specs}
  multi = {s.name for s in user_specs if s.multi_hot}

  def fn(features, scenario):
    feats = dict(features)
    ok = (scenario >= 0) & (scenario < num_scenarios)
    for name, v in vocab.items():
      ids = feats[name]
      good = (ids >= 0) & (ids < v)
      feats[name] = jnp.where(good, ids, 0)
      if name in multi:
        good = (good | ~feats[f"{name}_mask"].astype(bool)).all(axis=1)
      ok = ok & good
    r = model.apply(host, feats, scenario, method="encode_user")
    return jnp.where(ok[:, None], r, jnp.nan).astype(jnp.float32)

  return fn


def export_user_encoder(
  model,
  variables,
  user_specs: Sequence[FieldSpec],
  num_scenarios: int,
  platforms: Sequence[str] | None = None,
) -> bytes:
  """Serialise the user tower with ``jax.export`` and a symbolic batch dimension 'b'.

  Returns the bytes of ``jax.export.export(jax.jit(fn))(...).serialize()`` (see the module
  docstring for the signature). ``platforms``: lowering targets (e.g. ('cpu', 'cuda')); None
  is the current backend only. Raises ValueError if lowering for a platform fails.
  """
  (b,) = jax.export.symbolic_shape("b")
  # The 'grouped' per-scenario compute sizes its row tiles from the batch size, which is
  # symbolic here: serialise the 'onehot' formulation, the same function of the same parameters.
  mc = getattr(model, "cfg", None)
  if dataclasses.is_dataclass(mc) and getattr(mc, "scenario_compute", "onehot") != "onehot":
    model = type(model)(dataclasses.replace(mc, scenario_compute="onehot"))
  feats = {}
  for name, d in input_signature(user_specs).items():
    shape = tuple(b if x == "b" else x for x in d["shape"])
    feats[name] = jax.ShapeDtypeStruct(shape, jnp.dtype(d["dtype"]))
  fn = user_encoder_fn(model, variables, user_specs, num_scenarios)
  exp = jax.export.export(jax.jit(fn), platforms=tuple(platforms) if platforms else None)(
    feats, jax.ShapeDtypeStruct((b,), jnp.int32)
  )
  return bytes(exp.serialize())


@dataclasses.dataclass
class UserEncoder:
  """A deserialised user encoder: ``enc(features, scenario) -> np.ndarray float32 [B, D]``.

  Inputs are cast to the exported dtypes (int32 ids, bool masks); keys not in
  ``feature_names`` are ignored. Raises KeyError naming a missing feature, ValueError for
  mismatched batch sizes or (when the manifest is known) a scenario outside [0, K).
  """

  exported: Any
  feature_names: tuple[str, ...]
  manifest: dict | None = None

  def __call__(self, features: dict, scenario) -> np.ndarray:
    missing = [n for n in self.feature_names if n not in features]
    if missing:
      raise KeyError(f"user encoder inputs missing {missing}; expected {list(self.feature_names)}")
    avals = self.exported.in_avals
    args = {
      n: np.asarray(features[n], dtype=a.dtype)
      for n, a in zip(self.feature_names, avals[: len(self.feature_names)])
    }
    sc = np.atleast_1d(np.asarray(scenario, dtype=np.int32))
    sizes = {len(v) for v in args.values()} | {len(sc)}
    if len(sizes) != 1:
      raise ValueError(f"user encoder inputs have different batch sizes {sorted(sizes)}")
    if self.manifest is not None:
      check_inputs(self.manifest, args, sc)
    return np.asarray(self.exported.call(args, sc))


def valid_ranges(user_specs: Sequence[FieldSpec], scenario_names: Sequence[str]) -> dict:
  """The user encoder's valid input ranges as written to the manifest: ``{'features': {field:
  [0, vocab_size]}, 'scenario': [0, K], 'note': ...}`` (half-open intervals)."""
  return {
    "features": {s.name: [0, int(s.vocab_size)] for s in user_specs},
    "scenario": [0, len(scenario_names)],
    "note": "half-open [lo, hi); a row with an id or scenario outside its range comes "
    "back as NaN (a multi-hot entry is checked only where its mask is True); "
    "sass_jax.export.load_user_encoder(...) raises ValueError instead",
  }


def check_inputs(manifest: dict, features: dict, scenario) -> None:
  """Raise ValueError naming the first feature (or the scenario) with a value outside the
  ranges of ``manifest`` (``user_encoder.valid_ranges``, else the input signature's
  ``vocab_size`` and ``scenario_names``); values are ``features[field]`` int [B] / [B, L] with
  ``'<field>_mask'`` bool [B, L] for multi-hot fields, ``scenario`` int [B]."""
  ue = manifest.get("user_encoder", {})
  ranges = ue.get("valid_ranges") or {
    "features": {
      n: [0, d["vocab_size"]]
      for n, d in ue.get("inputs", {}).get("features", {}).items()
      if "vocab_size" in d
    },
    "scenario": [0, len(manifest["scenario_names"])],
  }
  for name, (lo, hi) in ranges["features"].items():
    if name not in features:
      continue
    ids = np.asarray(features[name])
    bad = (ids < lo) | (ids >= hi)
    if f"{name}_mask" in features and ids.ndim == 2:
      bad &= np.asarray(features[f"{name}_mask"], bool)
    if bad.any():
      row = int(np.argwhere(bad)[0][0])
      raise ValueError(
        f"user feature {name!r} must lie in [{lo}, {hi}) (its vocabulary; 0 is "
        f"the unknown value), got {ids[row].tolist()} in row {row}"
      )
  sc = np.atleast_1d(np.asarray(scenario))
  lo, hi = ranges["scenario"]
  if len(sc) and (sc.min() < lo or sc.max() >= hi):
    raise ValueError(
      f"scenario ids must lie in [{lo}, {hi}) ({manifest.get('scenario_names')}), got {sc.tolist()}"
    )


def load_user_encoder(path: str | Path) -> UserEncoder:
  """Load ``user_encoder.jax`` (or an export directory holding it) with ``jax.export.deserialize``.

  Reads the manifest.json beside it if there is one. Raises FileNotFoundError naming the path.
  """
  path = Path(path)
  if path.is_dir():
    path = path / USER_ENCODER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no user encoder at {path}; run --mode export first")
  exp = jax.export.deserialize(bytearray(path.read_bytes()))
  feats_tree = exp.in_tree.children()[0].children()[0]  # ((features, scenario), {})
  names = tuple(jax.tree_util.tree_unflatten(feats_tree, range(feats_tree.num_leaves)).keys())
  man_path = path.parent / MANIFEST_FILE
  manifest = json.loads(man_path.read_text()) if man_path.is_file() else None
  return UserEncoder(exp, names, manifest)


# --------------------------------------------------------------------------- items


def _slug(name: str, used: set) -> str:
  s = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "scenario"
  while s in used:
    s += "_"
  used.add(s)
  return s


def write_items_parquet(path: str | Path, raw_ids: np.ndarray, emb: np.ndarray):
  """One scenario's items as Parquet: item_index int32, item_id string, embedding
  fixed_size_list<float32>[D] (``emb`` float32 [N, D])."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  emb = np.ascontiguousarray(emb, np.float32)
  n, d = emb.shape
  table = pa.table(
    {
      "item_index": pa.array(np.arange(n, dtype=np.int32)),
      "item_id": pa.array(np.asarray(raw_ids).astype(str).tolist(), pa.string()),
      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), d),
    }
  )
  pq.write_table(table, path)


def read_items_parquet(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(item_index int32 [N], item_id str [N], embedding float32 [N, D]) of a scenario's Parquet."""
  import pyarrow.parquet as pq

  t = pq.read_table(path)
  col = t.column("embedding").combine_chunks()
  d = col.type.list_size
  emb = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
  return (
    t.column("item_index").to_numpy().astype(np.int32),
    np.asarray(t.column("item_id").to_pylist(), dtype=str),
    emb,
  )


# --------------------------------------------------------------------------- run-level entry points


def check_platforms(platforms) -> tuple[str, ...] | None:
  """``config.export.platforms`` as a tuple (None when empty: the current backend only).

  Raises ValueError naming the field, the unknown entries and PLATFORMS.
  """
  if isinstance(platforms, str):
    platforms = (platforms,)
  got = tuple(platforms or ())
  bad = [p for p in got if p not in PLATFORMS]
  if bad:
    raise ValueError(
      f"config.export.platforms={got}: unknown platform(s) {bad}; expected "
      f"names from {PLATFORMS} (empty = the current backend only)"
    )
  return got or None


def _restore(cfg, workdir, data=None, model=None, part=None, variables=None):
  """(data, model, variables, step): ``step`` is the fine-tuning step read (None when
  ``variables`` are given)."""
  step = None
  if variables is None:
    loop.require_finetune_checkpoint(workdir)  # before preparing anything
  data = data or loop.prepare(cfg, workdir)
  model = model or loop.build_model(cfg, data)
  if variables is None:
    variables, step = loop.restore_variables_and_step(
      cfg, workdir, "finetune", model, part or Partitioner(cfg.mesh), data
    )
  return data, model, variables, step


def _finetune_step(workdir) -> int | None:
  d = Path(workdir).absolute() / "checkpoints" / "finetune"
  if not d.is_dir():
    return None
  with ckpt_lib.Checkpointer(d, max_to_keep=None) as ck:
    return ck.latest_step()


def export_workdir(
  cfg, workdir: str | Path, out_dir: str | Path | None = None, *, data=None, model=None, part=None
) -> Path:
  """Write the export of ``workdir``'s latest fine-tuned parameters (module docstring layout).

  ``out_dir``: default ``config.export.dir`` or, if empty, ``WORKDIR/export``; written into a
  temporary sibling and renamed into place when complete (a previous export there is replaced
  as a whole; what an earlier, interrupted export left beside it is removed). Returns the
  directory. Raises FileNotFoundError if the workdir has no fine-tuning checkpoint, ValueError
  for a ``config.export.platforms`` entry outside PLATFORMS (both before any work).
  """
  workdir = Path(workdir)
  ecfg = cfg.export
  out = Path(out_dir or ecfg.dir or workdir / "export")
  platforms = check_platforms(ecfg.platforms)
  data, model, variables, step = _restore(cfg, workdir, data, model, part)
  item_all = eval_lib.encode_all(
    model, variables, data.items, data.item_masks, "encode_item", None
  )  # [N, K, D]
  dim = int(item_all.shape[-1])
  if jax.process_index() != 0:
    return out
  blob = export_user_encoder(model, variables, data.user_specs, data.num_scenarios, platforms)
  out.parent.mkdir(parents=True, exist_ok=True)
  _clean_stale(out)
  final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    _write_export(cfg, workdir, data, item_all, blob, platforms, step, out)
    _swap_into_place(out, final)
  except BaseException:
    shutil.rmtree(out, ignore_errors=True)
    raise
  log.info(
    "exported %d items x %d scenarios (D=%d) and the user encoder to %s",
    data.num_items,
    data.num_scenarios,
    dim,
    final,
  )
  return final


def _clean_stale(out: Path) -> None:
  """Remove what an export killed midway left beside ``out`` (``.<name>.tmp-*``); if it was
  killed between the two renames of :func:`_swap_into_place`, put the previous export back."""
  for p in out.parent.glob(f".{out.name}.old-*"):
    if not out.exists():
      os.replace(p, out)
      log.warning("restored the previous export %s from %s (an export was cut short)", out, p)
    else:
      shutil.rmtree(p, ignore_errors=True)
  for p in out.parent.glob(f".{out.name}.tmp-*"):
    shutil.rmtree(p, ignore_errors=True)
    log.info("removed %s, left by an export that was cut short", p)


def _swap_into_place(tmp: Path, out: Path) -> None:
  """Rename the complete export ``tmp`` to ``out``, replacing (then deleting) a previous one."""
  if out.exists():
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)


def _write_export(cfg, workdir: Path, data, item_all, blob: bytes, platforms, step, out: Path):
  """Write every file of the export (module docstring layout) into the directory ``out``."""
  dim = int(item_all.shape[-1])
  (out / "items").mkdir(parents=True, exist_ok=True)
  raw = np.asarray(data.item_raw_ids).astype(str)
  np.save(out / ITEM_IDS_FILE, raw)
  used: set = set()
  scenarios = []
  for k, name in enumerate(data.scenario_names):
    slug = _slug(name, used)
    emb = np.ascontiguousarray(item_all[:, k], np.float32)
    np.save(out / "items" / f"{slug}.npy", emb)
    write_items_parquet(out / "items" / f"{slug}.parquet", raw, emb)
    scenarios.append(
      {
        "index": k,
        "name": name,
        "item_embeddings": f"items/{slug}.npy",
        "item_parquet": f"items/{slug}.parquet",
      }
    )
  (out / USER_ENCODER_FILE).write_bytes(blob)
  manifest = {
    "format_version": FORMAT_VERSION,
    "model": cfg.model.name,
    "dataset": data.manifest.get("dataset", cfg.data.name),
    "checkpoint": {
      "stage": "finetune",
      "step": step,
      "dir": str((workdir / "checkpoints" / "finetune").absolute()),
    },
    "prepared_data": str(Path(data.path).absolute()),
    "embedding_dim": dim,
    "num_items": data.num_items,
    "num_users": data.num_users,
    "num_scenarios": data.num_scenarios,
    "scenario_names": list(data.scenario_names),
    "scenarios": scenarios,
    "item_ids": ITEM_IDS_FILE,
    "score": "inner product of the L2-normalised user and item vectors; logit = score / tau",
    "tau": float(cfg.model.tau),
    "user_encoder": {
      "file": USER_ENCODER_FILE,
      "format": "jax.export serialized Exported; sass_jax.export.load_user_encoder(path)",
      "platforms": list(platforms) if platforms else [jax.default_backend()],
      "batch": "symbolic dimension 'b' (any batch size >= 1)",
      "inputs": {
        "features": input_signature(data.user_specs),
        "scenario": {"shape": ["b"], "dtype": "int32", "range": [0, data.num_scenarios]},
      },
      "output": {"shape": ["b", dim], "dtype": "float32"},
      "valid_ranges": valid_ranges(data.user_specs, data.scenario_names),
      "raw_ids_to_features": "sass_jax.export.user_features(store.open_store("
      "manifest['prepared_data']), raw_user_ids)",
    },
  }
  (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def seen_items(data: PreparedData, user_row: int, scenario: int, mask: str) -> np.ndarray:
  """int64 sorted unique items the evaluation masks for one user in one scenario: positives
  of the training split ('train') or of training and validation ('train_valid').

  Raises ValueError for another ``mask`` (config.eval.mask).
  """
  if mask not in ("train", "train_valid"):
    raise ValueError(f"config.eval.mask={mask!r}; expected 'train' or 'train_valid'")
  splits = [SPLITS["train"]] + ([SPLITS["valid"]] if mask == "train_valid" else [])
  inter = data.inter
  sel = (
    (np.asarray(inter["user"]) == user_row)
    & (np.asarray(inter["scenario"]) == scenario)
    & (np.asarray(inter["label"]) > 0.5)
    & np.isin(np.asarray(inter["split"]), splits)
  )
  return np.unique(np.asarray(inter["item"])[sel]).astype(np.int64)


def recommend(
  cfg,
  workdir: str | Path,
  user: str | None = None,
  scenario: str | None = None,
  k: int | None = None,
  exclude_seen: bool | None = None,
  *,
  data=None,
  model=None,
  part=None,
  variables=None,
) -> dict:
  """Top-K items for one raw user id in one scenario from the latest fine-tuned parameters.

  Arguments default to ``config.recommend.{user, scenario, k, exclude_seen}``. Scores are the
  evaluation's (user vector . item vector of the scenario, ``topk_scores``); with
  ``exclude_seen`` the items of :func:`seen_items` under ``config.eval.mask`` are removed;
  with ``config.eval.corpus='scenario'`` only the scenario's own items are candidates.
  Returns ``{'user', 'scenario', 'model', 'step', 'num_excluded', 'items': [{'rank',
  'item_id', 'item_index', 'score'}]}`` (fewer than K items only if the corpus runs out).
  Raises UnknownIdError for an empty or unknown user / scenario, ValueError for k < 1,
  FileNotFoundError if the workdir has no fine-tuning checkpoint (before preparing data).
  """
  rc = cfg.recommend
  user = str(rc.user if user is None else user)
  scenario = str(rc.scenario if scenario is None else scenario)
  k = int(rc.k if k is None else k)
  exclude_seen = bool(rc.exclude_seen if exclude_seen is None else exclude_seen)
  if k < 1:
    raise ValueError(f"config.recommend.k={k}; expected >= 1")
  if data is None:
    if variables is None:
      loop.require_finetune_checkpoint(workdir)  # before preparing anything
    data = loop.prepare(cfg, workdir)
  if not user:
    raise UnknownIdError("set the raw user id with --config.recommend.user=<id>")
  if not scenario:
    raise UnknownIdError(
      "set the scenario with --config.recommend.scenario=<name>, one of "
      f"{list(data.scenario_names)}"
    )
  s = scenario_index(data, scenario)
  row = int(user_rows(data, [user])[0])
  data, model, variables, step = _restore(cfg, workdir, data, model, part, variables)
  items = eval_lib.encode_all(model, variables, data.items, data.item_masks, "encode_item", None)[
    :, s
  ]
  uvec = eval_lib.encode_all(
    model,
    variables,
    {f: c[[row]] for f, c in data.users.items()},
    {f: c[[row]] for f, c in data.user_masks.items()},
    "encode_user",
    s,
  )
  seen = seen_items(data, row, s, cfg.eval.mask) if exclude_seen else np.zeros(0, np.int64)
  cand = eval_lib.scenario_corpus(data, s, cfg.eval.corpus)
  if cand is not None:  # config.eval.corpus='scenario': the scenario's items only
    seen = np.searchsorted(cand, seen[np.isin(seen, cand)])
    items = items[cand]
  scores, idx = topk_scores(uvec, items, k, exclude=(np.array([0, len(seen)]), seen))
  if cand is not None:
    idx = cand[idx]
  keep = np.isfinite(scores[0])
  raw = np.asarray(data.item_raw_ids).astype(str)
  recs = [
    {"rank": r + 1, "item_id": str(raw[i]), "item_index": int(i), "score": float(v)}
    for r, (i, v) in enumerate(zip(idx[0][keep], scores[0][keep]))
  ]
  return {
    "user": user,
    "scenario": scenario,
    "model": cfg.model.name,
    "step": step if step is not None else _finetune_step(workdir),
    "num_excluded": int(len(seen)),
    "items": recs,
  }


def format_recommendations(rec: dict) -> str:
  """A Markdown table (rank, item_id, score) under a one-line heading for :func:`recommend`."""
  lines = [
    f"Top {len(rec['items'])} items for user {rec['user']!r} in scenario "
    f"{rec['scenario']!r} ({rec['model']}, fine-tuning step {rec['step']}; "
    f"{rec['num_excluded']} already-seen items excluded)",
    "",
    "| rank | item_id | score |",
    "|---|---|---|",
  ]
  lines += [f"| {r['rank']} | {r['item_id']} | {r['score']:.4f} |" for r in rec["items"]]
  return "\n".join(lines)
