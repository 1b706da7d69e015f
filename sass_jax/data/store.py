"""Prepared-data store: memory-mapped NumPy columns plus a JSON manifest.

Layout of a prepared data set directory (docs/design.md §4, "columnar, memory-mappable format with a
manifest")::

    DIR/manifest.json                 schema, vocabulary sizes, row counts, source checksums
    DIR/users/<field>.npy             int32 [num_users] or [num_users, L] (multi-hot)
    DIR/users/<field>.mask.npy        bool  [num_users, L] (multi-hot fields only)
    DIR/items/<field>.npy, .mask.npy  the same for the item table
    DIR/interactions/<col>.npy        user int32, item int32, scenario int32, label float32,
                                      split int8 (0 train, 1 valid, 2 test) -- all [num_rows]

`user` / `item` in the interactions are row indices into the entity tables, so a batch is a
gather of entity rows. Field values are vocabulary ids: 0 is the unknown / rare value, 1.. are
values seen in the training split.

A store is written into a temporary sibling directory and renamed into place only once every
file and the manifest are on disk, so an interrupted prepare never leaves a directory that
`open_store` would take for complete (the manifest is the completeness marker and is written
last, inside the temporary directory).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sass_jax.schema import FieldSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = {"train": 0, "valid": 1, "test": 2}
INTERACTION_COLUMNS = {
  "user": np.int32,
  "item": np.int32,
  "scenario": np.int32,
  "label": np.float32,
  "split": np.int8,
}


class DataError(ValueError):
  """Raised for malformed input data; the message names the file, line and field."""


INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def parse_int(text) -> int | None:
  """``text`` (str or bytes; surrounding white space ignored) as a Python int if it is a plain
  decimal integer (optional sign, ASCII digits only: no '1_000', '1.0', '1e3'), else None."""
  if isinstance(text, bytes):
    text = text.decode("latin-1")
  text = str(text).strip()
  return int(text) if _INT_TEXT.fullmatch(text) else None


def parse_exact_int(text) -> int | None:
  """:func:`parse_int`, or an integral float written exactly ('3.0'; at most 2**53 in size,
  beyond which a float id could not be told apart from its neighbours); None otherwise."""
  i = parse_int(text)
  if i is not None:
    return i
  try:
    f = float(text)
  except ValueError:
    return None
  return int(f) if f.is_integer() and abs(f) <= 2**53 else None


ON_ERROR_POLICIES = ("strict", "skip")  # config.data.on_error


class Rejects:
  """Row-rejection accounting under the ``config.data.on_error`` policy (docs/design.md §4).

  'strict' raises DataError naming ``path:lineno`` and the detail; 'skip' counts the rows in
  ``counts[key][reason]`` (written to the manifest's ``rows_rejected``), so a run never drops
  data silently. The key is the file's path relative to ``root`` when given (two folders of
  one data set may both hold a ``train.txt``), else the file name.
  Raises ValueError for a policy other than 'strict' / 'skip'.
  """

  def __init__(self, policy: str, root: str | os.PathLike | None = None):
    if policy not in ON_ERROR_POLICIES:
      raise ValueError(f"config.data.on_error={policy!r}: expected one of {ON_ERROR_POLICIES}")
    self.policy = policy
    self.root = Path(root) if root is not None else None
    self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def key(self, path) -> str:
    """The manifest key of ``path`` (``source_key`` under this object's root)."""
    return source_key(path, self.root)

  def reject(
    self,
    path,
    lineno: int,
    reason: str,
    detail: str,
    count: int = 1,
    hint: str = "set config.data.on_error='skip' to count and drop such rows",
  ):
    """Reject ``count`` rows, the first at ``lineno``: raise DataError (strict) or count.

    The strict message is ``path:lineno: detail (hint)``.
    """
    if self.policy == "strict":
      raise DataError(f"{path}:{lineno}: {detail} ({hint})")
    self.counts[self.key(path)][reason] += count

  def reject_rows(
    self, path, bad: np.ndarray, linenos: np.ndarray, reason: str, detail
  ) -> np.ndarray:
    """Vectorised rejection: ``bad`` bool [n] over rows with source line numbers ``linenos``.

    ``detail(i)`` describes row i. Strict: raises on the first bad row. Returns ``~bad``.
    """
    if bad.any():
      first = int(np.flatnonzero(bad)[0])
      self.reject(path, int(linenos[first]), reason, detail(first), count=int(bad.sum()))
    return ~bad

  def id_field(
    self,
    path,
    lineno: int,
    field: str,
    text,
    lo: int = INT64_MIN,
    hi: int = INT64_MAX,
    what: str = "an integer",
  ) -> int | None:
    """The integer in ``text`` (field ``field`` of ``path:lineno``), or None after
    rejecting the row ('bad_<field>'): not a decimal integer ("expected ``what``"), or
    outside ``[lo, hi]`` (by default the int64 range, so no id is ever read as a float or
    wraps around)."""
    v = parse_int(text)
    if v is None:
      self.reject(path, lineno, f"bad_{field}", f"field {field!r}: expected {what}, got {text!r}")
      return None
    if not lo <= v <= hi:
      fits = "a 64-bit integer" if (lo, hi) == (INT64_MIN, INT64_MAX) else f"[{lo}, {hi}]"
      self.reject(
        path, lineno, f"bad_{field}", f"field {field!r}: {text.strip()} does not fit {fits}"
      )
      return None
    return v

  def as_dict(self) -> dict:
    """``{key: {reason: count}}`` for the manifest."""
    return {k: dict(v) for k, v in self.counts.items()}


# ----------------------------------------------------------------------------- duplicates

# config.data.duplicates: what to do with rows that repeat the (user, item, scenario) of an
# earlier row (an exposure seen twice).
DUPLICATE_POLICIES = ("error", "first", "last", "max", "keep")
DUPLICATE_HINT = (
  "set config.data.duplicates='first' to keep the first of each repeated row and "
  "count the others in the manifest's rows_merged, or config.data.on_error='skip' "
  "to count and drop them"
)


def duplicates_policy(data_cfg, default: str) -> str:
  """``config.data.duplicates`` (``default`` when the config has no such key), checked.

  Raises ValueError naming config.data.duplicates for a value not in DUPLICATE_POLICIES.
  """
  try:
    policy = data_cfg.get("duplicates", default)
  except AttributeError:
    policy = getattr(data_cfg, "duplicates", default)
  if policy is None:
    policy = default
  if policy not in DUPLICATE_POLICIES:
    raise ValueError(
      f"config.data.duplicates={policy!r}; expected one of "
      f"{', '.join(repr(p) for p in DUPLICATE_POLICIES)}"
    )
  return policy


@dataclasses.dataclass
class Deduplicated:
  """Result of ``resolve_duplicates``.

  Attributes:
    rows: int64 [m] indices of the rows kept, increasing.
    values: [m] the kept rows' values (for 'max' the maximum over each row's repeats), or
      None when no values were given.
    merged: {file key: rows folded into another row of the same key} ('first' / 'last' /
      'max'), for the manifest's ``rows_merged``.
    repeated: {file key: rows kept although they repeat an earlier row} ('keep'), for the
      manifest's ``rows_repeated``.
  """

  rows: np.ndarray
  values: np.ndarray | None
  merged: dict
  repeated: dict


def _codes(col) -> np.ndarray:
  col = np.asarray(col)
  if col.dtype.kind in "iub":
    return col.astype(np.int64, copy=False).reshape(-1)
  return np.unique(col, return_inverse=True)[1].reshape(-1)


def resolve_duplicates(
  policy: str,
  rej: Rejects,
  keys: Sequence[np.ndarray],
  *,
  lines: np.ndarray,
  paths: Sequence,
  files: np.ndarray | None = None,
  detail: Callable[[int, int], str],
  values: np.ndarray | None = None,
) -> Deduplicated:
  """Apply a ``config.data.duplicates`` policy to rows that share a key.

  keys: columns of n rows (ints or strings), e.g. (user, item, scenario); rows with equal
    values in every column are repeats. Row order is the order the rows were read.
  lines: int [n] source line numbers; paths: the source files; files: int [n] index into
    ``paths`` of each row (None: every row comes from ``paths[0]``).
  detail(i, j): describes row i repeating the earlier row j (for the error message), e.g.
    ``"fields 'UserID', 'MovieID': (1, 1193) repeat line 3"``.
  values: optional [n] numbers (the label or rating) carried along; 'max' takes their
    maximum over each group of repeats.

  Policies: 'error' -- a repeat is a bad row under ``rej`` (strict: DataError
  ``path:line: detail (hint)``; skip: dropped, counted as 'duplicate_pair' in rows_rejected);
  'first' / 'last' -- keep the first / last row of each group, count the rest as merged;
  'max' -- keep the first row with the group's maximum value; 'keep' -- keep every row and
  count the repeats. Vectorised (one lexsort), no per-row Python.
  """
  n = len(lines)
  lines = np.asarray(lines, np.int64)
  files = np.zeros(n, np.int64) if files is None else np.asarray(files, np.int64)
  idx = np.arange(n, dtype=np.int64)
  empty = Deduplicated(idx, None if values is None else np.asarray(values), {}, {})
  if n == 0:
    return empty
  codes = [_codes(k) for k in keys]
  order = np.lexsort([idx] + codes[::-1])  # by key, then by row
  new = np.zeros(n, bool)
  new[0] = True
  for c in codes:
    cs = c[order]
    new[1:] |= cs[1:] != cs[:-1]
  starts = np.flatnonzero(new)
  if len(starts) == n:  # no repeats at all
    return empty
  ends = np.append(starts[1:], n) - 1
  gid = np.empty(n, np.int64)
  gid[order] = np.cumsum(new) - 1
  first = order[starts][gid]
  repeat = first != idx

  def per_file(mask) -> dict:
    out = {}
    for f, c in zip(*np.unique(files[mask], return_counts=True)):
      k = rej.key(paths[int(f)])
      out[k] = out.get(k, 0) + int(c)
    return out

  vals = None if values is None else np.asarray(values)
  if policy == "keep":
    return Deduplicated(idx, vals, {}, per_file(repeat))
  if policy == "error":
    if rej.policy == "strict":  # raises, naming the first repeat and its earlier line
      i = int(np.flatnonzero(repeat)[0])
      rej.reject(
        paths[int(files[i])],
        int(lines[i]),
        "duplicate_pair",
        detail(i, int(first[i])),
        hint=DUPLICATE_HINT,
      )
    for k, c in per_file(repeat).items():
      rej.counts[k]["duplicate_pair"] += c
    rows = np.flatnonzero(~repeat)
    return Deduplicated(rows, None if vals is None else vals[rows], {}, {})
  if policy == "last":
    keep = order[ends][gid] == idx
  elif policy in ("first", "max"):
    keep = ~repeat
  else:
    raise ValueError(
      f"config.data.duplicates={policy!r}; expected one of "
      f"{', '.join(repr(p) for p in DUPLICATE_POLICIES)}"
    )
  rows = np.flatnonzero(keep)
  out = None if vals is None else vals[rows]
  if policy == "max" and vals is not None:
    gmax = np.maximum.reduceat(vals[order], starts)
    out = gmax[gid[rows]].astype(vals.dtype)
  return Deduplicated(rows, out, per_file(~keep), {})


def duplicates_manifest(policy: str, d: Deduplicated | None) -> dict:
  """The manifest entries ``duplicates`` (the policy), ``rows_merged``, ``rows_repeated``."""
  return {
    "duplicates": policy,
    "rows_merged": dict(d.merged) if d else {},
    "rows_repeated": dict(d.repeated) if d else {},
  }


# ----------------------------------------------------------------------------- source files


def source_info(path: str | os.PathLike) -> dict:
  """Manifest record of a source file: sha256, size in bytes, mtime_ns and absolute path."""
  p = Path(path)
  st = p.stat()
  return {
    "sha256": sha256_file(p),
    "bytes": st.st_size,
    "mtime_ns": st.st_mtime_ns,
    "path": str(p.resolve()),
  }


def source_key(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
  """The manifest key of a source file: its path relative to ``root`` (POSIX separators)
  when it lies under it -- so the files of one data set may both be called ``train.txt``
  -- else its file name. ``changed_sources`` looks a key up under ``config.data.dir``."""
  if root is not None:
    try:
      return Path(path).relative_to(root).as_posix()
    except ValueError:
      pass
  return Path(path).name


def source_records(
  paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None
) -> dict:
  """The manifest's ``sources``: ``source_key(path, root)`` -> ``source_info(path)`` of
  every file in ``paths``."""
  return {source_key(p, root): source_info(p) for p in paths}


def data_options(data_cfg) -> dict:
  """``config.data`` (a ConfigDict or a mapping) as plain JSON values: the manifest's
  ``options``, and what ``loop.prepare`` compares it with to decide whether a prepared store
  can be reused (tuples become lists, as in the written JSON)."""
  d = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  return json.loads(json.dumps(d))


def changed_sources(manifest: Mapping, data_dir=None) -> list[tuple[str, Path]]:
  """Source files of a prepared store whose bytes changed since it was prepared.

  Each entry of the manifest's ``sources`` (key -> sha256, bytes, mtime_ns, path) is looked
  up at ``data_dir / key``, else ``manifest['source_dir'] / key``, else its recorded path; a
  file found nowhere (e.g. deleted after preparing) is not compared. A file whose size and
  mtime both match the record is unchanged without reading it; otherwise a different size is
  a change, and an equal size is compared by sha256 (a touched but identical file is
  unchanged; old manifests without sizes or mtimes get the sha256 comparison).
  Returns [(key, path)] of the changed files.
  """
  out = []
  for key, info in sorted((manifest.get("sources") or {}).items()):
    if not isinstance(info, dict) or "sha256" not in info:
      continue
    cands = [Path(str(b)) / key for b in (data_dir, manifest.get("source_dir")) if b]
    if info.get("path"):
      cands.append(Path(info["path"]))
    p = next((c for c in cands if c.is_file()), None)
    if p is None:
      continue
    st = p.stat()
    if "bytes" in info and st.st_size != info["bytes"]:
      out.append((key, p))
    elif st.st_mtime_ns == info.get("mtime_ns", -1) and "bytes" in info:
      continue
    elif sha256_file(p) != info["sha256"]:
      out.append((key, p))
  return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
  """Hex SHA-256 of a file's bytes (for the manifest's source checksums)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()


@dataclasses.dataclass
class PreparedData:
  """An opened store; every array is a read-only memory map.

  Attributes:
    path: the store directory.
    manifest: the parsed manifest.json.
    scenario_names: K scenario names; scenario id k indexes this list.
    user_specs / item_specs: the fields of each tower, in model order.
    users / items: field name -> int32 [num_entities] or [num_entities, L].
    user_masks / item_masks: multi-hot field name -> bool [num_entities, L].
    inter: interaction column -> [num_rows] array (see INTERACTION_COLUMNS).
    user_raw_ids / item_raw_ids: [num_entities] the source's raw ids (str), for export and
      recommend.
  """

  path: Path
  manifest: dict
  scenario_names: list[str]
  user_specs: list[FieldSpec]
  item_specs: list[FieldSpec]
  users: dict[str, np.ndarray]
  items: dict[str, np.ndarray]
  user_masks: dict[str, np.ndarray]
  item_masks: dict[str, np.ndarray]
  inter: dict[str, np.ndarray]
  user_raw_ids: np.ndarray
  item_raw_ids: np.ndarray

  @property
  def num_scenarios(self) -> int:
    return len(self.scenario_names)

  @property
  def num_users(self) -> int:
    return int(self.manifest["num_users"])

  @property
  def num_items(self) -> int:
    return int(self.manifest["num_items"])

  def rows(self, split: str, labeled_positive: bool | None = None) -> np.ndarray:
    """int64 [n] indices of interaction rows in ``split`` ('train'|'valid'|'test').

    labeled_positive: None for all rows, True for label == 1 rows, False for label == 0 rows.
    Raises KeyError for an unknown split name.
    """
    if split not in SPLITS:
      raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    m = self.inter["split"] == SPLITS[split]
    if labeled_positive is not None:
      m &= (self.inter["label"] > 0.5) == labeled_positive
    return np.flatnonzero(m)


class _Stream:
  """A file seen by numpy as a plain stream, so ``np.save`` writes it with ``write()`` calls
  (whose OSError carries errno, e.g. ENOSPC / EFBIG) instead of ``ndarray.tofile`` (whose
  short write is an OSError without errno: "N requested and M written")."""

  def __init__(self, f):
    self.write = f.write


_OS_CAUSES = {
  errno.ENOSPC: "no space left on device",
  errno.EFBIG: "file too large (the file size limit was reached)",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "permission denied",
  errno.EDQUOT: "disk quota exceeded",
}


def os_error_message(e: OSError, doing: str) -> str:
  """One line for an OSError met while ``doing`` (e.g. 'writing DIR/users/x.npy')."""
  cause = _OS_CAUSES.get(e.errno) or e.strerror or str(e)
  return f"{cause} while {doing}"


def save_npy(path: Path, arr, shown: Path | None = None) -> None:
  """``np.save(path, arr)``; an OSError is re-raised as DataError naming the file (``shown``,
  default ``path``) and the cause, e.g. "no space left on device while writing PATH"."""
  try:
    with open(path, "wb") as f:
      np.save(_Stream(f), np.ascontiguousarray(arr), allow_pickle=False)
  except OSError as e:
    raise DataError(os_error_message(e, f"writing {shown or path}")) from e


def _save_table(
  dirpath: Path, cols: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], shown: Path
):
  dirpath.mkdir(parents=True, exist_ok=True)
  for name, arr in cols.items():
    save_npy(dirpath / f"{name}.npy", arr, shown / f"{name}.npy")
  for name, arr in masks.items():
    save_npy(dirpath / f"{name}.mask.npy", np.asarray(arr, dtype=bool), shown / f"{name}.mask.npy")


# Temporary siblings of a store directory DIR: DIR's new contents while they are written
# (".DIR.tmp-<host>-<pid>-<random>", also ".DIR.gen-..." scratch space of the synthetic
# generator) and the previous store while it is replaced (".DIR.old-<host>-<pid>"; older
# versions wrote ".DIR.old-<pid>"). A process killed in between leaves them behind.
_TEMP_NAME = re.compile(
  r"^\.(?P<name>.+)\.(?P<kind>tmp|gen|old)-(?:(?P<host>[A-Za-z0-9_.]+)-)?"
  r"(?P<pid>\d+)(?:-.*)?$"
)


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def temp_prefix(path: Path, kind: str) -> str:
  """The name prefix of a temporary sibling of ``path`` owned by this process."""
  return f".{path.name}.{kind}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  except OSError:
    return True
  return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
  """Remove temporary siblings of the store directory ``path`` left by killed processes.

  A sibling counts as stale when it names a process of this host that no longer runs
  (siblings of other hosts, of live processes, or without a process id are left alone). A
  stale ``.old-`` copy is moved back to ``path`` when ``path`` is missing and the copy is a
  complete store (the process died between the two renames of a replace); otherwise it is
  deleted. Returns the paths removed or restored; never raises for a sibling it cannot
  remove (it is logged).
  """
  path = Path(path)
  if not path.parent.is_dir():
    return []
  done = []
  host = _host()
  for p in sorted(path.parent.iterdir()):
    m = _TEMP_NAME.match(p.name)
    if not m or m["name"] != path.name or not p.is_dir():
      continue
    if (m["host"] or host) != host or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
      continue
    try:
      if m["kind"] == "old" and not path.exists() and is_complete(p):
        os.replace(p, path)
        log.warning("restored %s from %s, left by a stopped process", path, p.name)
      else:
        shutil.rmtree(p)
        log.info("removed %s, left by a stopped process (pid %s)", p, m["pid"])
      done.append(p)
    except OSError as e:
      log.warning("could not remove %s: %s", p, e)
  return done


def write_store(
  path: str | os.PathLike,
  *,
  scenario_names: list[str],
  user_specs: list[FieldSpec],
  item_specs: list[FieldSpec],
  users: Mapping[str, np.ndarray],
  items: Mapping[str, np.ndarray],
  user_masks: Mapping[str, np.ndarray],
  item_masks: Mapping[str, np.ndarray],
  inter: Mapping[str, np.ndarray],
  user_raw_ids: np.ndarray,
  item_raw_ids: np.ndarray,
  extra_manifest: Mapping[str, Any],
) -> Path:
  """Write a complete store atomically (temp dir + rename) and return its path.

  Validates that every column has the row count of its table, that ids lie in
  ``[0, vocab_size)``, that interaction user / item / scenario indices are in range, and that
  the interaction columns have the dtypes of INTERACTION_COLUMNS. Raises DataError on any
  violation, leaving nothing at ``path``. An existing store at ``path`` is replaced.
  """
  path = Path(path)
  num_users = len(next(iter(users.values())))
  num_items = len(next(iter(items.values())))
  for table, specs, cols, masks, n in (
    ("users", user_specs, users, user_masks, num_users),
    ("items", item_specs, items, item_masks, num_items),
  ):
    for s in specs:
      a = cols[s.name]
      if a.shape[0] != n:
        raise DataError(f"{table}.{s.name}: {a.shape[0]} rows, expected {n}")
      if a.size and (a.min() < 0 or a.max() >= s.vocab_size):
        raise DataError(f"{table}.{s.name}: ids outside [0, {s.vocab_size})")
      if s.multi_hot and (
        a.ndim != 2 or a.shape[1] != s.multi_hot or masks[s.name].shape != a.shape
      ):
        raise DataError(
          f"{table}.{s.name}: multi-hot column must be [N, {s.multi_hot}] "
          f"with a mask of the same shape, got {a.shape}"
        )
  n_rows = len(inter["user"])
  for c, dt in INTERACTION_COLUMNS.items():
    if c not in inter or inter[c].shape != (n_rows,) or inter[c].dtype != dt:
      raise DataError(f"interactions.{c}: expected {np.dtype(dt).name} [{n_rows}]")
  for c, hi in (("user", num_users), ("item", num_items), ("scenario", len(scenario_names))):
    if n_rows and (inter[c].min() < 0 or inter[c].max() >= hi):
      raise DataError(f"interactions.{c}: index outside [0, {hi})")

  manifest = {
    "format_version": FORMAT_VERSION,
    "scenario_names": list(scenario_names),
    "num_users": num_users,
    "num_items": num_items,
    "num_interactions": n_rows,
    "user_fields": [dataclasses.asdict(s) for s in user_specs],
    "item_fields": [dataclasses.asdict(s) for s in item_specs],
    "split_counts": {k: int((inter["split"] == v).sum()) for k, v in SPLITS.items()},
    "positives_by_split_scenario": {
      k: [
        int(((inter["split"] == v) & (inter["scenario"] == s) & (inter["label"] > 0.5)).sum())
        for s in range(len(scenario_names))
      ]
      for k, v in SPLITS.items()
    },
    **dict(extra_manifest),
  }
  tmp = None
  doing = f"creating {path.parent}"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    doing = f"creating a temporary directory in {path.parent}"
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path, "tmp"), dir=path.parent))
    _save_table(tmp / "users", users, user_masks, path / "users")
    _save_table(tmp / "items", items, item_masks, path / "items")
    _save_table(tmp / "interactions", inter, {}, path / "interactions")
    save_npy(
      tmp / "users" / "raw_id.npy",
      np.asarray(user_raw_ids).astype(str),
      path / "users" / "raw_id.npy",
    )
    save_npy(
      tmp / "items" / "raw_id.npy",
      np.asarray(item_raw_ids).astype(str),
      path / "items" / "raw_id.npy",
    )
    doing = f"writing {path / 'manifest.json'}"
    with open(tmp / "manifest.json", "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    doing = f"moving the new store into {path}"
    if path.exists():
      old = path.with_name(f".{path.name}.old-{_host()}-{os.getpid()}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except OSError as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"{os_error_message(e, doing)}; nothing was written to {path}") from e
  except DataError as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise DataError(f"{e}; nothing was written to {path}") from e.__cause__
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def is_complete(path: str | os.PathLike) -> bool:
  """True if ``path`` holds a store written to the end (its manifest exists)."""
  return (Path(path) / "manifest.json").is_file()


def _corrupt(what, detail) -> DataError:
  return DataError(
    f"{what}: {detail}; the prepared data is damaged: run --mode prepare to "
    "prepare it again (or use a new --workdir)"
  )


def open_store(path: str | os.PathLike) -> PreparedData:
  """Open a prepared store with every column memory-mapped read-only.

  Raises FileNotFoundError (naming the directory) if there is no complete store at ``path``,
  and DataError naming the file if the manifest cannot be parsed, its format version is not
  FORMAT_VERSION, or a column is missing, unreadable (e.g. a truncated ``.npy``) or of the
  wrong length.
  """
  path = Path(path)
  if not is_complete(path):
    raise FileNotFoundError(
      f"no prepared data set at {path} (manifest.json missing); run --mode prepare first"
    )
  mpath = path / "manifest.json"
  try:
    manifest = json.loads(mpath.read_text())
  except (OSError, ValueError) as e:
    raise _corrupt(mpath, f"unreadable manifest ({e})") from None
  if not isinstance(manifest, dict):
    raise _corrupt(mpath, "unreadable manifest (not a JSON object)")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise DataError(
      f"{path}/manifest.json: format_version {manifest.get('format_version')}, "
      f"expected {FORMAT_VERSION}; prepare the data again"
    )
  try:
    user_specs = [FieldSpec(**d) for d in manifest["user_fields"]]
    item_specs = [FieldSpec(**d) for d in manifest["item_fields"]]
    lengths = {
      "users": int(manifest["num_users"]),
      "items": int(manifest["num_items"]),
      "interactions": int(manifest["num_interactions"]),
    }
    scenario_names = list(manifest["scenario_names"])
  except (KeyError, TypeError, ValueError) as e:
    raise _corrupt(mpath, f"unreadable manifest (bad or missing entry {e})") from None

  def npy(table, name, mmap=True):
    f = path / table / name
    try:
      a = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
      raise _corrupt(f, "file missing") from None
    except (OSError, ValueError, EOFError) as e:
      raise _corrupt(f, f"unreadable ({e})") from None
    if a.ndim < 1 or a.shape[0] != lengths[table]:
      raise _corrupt(
        f, f"{a.shape[0] if a.ndim else 0} rows, but the manifest says {lengths[table]}"
      )
    return a

  def load(table, specs):
    cols = {s.name: npy(table, f"{s.name}.npy") for s in specs}
    masks = {s.name: npy(table, f"{s.name}.mask.npy") for s in specs if s.multi_hot}
    return cols, masks

  users, user_masks = load("users", user_specs)
  items, item_masks = load("items", item_specs)
  inter = {c: npy("interactions", f"{c}.npy") for c in INTERACTION_COLUMNS}
  return PreparedData(
    path=path,
    manifest=manifest,
    scenario_names=scenario_names,
    user_specs=user_specs,
    item_specs=item_specs,
    users=users,
    items=items,
    user_masks=user_masks,
    item_masks=item_masks,
    inter=inter,
    user_raw_ids=npy("users", "raw_id.npy", mmap=False),
    item_raw_ids=npy("items", "raw_id.npy", mmap=False),
  )


def random_split(n: int, fractions, seed: int) -> np.ndarray:
  """int8 [n] split ids (0 train, 1 valid, 2 test): a seeded permutation of the rows cut into
  ``round(f_train * n)`` train rows, ``round(f_valid * n)`` valid rows and the rest test.

  Raises ValueError unless ``fractions`` are 3 non-negative numbers summing to 1.
  """
  frac = np.asarray(fractions, dtype=np.float64)
  if frac.shape != (3,) or np.any(frac < 0) or abs(frac.sum() - 1) > 1e-6:
    raise ValueError(f"config.data.split must be 3 fractions summing to 1, got {tuple(frac)}")
  perm = np.random.default_rng(seed).permutation(n)
  n_train, n_valid = int(round(frac[0] * n)), int(round(frac[1] * n))
  split = np.empty(n, np.int8)
  split[perm[:n_train]] = 0
  split[perm[n_train : n_train + n_valid]] = 1
  split[perm[n_train + n_valid :]] = 2
  return split


def build_vocab(train_values, min_count: int = 1) -> dict:
  """Vocabulary from training-split values: value -> id in 1..V-1 (0 is unknown / rare).

  Values are ordered by decreasing count then by value, so ids are deterministic. Values seen
  fewer than ``min_count`` times map to 0. Returns a dict; vocab_size is ``len(vocab) + 1``.
  """
  vals, counts = np.unique(np.asarray(train_values), return_counts=True)
  keep = counts >= min_count
  vals, counts = vals[keep], counts[keep]
  order = np.lexsort((vals, -counts))
  return {v.item() if hasattr(v, "item") else v: i + 1 for i, v in enumerate(vals[order])}


def apply_vocab(values, vocab: dict) -> np.ndarray:
  """Map values to int32 ids with ``vocab``; values not in it get 0."""
  return np.fromiter(
    (vocab.get(v.item() if hasattr(v, "item") else v, 0) for v in values),
    dtype=np.int32,
    count=len(values),
  )
