"""Ali-CCP (Tianchi dataset 408; Ma et al., ESMM, SIGIR 2018) with field ``301`` as the scenario.

Two layouts are read (``data_cfg.layout`` = 'auto' | 'raw' | 'csv'):

raw -- the Tianchi release, in ``data_cfg.dir``:
  ``sample_skeleton_train.csv`` / ``sample_skeleton_test.csv``: one impression per line,
  ``sample_id,click,conversion,common_feature_index,feature_num,feature_list``;
  ``common_features_train.csv`` / ``common_features_test.csv``:
  ``common_feature_index,feature_num,feature_list``. A feature list is ``feature_num`` entries
  ``field\\x02feature_id\\x03value`` joined by ``\\x01``; an impression's features are its own
  list plus the list of its common-feature line (the user side, shared by the impressions of one
  request). The test pair is optional.
csv -- the preprocessed files of torch-rechub's ``preprocess_ali_ccp.py`` (the layout of
  ``../shared/data/ali_ccp_sample``, see its SOURCE.md): one CSV each for train / val(id) / test
  with the header ``click,purchase,101,...,301,...,D853``; every sparse value is already an id
  (0 = unknown), multi-valued fields hold only their last value.

Field mapping (Ali-CCP paper convention: user fields 1xx, item fields 2xx, context 301, user x
item cross fields 5xx / 7xx / 8xx; SOURCE.md of ali_ccp_sample):
  user tower: 101 (user id; the entity key), 121, 122, 124, 125, 126, 127, 128, 129 (profile,
    one value each), 109_14, 110_14, 127_14, 150_14 (14-day behaviour category / shop / brand /
    intention node; **multi-hot, every value kept** in the raw layout, ``max_multi_hot`` caps
    the list to its highest-weight values; in the csv layout they are multi-hot of length 1).
  item tower: 205 (item id; the entity key), 206 (category), 207 (shop), 210 (intention node),
    216 (brand).
  scenario: 301. Raw layout: its feature ids (3 in the full data), ordered numerically, or the
    values listed in ``data_cfg.scenarios``; csv layout: the encoded ids 1, 2, 3 -> scenarios 0,
    1, 2 (Scenario-Wise-Rec's ``{1: 0, 2: 1, 3: 2}``); anything else is rejected as
    'unknown_scenario'.
  not used: the cross fields 508 / 509 / 702 / 853 (they depend on the user-item pair, so they
    belong to neither tower of a retrieval model), every dense weight (``D*`` columns, feature
    values of the raw lists: the store has no dense columns), ``purchase`` / ``conversion``.

Label = click. Entire space: every impression is kept (also the click=0, conversion=1 rows that
torch-rechub drops). Repeated (user, item, scenario) impressions are kept too by default
(``duplicates='keep'``: one user sees one item in several requests; in the csv layout, moreover,
all rare users share id 0); the manifest counts them in rows_repeated. 'error' / 'first' /
'last' / 'max' as in ``store.resolve_duplicates``. User / item features come from the entity's
first occurrence (raw: the first common-feature line of that user id, in file order, train
before test). In the csv layout the entity key is the encoded id, so all users (items) encoded
as 0 -- rare ones -- form one entity "0".

Splits: csv -- the files' own train / val / test. Raw -- test file = test; the train file is cut
at random (seeded) into train and valid in the ratio ``split[0] : split[1]``; without the test
pair, all rows are split 8:1:1 (``data_cfg.split``).
"""

from __future__ import annotations

import array
import collections
import logging
import os
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.store import Rejects
from sass_jax.data.table import (
  Interner,
  bad_utf8,
  build_and_write,
  cfg_get,
  random_split,
  read_csv,
  check_file,
  rejected_dict,
  split_fractions,
)

log = logging.getLogger(__name__)

USER_SCALAR = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
USER_MULTI = ("109_14", "110_14", "127_14", "150_14")
USER_FIELDS = USER_SCALAR + USER_MULTI
ITEM_FIELDS = ("205", "206", "207", "210", "216")
SCENARIO_FIELD = "301"
CROSS_FIELDS = ("508", "509", "702", "853")
CSV_SCENARIOS = ("1", "2", "3")
RAW_FILES = ("sample_skeleton_{}.csv", "common_features_{}.csv")


