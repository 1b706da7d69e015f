"""A user's own exposure table (CSV or Parquet) with the schema given in the config (docs/design.md §4).

One row is one exposure: a user, an item, the scenario it happened in and a label. The config names
the columns; everything else in the file is ignored. User / item feature columns are taken **per
entity from the entity's first occurrence** in the file (the first row, in file order, that
mentions that user / item and is kept); later rows with other values for the same entity do not
change its features. This is the usual convention for profile-like side information that is
repeated on every log row.

The module also holds helpers shared by the Ali-CCP and KuaiRand loaders (CSV reading with line
numbers, the seeded split, vocabulary encoding of entity fields from training-split counts).
"""

from __future__ import annotations

import array
import collections
import csv
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from sass_jax.data import store
from sass_jax.data.store import Rejects, random_split
from sass_jax.schema import FieldSpec

log = logging.getLogger(__name__)

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


# ----------------------------------------------------------------------------- shared helpers


def cfg_get(data_cfg, key: str, default=None):
  """``data_cfg.key`` if set (ConfigDict or dict), else ``default``."""
  try:
    v = data_cfg.get(key, default)
  except AttributeError:
    v = getattr(data_cfg, key, default)
  return default if v is None and default is not None else v


def split_fractions(data_cfg) -> np.ndarray:
  """float64 [3] train / valid / test fractions from ``data_cfg.split`` (default 0.8, 0.1, 0.1).

  Raises ValueError unless they are 3 non-negative numbers summing to 1.
  """
  frac = np.asarray(cfg_get(data_cfg, "split", (0.8, 0.1, 0.1)), dtype=np.float64)
  if frac.shape != (3,) or np.any(frac < 0) or abs(frac.sum() - 1) > 1e-6:
    raise ValueError(f"config.data.split must be 3 fractions summing to 1, got {tuple(frac)}")
  return frac