def _find_csv_files(d: Path) -> dict[str, Path]:
  """split name -> the preprocessed CSV of that split in ``d`` (raises if not exactly one)."""
  cands = sorted(
    p for p in d.glob("*.csv") if not p.name.startswith(("sample_skeleton_", "common_features_"))
  )
  keys = {"train": ("train",), "valid": ("val",), "test": ("test",)}
  out = {}
  for split, words in keys.items():
    hits = [p for p in cands if any(w in p.stem.lower() for w in words)]
    if len(hits) != 1:
      raise FileNotFoundError(
        f"{d}: expected one preprocessed Ali-CCP CSV whose name contains {words[0]!r} "
        f"(e.g. ali_ccp_{words[0]}.csv), found {[p.name for p in hits] or 'none'}"
      )
    out[split] = hits[0]
  return out


def detect_layout(d: Path, layout: str = "auto") -> str:
  """'raw' if ``d`` holds sample_skeleton_train.csv, else 'csv' (or ``layout`` if not 'auto')."""
  if layout not in ("auto", "raw", "csv"):
    raise ValueError(f"config.data.layout={layout!r}; expected 'auto', 'raw' or 'csv'")
  if layout != "auto":
    return layout
  if (d / "sample_skeleton_train.csv").exists():
    return "raw"
  if any(d.glob("*train*.csv")):
    return "csv"
  raise FileNotFoundError(
    f"{d}: neither the Tianchi layout (sample_skeleton_train.csv + "
    "common_features_train.csv) nor preprocessed *train*.csv / *val*.csv / "
    "*test*.csv files found"
  )


# ----------------------------------------------------------------------------- csv layout


def _csv_key(vals: dict, id_field: str, fields) -> int | str:
  """Entity key of a csv-layout row: the encoded id, or -- for id 0 (a rare user / item that
  torch-rechub encoded as unknown) -- the id together with the entity's other field values, so
  distinct rare entities with different features stay distinct (e.g. ``0|206=3|207=0|...``)."""
  v = vals[id_field]
  if v != 0:
    return v
  return "0|" + "|".join(f"{f}={vals[f]}" for f in fields if f != id_field)


def _read_csv_layout(d: Path, data_cfg, rej: Rejects):
  files = _find_csv_files(d)
  allowed = [str(s) for s in (cfg_get(data_cfg, "scenarios", None) or CSV_SCENARIOS)]
  required = ("click", SCENARIO_FIELD, *USER_FIELDS, *ITEM_FIELDS)
  users, items = Interner(), Interner()
  ufeat, ifeat = [], []
  r_user, r_item = array.array("i"), array.array("i")
  r_scen, r_label, r_split = array.array("b"), array.array("b"), array.array("b")
  r_line = array.array("q")
  read = collections.Counter()
  for split_id, name in enumerate(("train", "valid", "test")):
    path = files[name]
    for lineno, row in read_csv(
      path, rej, required, "a preprocessed Ali-CCP CSV (torch-rechub)", counter=read
    ):
      vals = {}
      for f in ("click", SCENARIO_FIELD, *USER_FIELDS, *ITEM_FIELDS):
        v = row[f].strip()
        x = store.parse_exact_int(v) if f != "click" else store.parse_int(v)
        if x is None:
          rej.reject(path, lineno, f"bad_{f}", f"field {f!r}: expected an integer id, got {v!r}")
          break
        if not store.INT64_MIN <= x <= store.INT64_MAX:
          rej.reject(path, lineno, f"bad_{f}", f"field {f!r}: {v} does not fit a 64-bit integer")
          break
        vals[f] = x
      else:
        if vals["click"] not in (0, 1):
          rej.reject(
            path, lineno, "bad_click", f"field 'click': expected 0 or 1, got {vals['click']}"
          )
          continue
        s = str(vals[SCENARIO_FIELD])
        if s not in allowed:
          rej.reject(
            path,
            lineno,
            "unknown_scenario",
            f"field '301': {s} is not one of the scenarios {allowed}",
          )
          continue
        nu, ni = len(users), len(items)
        u = users(_csv_key(vals, "101", USER_FIELDS))
        i = items(_csv_key(vals, "205", ITEM_FIELDS))
        if u == nu:  # first occurrence: this row's user fields; 0 = unknown -> missing
          ufeat.append(
            [vals[f] or None for f in USER_SCALAR]
            + [[vals[f]] if vals[f] else [] for f in USER_MULTI]
          )
        if i == ni:
          ifeat.append([vals[f] or None for f in ITEM_FIELDS])
        r_user.append(u), r_item.append(i), r_scen.append(allowed.index(s))
        r_label.append(vals["click"]), r_split.append(split_id), r_line.append(lineno)
  scen_names = [f"301={s}" for s in allowed]
  split = np.frombuffer(r_split, np.int8).copy()
  return (
    users,
    items,
    ufeat,
    ifeat,
    r_user,
    r_item,
    r_scen,
    r_label,
    split,
    scen_names,
    read,
    list(files.values()),
    np.frombuffer(r_line, np.int64),
    split.astype(np.int64),
    list(files.values()),
  )


# ----------------------------------------------------------------------------- raw layout


def _parse_features(path, lineno, text, feature_num, wanted, rej):
  """{field: [(feature_id int, weight float), ...]} for the ``wanted`` fields of a feature list.

  Returns None after rejecting the line for a malformed list ('bad_feature_list'), a feature_num
  that disagrees with the entry count ('bad_feature_num') or a non-integer feature id
  ('bad_feature_id').
  """
  entries = text.split("\x01") if text else []
  try:
    n = int(feature_num)
  except ValueError:
    rej.reject(
      path,
      lineno,
      "bad_feature_num",
      f"field 'feature_num': expected an integer, got {feature_num!r}",
    )
    return None
  if n != len(entries):
    rej.reject(
      path,
      lineno,
      "bad_feature_num",
      f"field 'feature_num': {n}, but the feature_list has {len(entries)} entries",
    )
    return None
  out = collections.defaultdict(list)
  for k, e in enumerate(entries):
    field, sep, rest = e.partition("\x02")
    fid, sep2, w = rest.partition("\x03")
    if not sep or not sep2:
      rej.reject(
        path,
        lineno,
        "bad_feature_list",
        f"field 'feature_list': entry {k + 1} {e!r} is not field\\x02id\\x03value",
      )
      return None
    if field in wanted:
      try:
        v = store.parse_int(fid)
        if v is None or not store.INT64_MIN <= v <= store.INT64_MAX:
          raise ValueError
        out[field].append((v, float(w)))
      except ValueError:
        rej.reject(
          path,
          lineno,
          "bad_feature_id",
          f"field {field!r}: expected an integer feature id and a numeric value, "
          f"got {fid!r} / {w!r}",
        )
        return None
  return out


def _lines(path: Path, rej: Rejects, read: collections.Counter):
  """Yield (lineno, text) of the non-blank lines of ``path``; ``read[path.name]`` counts them,
  and a line holding a byte that is not UTF-8 is rejected ('bad_encoding')."""
  check_file(path, "the Tianchi Ali-CCP layout")
  with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    for lineno, line in enumerate(f, start=1):
      line = line.rstrip("\r\n")
      if line.strip():
        read[path.name] += 1
        bad = bad_utf8([line])
        if bad:
          rej.reject(path, lineno, "bad_encoding", f"not valid UTF-8: {bad.split(' in ')[0]}")
          continue
        yield lineno, line