def check_file(path: Path, what: str) -> None:
  """Raise FileNotFoundError (naming ``path`` and the layout ``what``) or DataError if it is empty."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found (expected {what})")
  if path.stat().st_size == 0:
    raise store.DataError(f"{path}: file is empty")


_UNDECODED = re.compile("[\udc80-\udcff]")


def bad_utf8(row: Sequence[str], names: Sequence[str] | None = None) -> str:
  """'' if every field of ``row`` (text read with ``errors='surrogateescape'``) was valid UTF-8,
  else a description of the first bad byte, e.g. "byte 0xff in field 'title'"."""
  text = "".join(row)
  if text.isascii() or not _UNDECODED.search(text):
    return ""
  for j, v in enumerate(row):
    m = _UNDECODED.search(v)
    if m:
      name = repr(names[j]) if names is not None and j < len(names) else str(j + 1)
      return f"byte 0x{ord(m.group()) - 0xDC00:02x} in field {name}"
  return ""


def read_csv(
  path: Path, rej: Rejects, required: Iterable[str], what: str, delimiter: str = ",", counter=None
) -> Iterator[tuple[int, dict]]:
  """Yield (line number, {column: str}) for each data row of a CSV file with a header.

  Raises FileNotFoundError for a missing file, DataError for an empty file, a header that is
  not valid UTF-8, or a header without a ``required`` column (the message names the file and
  the column, whatever the policy). A row whose field count differs from the header's is
  rejected ('wrong_field_count'), so is a row holding a byte that is not UTF-8
  ('bad_encoding', naming its line: the file is decoded with ``errors='surrogateescape'`` so an
  undecodable byte stays in its own row). Blank lines are skipped. Line numbers are physical
  line numbers of the row's last line (1 = the header).
  ``counter[path.name]`` (a collections.Counter, if given) counts every data row, rejected ones
  included, so that rows_read = kept + rejected.
  """
  check_file(path, what)
  with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
    reader = csv.reader(f, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise store.DataError(f"{path}: file is empty") from None
    except csv.Error as e:
      raise store.DataError(f"{path}:{reader.line_num}: unreadable header: {e}") from None
    if bad_utf8(header):
      raise store.DataError(f"{path}:1: header is not valid UTF-8 ({bad_utf8(header)})")
    header = [h.strip().lstrip("\ufeff") for h in header]
    if not any(header):
      raise store.DataError(f"{path}: file is empty (no header)")
    missing = [c for c in required if c not in header]
    if missing:
      raise store.DataError(
        f"{path}: column {missing[0]!r} not found in the header "
        f"(missing {missing}; header has {header})"
      )
    n = len(header)
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise store.DataError(f"{path}:{reader.line_num}: unreadable CSV: {e}") from None
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      if counter is not None:
        counter[path.name] += 1
      if len(row) != n:
        rej.reject(
          path,
          reader.line_num,
          "wrong_field_count",
          f"{len(row)} fields, expected {n} (the header's)",
        )
        continue
      bad = bad_utf8(row, header)
      if bad:
        rej.reject(path, reader.line_num, "bad_encoding", f"not valid UTF-8: {bad}")
        continue
      yield reader.line_num, dict(zip(header, row))


class Interner:
  """Raw key -> dense index in first-seen order (keys kept in a list)."""

  def __init__(self):
    self.index: dict = {}
    self.keys: list = []

  def __call__(self, key) -> int:
    i = self.index.get(key)
    if i is None:
      i = self.index[key] = len(self.keys)
      self.keys.append(key)
    return i

  def __len__(self):
    return len(self.keys)


def _vocab_ids(uniq: np.ndarray, counts: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
  """ids [len(uniq)] for unique values with training counts: 1.. by (-count, value), 0 if rare.

  Same ordering as ``store.build_vocab``; values with a zero training count always get 0.
  Returns (ids int32, vocab_size).
  """
  keep = counts >= max(int(min_count), 1)
  kept = np.flatnonzero(keep)
  order = kept[np.lexsort((uniq[kept], -counts[kept]))]
  ids = np.zeros(len(uniq), np.int32)
  ids[order] = np.arange(1, len(order) + 1, dtype=np.int32)
  return ids, len(order) + 1


def encode_scalar(
  values: Sequence, train_weight: np.ndarray, min_count: int
) -> tuple[np.ndarray, int]:
  """Vocabulary-encode one value per entity.

  values: [E] raw values (one type per field; None = missing -> id 0).
  train_weight: [E] number of training-split rows of each entity; a value's count is the number
    of training rows whose entity has it (as in the MovieLens loader).
  Returns (int32 [E] ids in [0, vocab_size), vocab_size). Ids follow ``store.build_vocab``.
  """
  E = len(values)
  present = np.fromiter((v is not None for v in values), bool, count=E)
  out = np.zeros(E, np.int32)
  if not present.any():
    return out, 1
  vals = np.asarray([v for v in values if v is not None])
  uniq, inv = np.unique(vals, return_inverse=True)
  counts = np.bincount(
    inv.ravel(), weights=np.asarray(train_weight, np.float64)[present], minlength=len(uniq)
  )
  ids, size = _vocab_ids(uniq, counts, min_count)
  out[present] = ids[inv.ravel()]
  return out, size


def encode_multi(
  values: Sequence, train_weight: np.ndarray, min_count: int, max_len: int = 0
) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Vocabulary-encode a multi-hot field (a list of values per entity, duplicates removed).

  values: [E] sequences (or None / empty = no value). max_len: 0 keeps every value (L = the
    longest list); otherwise lists are cut to their first ``max_len`` values.
  Returns (ids int32 [E, L], mask bool [E, L], vocab_size, L) with L >= 1; values unseen in the
  training split get id 0 but stay in the mask (as MovieLens genres).
  """
  E = len(values)
  lists = []
  for v in values:
    if v is None:
      lists.append(())
      continue
    seq = list(dict.fromkeys(v.tolist() if isinstance(v, np.ndarray) else v))
    lists.append(seq[:max_len] if max_len else seq)
  lens = np.fromiter((len(x) for x in lists), np.int64, count=E)
  L = max(int(lens.max()) if E else 0, 1)
  ids = np.zeros((E, L), np.int32)
  mask = np.arange(L)[None, :] < lens[:, None]
  if lens.sum() == 0:
    return ids, mask, 1, L
  flat = np.asarray([x for seq in lists for x in seq])
  ent = np.repeat(np.arange(E), lens)
  uniq, inv = np.unique(flat, return_inverse=True)
  counts = np.bincount(
    inv.ravel(), weights=np.asarray(train_weight, np.float64)[ent], minlength=len(uniq)
  )
  vid, size = _vocab_ids(uniq, counts, min_count)
  ids[mask] = vid[inv.ravel()]  # row-major order of the mask == order of `flat`
  return ids, mask, size, L


def encode_entities(
  raw_values: dict, multi: dict, train_weight: np.ndarray, min_count: int, max_len: int = 0
):
  """Encode every field of an entity table.

  raw_values: field -> [E] values (lists for fields with ``multi[field]`` true).
  Returns (cols, masks, specs) for ``store.write_store``.
  """
  cols, masks, specs = {}, {}, []
  for name, vals in raw_values.items():
    if multi.get(name):
      ids, mask, size, L = encode_multi(vals, train_weight, min_count, max_len)
      cols[name], masks[name] = ids, mask
      specs.append(FieldSpec(name, size, multi_hot=L))
    else:
      cols[name], size = encode_scalar(vals, train_weight, min_count)
      specs.append(FieldSpec(name, size))
  return cols, masks, specs


def entity_order(keys: Sequence) -> np.ndarray:
  """Permutation sorting raw entity keys (numbers numerically, otherwise as strings)."""
  try:
    arr = np.asarray(keys)
    if arr.dtype.kind not in "iufU":
      arr = np.asarray([str(k) for k in keys])
  except (TypeError, ValueError):
    arr = np.asarray([str(k) for k in keys])
  return np.argsort(arr, kind="stable")


def rejected_dict(rej: Rejects) -> dict:
  return {k: dict(v) for k, v in rej.counts.items()}


def build_and_write(
  out_dir,
  *,
  scenario_names: list[str],
  r_user,
  r_item,
  scenario,
  label,
  split,
  user_keys: Sequence,
  item_keys: Sequence,
  user_vals: dict,
  item_vals: dict,
  multi: Iterable[str],
  min_count: int,
  max_len: int,
  extra: dict,
) -> Path:
  """Entity tables + interactions -> ``store.write_store``.

  r_user / r_item: [n] indices into ``user_keys`` / ``item_keys`` (first-seen order);
  user_vals / item_vals: field -> [len(keys)] raw values (lists for ``multi`` fields), in the same
  order. Entities not referenced by any row are dropped; the rest are sorted by raw key
  (``entity_order``). Vocabularies count training-split rows (split == 0). ``extra`` gets
  rows_kept filled in. Returns the store path.
  """
  multi = set(multi)
  r_user = np.asarray(r_user, np.int64)
  r_item = np.asarray(r_item, np.int64)
  split = np.asarray(split, np.int8)

  def table(keys, vals, rows):
    used = np.flatnonzero(np.bincount(rows, minlength=len(keys)) > 0)
    order = used[entity_order([keys[k] for k in used])]
    new = np.full(len(keys), -1, np.int64)
    new[order] = np.arange(len(order))
    row_ix = new[rows].astype(np.int32)
    w = np.bincount(row_ix[split == 0], minlength=len(order))
    fields = {name: [v[k] for k in order] for name, v in vals.items()}
    cols, masks, specs = encode_entities(
      fields, {f: f in multi for f in fields}, w, min_count, max_len
    )
    return row_ix, cols, masks, specs, [keys[k] for k in order]

  user_row, ucols, umasks, uspecs, uraw = table(user_keys, user_vals, r_user)
  item_row, icols, imasks, ispecs, iraw = table(item_keys, item_vals, r_item)
  inter = {
    "user": user_row,
    "item": item_row,
    "scenario": np.asarray(scenario, np.int32),
    "label": np.asarray(label, np.float32),
    "split": split,
  }
  extra = dict(extra)
  extra.setdefault("rows_kept", {})
  extra["rows_kept"] = {
    "interactions": len(user_row),
    "users": len(uraw),
    "items": len(iraw),
    **extra["rows_kept"],
  }
  return store.write_store(
    out_dir,
    scenario_names=list(scenario_names),
    user_specs=uspecs,
    item_specs=ispecs,
    users=ucols,
    items=icols,
    user_masks=umasks,
    item_masks=imasks,
    inter=inter,
    user_raw_ids=np.asarray([str(x) for x in uraw]),
    item_raw_ids=np.asarray([str(x) for x in iraw]),
    extra_manifest=extra,
  )