def _read_raw_layout(d: Path, data_cfg, rej: Rejects):
  max_len = int(cfg_get(data_cfg, "max_multi_hot", 0) or 0)
  allowed = cfg_get(data_cfg, "scenarios", None)
  allowed = [str(s) for s in allowed] if allowed else None
  parts = ["train"]
  if (d / "sample_skeleton_test.csv").exists() or (d / "common_features_test.csv").exists():
    parts.append("test")
  users, items, scen_of = Interner(), Interner(), Interner()
  ufeat, ifeat = [], []
  r_user, r_item = array.array("i"), array.array("i")
  r_scen, r_label, r_part = array.array("i"), array.array("b"), array.array("b")
  r_line, skels = array.array("q"), []
  read, multi_scalar = collections.Counter(), collections.Counter()
  sources = []
  user_wanted = set(USER_FIELDS)
  item_wanted = set(ITEM_FIELDS) | {SCENARIO_FIELD}

  def scalar(feats, f, path):
    v = feats.get(f)
    if not v:
      return None
    if len(v) > 1:
      multi_scalar[f"{path.name}:{f}"] += 1
    return v[0][0]

  for part_id, part in enumerate(parts):
    skel, common = (d / t.format(part) for t in RAW_FILES)
    check_file(common, "the Tianchi Ali-CCP layout (common_features_*.csv)")
    check_file(skel, "the Tianchi Ali-CCP layout (sample_skeleton_*.csv)")
    sources += [common, skel]
    cfi_user: dict[str, int] = {}
    for lineno, line in _lines(common, rej, read):
      cols = line.split(",")
      if len(cols) != 3:
        rej.reject(
          common,
          lineno,
          "wrong_field_count",
          f"{len(cols)} comma-separated fields, expected 3 (common_feature_index, "
          "feature_num, feature_list)",
        )
        continue
      cfi, fnum, flist = cols
      feats = _parse_features(common, lineno, flist, fnum, user_wanted, rej)
      if feats is None:
        continue
      uid = scalar(feats, "101", common)
      if uid is None:
        rej.reject(common, lineno, "missing_user_id", "field '101' (user id) is missing")
        continue
      if cfi in cfi_user:
        rej.reject(
          common,
          lineno,
          "duplicate_common_feature_index",
          f"field 'common_feature_index': {cfi} repeats an earlier line",
        )
        continue
      n = len(users)
      u = cfi_user[cfi] = users(uid)
      if u == n:
        row = [scalar(feats, f, common) for f in USER_SCALAR]
        for f in USER_MULTI:
          v = feats.get(f, [])
          if max_len and len(v) > max_len:  # keep the highest-weight values, stable
            v = sorted(v, key=lambda t: -t[1])[:max_len]
          row.append(np.asarray([t[0] for t in v], np.int64))
        ufeat.append(row)
    skels.append(skel)
    for lineno, line in _lines(skel, rej, read):
      cols = line.split(",")
      if len(cols) != 6:
        rej.reject(
          skel,
          lineno,
          "wrong_field_count",
          f"{len(cols)} comma-separated fields, expected 6 (sample_id, click, "
          "conversion, common_feature_index, feature_num, feature_list)",
        )
        continue
      _sid, click, _conv, cfi, fnum, flist = cols
      if click not in ("0", "1"):
        rej.reject(skel, lineno, "bad_click", f"field 'click': expected 0 or 1, got {click!r}")
        continue
      u = cfi_user.get(cfi)
      if u is None:
        rej.reject(
          skel,
          lineno,
          "unknown_common_feature_index",
          f"field 'common_feature_index': {cfi!r} is not in {common.name}",
        )
        continue
      feats = _parse_features(skel, lineno, flist, fnum, item_wanted, rej)
      if feats is None:
        continue
      sc = feats.get(SCENARIO_FIELD, [])
      if len(sc) != 1:
        rej.reject(
          skel, lineno, "unknown_scenario", f"field '301': {len(sc)} values, expected exactly 1"
        )
        continue
      s = str(sc[0][0])
      if allowed is not None and s not in allowed:
        rej.reject(
          skel,
          lineno,
          "unknown_scenario",
          f"field '301': {s} is not one of the scenarios {allowed}",
        )
        continue
      iid = scalar(feats, "205", skel)
      if iid is None:
        rej.reject(skel, lineno, "missing_item_id", "field '205' (item id) is missing")
        continue
      n = len(items)
      i = items(iid)
      if i == n:
        ifeat.append([scalar(feats, f, skel) for f in ITEM_FIELDS])
      r_user.append(u), r_item.append(i), r_scen.append(scen_of(s))
      r_label.append(int(click)), r_part.append(part_id), r_line.append(lineno)

  names = allowed if allowed is not None else sorted(scen_of.keys, key=int)
  sid = np.asarray([names.index(k) for k in scen_of.keys] or [0], np.int8)
  r_scen = sid[np.frombuffer(r_scen, np.int32)]
  part = np.frombuffer(r_part, np.int8)
  n = len(part)
  frac = split_fractions(data_cfg)
  seed = int(cfg_get(data_cfg, "split_seed", 42))
  if len(parts) == 2:  # test file = test; train file -> train / valid at split[0] : split[1]
    split = np.full(n, 2, np.int8)
    tr = np.flatnonzero(part == 0)
    n_train = int(round(frac[0] / max(frac[0] + frac[1], 1e-12) * len(tr)))
    perm = np.random.default_rng(seed).permutation(len(tr))
    split[tr[perm[:n_train]]] = 0
    split[tr[perm[n_train:]]] = 1
  else:
    split = random_split(n, frac, seed)
  return (
    users,
    items,
    ufeat,
    ifeat,
    r_user,
    r_item,
    r_scen,
    r_label,
    split,
    [f"301={s}" for s in names],
    read,
    sources,
    np.frombuffer(r_line, np.int64),
    part.astype(np.int64),
    skels,
    dict(multi_scalar),
  )


# ----------------------------------------------------------------------------- prepare