# ----------------------------------------------------------------------------- the table loader


def _is_int(s: str) -> bool:
  try:
    int(s)
    return True
  except ValueError:
    return False


def _read_parquet(path: Path, columns: list[str], counter) -> Iterator[tuple[int, dict]]:
  """Yield (row number, {column: value}) from a Parquet file (row numbers are 1-based)."""
  import pyarrow.parquet as pq

  check_file(path, "a Parquet file")
  try:
    schema_names = pq.read_schema(path).names
  except Exception as e:  # pyarrow raises ArrowInvalid for a non-Parquet file
    raise store.DataError(f"{path}: not a readable Parquet file: {e}") from None
  missing = [c for c in columns if c not in schema_names]
  if missing:
    raise store.DataError(
      f"{path}: column {missing[0]!r} not found (missing {missing}; columns are {schema_names})"
    )
  pf = pq.ParquetFile(path)
  row = 0
  for batch in pf.iter_batches(columns=list(dict.fromkeys(columns)), batch_size=65536):
    cols = {c: batch.column(c).to_pylist() for c in batch.schema.names}
    for j in range(batch.num_rows):
      row += 1
      counter[path.name] += 1
      yield row, {c: cols[c][j] for c in cols}


def _text(v) -> str | None:
  """A cell as stripped text; None / '' -> None. Integral floats from Parquet print without '.0'."""
  if v is None:
    return None
  if isinstance(v, float):
    if v != v:
      return None
    if v.is_integer():
      v = int(v)
  s = str(v).strip()
  return s or None