def prepare(data_cfg, out_dir: str | os.PathLike) -> Path:
  """Read Ali-CCP from ``data_cfg.dir`` (raw Tianchi or preprocessed CSV) and write a store.

  data_cfg fields: dir, layout ('auto'|'raw'|'csv'), on_error ('strict'|'skip'), split (raw
  layout, see the module docstring), split_seed, min_count, max_multi_hot (0 = keep every value
  of a multi-valued field), scenarios (optional allowed 301 values, in scenario order).

  Output: users (fields 101, 121..129 int32 [U]; 109_14, 110_14, 127_14, 150_14 int32 [U, L] +
  bool mask), items (205, 206, 207, 210, 216 int32 [I]), interactions with scenario = field 301
  and label = click (float32), split int8.

  Raises FileNotFoundError for missing files, store.DataError for an empty file, a missing CSV
  column (naming file and column), no valid rows, or under 'strict' the first bad line
  (``file:line: field '...': ...``); under 'skip' bad lines are counted in
  manifest['rows_rejected'][file][reason].
  """
  d = Path(cfg_get(data_cfg, "dir", "")).expanduser()
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: Ali-CCP directory not found (config.data.dir)")
  rej = Rejects(cfg_get(data_cfg, "on_error", "strict"))
  dup_policy = store.duplicates_policy(data_cfg, "keep")
  layout = detect_layout(d, cfg_get(data_cfg, "layout", "auto"))
  notes = {}
  if layout == "csv":
    (
      users,
      items,
      ufeat,
      ifeat,
      r_user,
      r_item,
      r_scen,
      r_label,
      split,
      names,
      read,
      sources,
      lines,
      fidx,
      row_files,
    ) = _read_csv_layout(d, data_cfg, rej)
  else:
    (
      users,
      items,
      ufeat,
      ifeat,
      r_user,
      r_item,
      r_scen,
      r_label,
      split,
      names,
      read,
      sources,
      lines,
      fidx,
      row_files,
      multi_scalar,
    ) = _read_raw_layout(d, data_cfg, rej)
    if multi_scalar:
      notes["scalar_fields_with_several_values_first_kept"] = multi_scalar
  if len(r_user) == 0:
    raise store.DataError(f"{d}: no valid impressions in the {layout} layout")
  r_user, r_item = np.frombuffer(r_user, np.int32), np.frombuffer(r_item, np.int32)
  r_scen, r_label = np.asarray(r_scen, np.int32), np.frombuffer(r_label, np.int8)

  def detail(i, j):
    where = f"line {lines[j]}" if fidx[i] == fidx[j] else f"{row_files[fidx[j]].name}:{lines[j]}"
    return (
      f"fields '101', '205', '301': ({users.keys[r_user[i]]}, {items.keys[r_item[i]]}, "
      f"{names[r_scen[i]]}) repeat {where}"
    )

  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_item, r_scen),
    lines=lines,
    paths=row_files,
    files=fidx,
    values=r_label,
    detail=detail,
  )
  r_user, r_item, r_scen, r_label = r_user[dd.rows], r_item[dd.rows], r_scen[dd.rows], dd.values
  split = np.asarray(split)[dd.rows]

  uvals = {f: [row[j] for row in ufeat] for j, f in enumerate(USER_FIELDS)}
  # The csv layout's id 0 is "unknown / rare" (torch-rechub): its entity gets field id 0 too.
  uvals["101"] = [k if isinstance(k, int) else None for k in users.keys]
  ivals = {f: [row[j] for row in ifeat] for j, f in enumerate(ITEM_FIELDS)}
  ivals["205"] = [k if isinstance(k, int) else None for k in items.keys]
  extra = {
    "dataset": "ali_ccp",
    "layout": layout,
    "source_dir": str(d.resolve()),
    "sources": store.source_records(sources),
    "rows_read": dict(read),
    "rows_rejected": rejected_dict(rej),
    **store.duplicates_manifest(dup_policy, dd),
    "options": store.data_options(data_cfg),
    "label": "click",
    "scenario_rule": "field 301: " + ", ".join(f"{n} -> {k}" for k, n in enumerate(names)),
    "field_mapping": {
      "user": list(USER_FIELDS),
      "user_multi_hot": list(USER_MULTI),
      "item": list(ITEM_FIELDS),
      "scenario": SCENARIO_FIELD,
      "unused": list(CROSS_FIELDS) + ["dense weights", "purchase/conversion"],
    },
    "entity_features": "first occurrence of each user (101) / item (205)",
    **notes,
  }
  out = build_and_write(
    out_dir,
    scenario_names=names,
    r_user=r_user,
    r_item=r_item,
    scenario=r_scen,
    label=r_label,
    split=split,
    user_keys=users.keys,
    item_keys=items.keys,
    user_vals=uvals,
    item_vals=ivals,
    multi=USER_MULTI,
    min_count=int(cfg_get(data_cfg, "min_count", 1)),
    max_len=int(cfg_get(data_cfg, "max_multi_hot", 0) or 0),
    extra=extra,
  )
  log.info(
    "prepared Ali-CCP (%s layout): %d impressions, %d users, %d items; rejected %s",
    layout,
    len(r_user),
    len(users),
    len(items),
    extra["rows_rejected"] or "none",
  )
  return out