def prepare(data_cfg, out_dir: str | os.PathLike) -> Path:
  """Read one exposure table and write a store at ``out_dir``.

  data_cfg fields:
    path: the CSV (with a header; ``delimiter``, default ',') or Parquet file; ``format`` 'auto'
      (by suffix: .parquet / .pq -> Parquet) | 'csv' | 'parquet'.
    user_id_col, item_id_col, scenario_col, label_col: column names (required).
    user_cols / item_cols: extra feature columns of each entity (tuples; may be empty).
    multi_hot_cols: those of user_cols / item_cols holding a list of values joined by
      ``separator`` (default '|'); Parquet list columns are multi-hot as well. ``max_multi_hot``
      (default 0 = keep all) caps the list length.
    label_threshold: label = 1.0 if float(label cell) >= label_threshold else 0.0 (default 0.5,
      right for 0/1 click columns; use 4 for 1-5 ratings with "rating >= 4").
    scenarios: optional tuple of allowed scenario values (strings), in scenario-id order; rows with
      another value are rejected ('unknown_scenario'). None: every value seen, sorted (numerically
      if all are integers).
    numeric_ids: if True, user / item ids must be decimal integers within int64 (else
      rejected, 'bad_<column>'); they are kept as exact integers, never floats.
    duplicates: rows repeating the (user, item, scenario) of an earlier row -- 'error'
      (default; a bad row naming both lines, 'duplicate_pair' under 'skip'), 'first', 'last',
      'max' (one row, the maximum label), 'keep' (see ``store.resolve_duplicates``).
    on_error 'strict' | 'skip'; split (fractions, default 8:1:1), split_seed; min_count.

  Output (docs/design.md §4): entity tables of every user / item in a kept row, sorted by raw id;
  fields = the id column itself then user_cols / item_cols, int32 [E] or [E, L] + bool mask;
  interactions user / item (row indices) int32, scenario int32, label float32, split int8 -- a
  seeded random split of the kept rows. Features are per entity from its **first occurrence**.

  Raises FileNotFoundError for a missing file; store.DataError for an empty file, a missing column
  (naming the file and the column, under any policy), no valid rows, or -- under 'strict' -- the
  first bad row (``file:line: field 'col': ...``). Under 'skip' bad rows are counted in
  manifest['rows_rejected'][file][reason].
  """
  path = Path(cfg_get(data_cfg, "path", "")).expanduser()
  if not str(cfg_get(data_cfg, "path", "")):
    raise ValueError("config.data.path is not set (the exposure table to read)")
  rej = Rejects(cfg_get(data_cfg, "on_error", "strict"))
  dup_policy = store.duplicates_policy(data_cfg, "error")
  frac = split_fractions(data_cfg)
  ucol, icol = data_cfg.user_id_col, data_cfg.item_id_col
  scol, lcol = data_cfg.scenario_col, data_cfg.label_col
  user_cols = [c for c in (cfg_get(data_cfg, "user_cols", ()) or ()) if c != ucol]
  item_cols = [c for c in (cfg_get(data_cfg, "item_cols", ()) or ()) if c != icol]
  multi_cols = set(cfg_get(data_cfg, "multi_hot_cols", ()) or ())
  bad_multi = multi_cols - set(user_cols) - set(item_cols)
  if bad_multi:
    raise ValueError(
      f"config.data.multi_hot_cols {sorted(bad_multi)} are not in user_cols / item_cols"
    )
  sep = cfg_get(data_cfg, "separator", "|")
  threshold = float(cfg_get(data_cfg, "label_threshold", 0.5))
  numeric_ids = bool(cfg_get(data_cfg, "numeric_ids", False))
  allowed = cfg_get(data_cfg, "scenarios", None)
  allowed = [str(s) for s in allowed] if allowed else None
  for c in [ucol, icol, *user_cols, *item_cols]:
    if "/" in c or c in ("raw_id", ""):
      raise ValueError(f"column name {c!r} cannot be a store field name")

  fmt = cfg_get(data_cfg, "format", "auto")
  if fmt == "auto":
    fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
  if fmt not in ("csv", "parquet"):
    raise ValueError(f"config.data.format={fmt!r}; expected 'auto', 'csv' or 'parquet'")
  needed = list(dict.fromkeys([ucol, icol, scol, lcol, *user_cols, *item_cols]))
  read = collections.Counter()
  if fmt == "csv":
    rows = read_csv(
      path,
      rej,
      needed,
      "a CSV exposure table with a header",
      cfg_get(data_cfg, "delimiter", ","),
      counter=read,
    )
  else:
    rows = _read_parquet(path, needed, read)

  users, items, scen_of = Interner(), Interner(), Interner()
  ufeat: list = []
  ifeat: list = []
  r_user, r_item, r_scen = array.array("i"), array.array("i"), array.array("i")
  r_label, r_line = array.array("b"), array.array("q")

  def feat(row, cols):
    out = []
    for c in cols:
      v = row[c]
      if isinstance(v, (list, tuple)):
        out.append([t for t in (_text(x) for x in v) if t is not None])
      elif c in multi_cols:
        s = _text(v)
        out.append([p.strip() for p in s.split(sep) if p.strip()] if s else [])
      else:
        out.append(_text(v))
    return out

  for lineno, row in rows:
    ids = []
    for col in (ucol, icol):
      v = _text(row[col])
      if v is None:
        rej.reject(path, lineno, f"missing_{col}", f"field {col!r}: empty id")
        break
      if numeric_ids:  # a Python int within int64, never a float
        v = rej.id_field(path, lineno, col, v, what="an integer id")
        if v is None:
          break
      ids.append(v)
    if len(ids) < 2:
      continue
    uid, iid = ids
    s = _text(row[scol])
    if s is None or (allowed is not None and s not in allowed):
      rej.reject(
        path,
        lineno,
        "unknown_scenario",
        f"field {scol!r}: {s!r} is not one of the scenarios {allowed}"
        if allowed
        else f"field {scol!r}: empty scenario",
      )
      continue
    lv = _text(row[lcol])
    try:
      label = float(lv)
      if not math.isfinite(label):
        raise ValueError
    except (TypeError, ValueError):
      rej.reject(path, lineno, "bad_label", f"field {lcol!r}: expected a finite number, got {lv!r}")
      continue
    nu, ni = len(users), len(items)
    u, i = users(uid), items(iid)
    if u == nu:
      ufeat.append(feat(row, user_cols))
    if i == ni:
      ifeat.append(feat(row, item_cols))
    r_user.append(u), r_item.append(i), r_scen.append(scen_of(s))
    r_label.append(1 if label >= threshold else 0), r_line.append(lineno)

  if read[path.name] == 0:
    raise store.DataError(f"{path}: no data rows (file is empty)")
  if len(r_user) == 0:
    raise store.DataError(f"{path}: no valid rows")
  r_user, r_item = np.frombuffer(r_user, np.int32), np.frombuffer(r_item, np.int32)
  r_scen, r_label = np.frombuffer(r_scen, np.int32), np.frombuffer(r_label, np.int8)
  r_line = np.frombuffer(r_line, np.int64)
  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_item, r_scen),
    lines=r_line,
    paths=[path],
    values=r_label,
    detail=lambda i, j: (
      f"fields {ucol!r}, {icol!r}, {scol!r}: ({users.keys[r_user[i]]}, "
      f"{items.keys[r_item[i]]}, {scen_of.keys[r_scen[i]]}) repeat "
      f"{'line' if fmt == 'csv' else 'row'} {r_line[j]}"
    ),
  )
  r_user, r_item, r_scen, r_label = r_user[dd.rows], r_item[dd.rows], r_scen[dd.rows], dd.values
  n = len(r_user)

  # Scenarios: the configured list, else every value seen (numeric order if all integers).
  if allowed is not None:
    names = allowed
  else:
    seen = list(scen_of.keys)
    names = sorted(seen, key=int) if all(_is_int(x) for x in seen) else sorted(seen)
  sid = np.asarray([names.index(k) for k in scen_of.keys], np.int32)
  scenario = sid[r_scen]

  split = random_split(n, frac, int(cfg_get(data_cfg, "split_seed", 42)))
  uvals = {ucol: users.keys, **{c: [f[j] for f in ufeat] for j, c in enumerate(user_cols)}}
  ivals = {icol: items.keys, **{c: [f[j] for f in ifeat] for j, c in enumerate(item_cols)}}
  extra = {
    "dataset": f"table:{path.name}",
    "source_dir": str(path.parent.resolve()),
    "sources": store.source_records([path]),
    "rows_read": dict(read),
    "rows_rejected": rejected_dict(rej),
    **store.duplicates_manifest(dup_policy, dd),
    "options": store.data_options(data_cfg),
    "label": f"float({lcol}) >= {threshold}",
    "scenario_rule": f"column {scol!r}: " + ", ".join(f"{v} -> {k}" for k, v in enumerate(names)),
    "entity_features": "first occurrence of each user / item in file order",
  }
  out = build_and_write(
    out_dir,
    scenario_names=[f"{scol}={v}" for v in names],
    r_user=r_user,
    r_item=r_item,
    scenario=scenario,
    label=r_label,
    split=split,
    user_keys=users.keys,
    item_keys=items.keys,
    user_vals=uvals,
    item_vals=ivals,
    multi=multi_cols,
    min_count=int(cfg_get(data_cfg, "min_count", 1)),
    max_len=int(cfg_get(data_cfg, "max_multi_hot", 0) or 0),
    extra=extra,
  )
  log.info(
    "prepared %d rows of %s (%d users, %d items; rejected %s) into %s",
    n,
    path,
    len(users),
    len(items),
    extra["rows_rejected"] or "none",
    out,
  )
  return out
