"""KuaiRand (Gao et al., CIKM 2022; Zenodo, CC BY-SA 4.0) with ``tab`` as the scenario (docs/design.md §4).

Logs (``data_cfg.dir``; ``data_cfg.layout`` = 'auto' | 'release' | 'sample'):
  release -- the KuaiRand-Pure / -1K / -27K files: ``log_standard_*.csv`` (and, with
    ``include_random=True``, ``log_random_*.csv``), one exposure per row with at least
    ``user_id, video_id, is_click, tab`` (see ../shared/data/kuairand_sample/SOURCE.md);
  sample -- Scenario-Wise-Rec's joined file (``kuairand_sample.csv``: log columns plus some user /
    video columns), i.e. every other ``*.csv`` in the folder.
Feature tables: ``user_features_*.csv`` and ``video_features_basic_*.csv`` from
``data_cfg.features_dir`` (when the key is absent: the complete KuaiRand-Pure tables in
../shared/data/kuairand_pure_features; None / '': none), else from ``dir`` itself; they are joined to the log rows on
user_id / video_id. A log row whose id is not in a table is rejected ('unknown_user' /
'unknown_video'). Only in the sample layout with no tables anywhere are the sample's own columns
used, per entity from its first occurrence.

Fields:
  user: user_id, user_active_degree, is_lowactive_period, is_live_streamer, is_video_author, the
    four ``*_range`` buckets (follow / fans / friend / register_days), onehot_feat0..17 (integral
    floats such as ``1.0`` read as ``1``; empty = missing -> id 0). The raw counts are not used
    (their ``*_range`` buckets are).
  item: video_id, author_id, video_type, upload_type, visible_status, music_id, music_type and
    ``tag`` -- multi-hot: the comma-separated category ids (empty tag = no value).
Scenario = ``tab`` (an integer in 0..14, else 'unknown_scenario'); ``top_tabs`` (default 4; 0 = all)
keeps the tabs with the most valid rows (ties: the smaller tab) and counts every row of another
tab as rejected with reason 'tab_not_kept' (under any policy: it is a choice, not an error).
Scenario k = the k-th kept tab in increasing tab order, named ``tab=<v>``.
Label = is_click (0 / 1). Split: seeded random ``split`` (8:1:1) of the kept rows.
Repeats: a (user_id, video_id, tab) seen in several log rows is one exposure under
``duplicates='max'`` (the default: the first row, clicked if any of them was; the others are
counted in the manifest's rows_merged), so it never lands in both the training and the test
split; 'error' / 'first' / 'last' / 'keep' as in ``store.resolve_duplicates``.
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
  build_and_write,
  cfg_get,
  random_split,
  read_csv,
  rejected_dict,
  split_fractions,
)

log = logging.getLogger(__name__)

SHARED_FEATURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "kuairand_pure_features"
LOG_COLUMNS = ("user_id", "video_id", "is_click", "tab")
USER_FIELDS = (
  "user_active_degree",
  "is_lowactive_period",
  "is_live_streamer",
  "is_video_author",
  "follow_user_num_range",
  "fans_user_num_range",
  "friend_user_num_range",
  "register_days_range",
  *(f"onehot_feat{j}" for j in range(18)),
)
ITEM_FIELDS = (
  "author_id",
  "video_type",
  "upload_type",
  "visible_status",
  "music_id",
  "music_type",
  "tag",
)
SAMPLE_ITEM_FIELDS = ("video_type", "visible_status", "server_width", "server_height")
MULTI = ("tag",)
NUM_TABS = 15


def _norm(v: str) -> str | None:
  """Strip; '' -> None; an integral float ('1.0') -> its integer text ('1')."""
  v = v.strip()
  if not v:
    return None
  try:
    f = float(v)
    if f.is_integer() and any(c in v for c in ".eE"):
      return str(int(f))
  except ValueError:
    pass
  return v


def _id(path, lineno, field, text, rej) -> int | None:
  """An id of ``field`` within int64, or None after rejecting the row ('bad_<field>')."""
  k = store.parse_exact_int(text)
  if k is None:
    rej.reject(
      path, lineno, f"bad_{field}", f"field {field!r}: expected an integer id, got {text!r}"
    )
  elif not store.INT64_MIN <= k <= store.INT64_MAX:
    rej.reject(
      path, lineno, f"bad_{field}", f"field {field!r}: {text.strip()} does not fit a 64-bit integer"
    )
    k = None
  return k


def _one(folder: Path, pattern: str) -> Path | None:
  hits = sorted(folder.glob(pattern))
  if len(hits) > 1:
    raise store.DataError(f"{folder}: several files match {pattern!r}: {[p.name for p in hits]}")
  return hits[0] if hits else None


def find_files(data_cfg) -> tuple[str, list[Path], Path | None, Path | None]:
  """(layout, log files, user table or None, video table or None) for ``data_cfg``."""
  d = Path(cfg_get(data_cfg, "dir", "")).expanduser()
  if not d.is_dir():
    raise FileNotFoundError(f"{d}: KuaiRand directory not found (config.data.dir)")
  layout = cfg_get(data_cfg, "layout", "auto")
  if layout not in ("auto", "release", "sample"):
    raise ValueError(f"config.data.layout={layout!r}; expected 'auto', 'release' or 'sample'")
  std = sorted(d.glob("log_standard_*.csv"))
  if layout == "auto":
    layout = "release" if std else "sample"
  if layout == "release":
    logs = std + (
      sorted(d.glob("log_random_*.csv")) if cfg_get(data_cfg, "include_random", False) else []
    )
    if not std:
      raise FileNotFoundError(f"{d}: no log_standard_*.csv (the KuaiRand release layout)")
  else:
    logs = sorted(
      p
      for p in d.glob("*.csv")
      if not p.name.startswith(("log_", "user_features_", "video_features_"))
    )
    if not logs:
      raise FileNotFoundError(f"{d}: no log CSV (kuairand_sample.csv) and no log_standard_*.csv")
  try:
    has_key = "features_dir" in data_cfg
  except TypeError:
    has_key = hasattr(data_cfg, "features_dir")
  fdir = (
    cfg_get(data_cfg, "features_dir", None)
    if has_key
    else (str(SHARED_FEATURES) if SHARED_FEATURES.is_dir() else None)
  )
  utab = vtab = None
  for folder in ([Path(fdir).expanduser()] if fdir else []) + [d]:
    if not folder.is_dir():
      raise FileNotFoundError(
        f"{folder}: KuaiRand feature directory not found (config.data.features_dir)"
      )
    utab = utab or _one(folder, "user_features_*.csv")
    vtab = vtab or _one(folder, "video_features_basic_*.csv")
  if layout == "release" and (utab is None or vtab is None):
    raise FileNotFoundError(
      f"user_features_*.csv / video_features_basic_*.csv not found in "
      f"{fdir or ''} {d} (set config.data.features_dir)"
    )
  return layout, logs, utab, vtab


def _read_table(path: Path, key: str, fields, rej, read) -> dict:
  """{int id: [field values]} of a feature table; a repeated id is rejected ('duplicate_<key>')."""
  out = {}
  for lineno, row in read_csv(path, rej, (key, *fields), "a KuaiRand feature table", counter=read):
    k = _id(path, lineno, key, row[key], rej)
    if k is None:
      continue
    if k in out:
      rej.reject(path, lineno, f"duplicate_{key}", f"field {key!r}: {k} repeats an earlier line")
      continue
    vals = []
    for f in fields:
      if f in MULTI:
        vals.append([t for t in (_norm(x) for x in row[f].split(",")) if t is not None])
      else:
        vals.append(_norm(row[f]))
    out[k] = vals
  return out


def prepare(data_cfg, out_dir: str | os.PathLike) -> Path:
  """Read KuaiRand logs and feature tables (see the module docstring) and write a store.

  data_cfg fields: dir, layout, features_dir, include_random, top_tabs, on_error
  ('strict'|'skip'), split, split_seed, min_count, max_multi_hot (0 = keep every tag).

  Output: users (user_id + USER_FIELDS, int32 [U]), items (video_id + ITEM_FIELDS, int32 [I];
  tag int32 [I, L] + bool mask), interactions with scenario = kept tab index, label = is_click.

  Raises FileNotFoundError for missing files / folders, store.DataError for an empty file, a
  missing column (naming file and column), no valid rows, or under 'strict' the first bad row
  (``file:line: field 'tab': ...``); under 'skip' bad rows are counted in
  manifest['rows_rejected'][file][reason]. Rows of dropped tabs are always counted there as
  'tab_not_kept'.
  """
  rej = Rejects(cfg_get(data_cfg, "on_error", "strict"))
  dup_policy = store.duplicates_policy(data_cfg, "max")
  layout, logs, utab, vtab = find_files(data_cfg)
  top = int(cfg_get(data_cfg, "top_tabs", 4) or 0)
  read = collections.Counter()
  embedded = utab is None or vtab is None
  users_t = videos_t = None
  if not embedded:
    users_t = _read_table(utab, "user_id", USER_FIELDS, rej, read)
    videos_t = _read_table(vtab, "video_id", ITEM_FIELDS, rej, read)
  ufields, ifields = USER_FIELDS, ITEM_FIELDS

  users, items = Interner(), Interner()
  ufeat, ifeat = [], []
  r_user, r_item = array.array("i"), array.array("i")
  r_tab, r_label, r_file = array.array("b"), array.array("b"), array.array("h")
  r_line = array.array("q")
  for fi, path in enumerate(logs):
    if embedded:  # sample layout without tables: the sample's own columns
      with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = [h.strip() for h in f.readline().split(",")]
      ufields = tuple(c for c in USER_FIELDS if c in header)
      ifields = tuple(c for c in SAMPLE_ITEM_FIELDS if c in header)
    for lineno, row in read_csv(path, rej, LOG_COLUMNS, "a KuaiRand log CSV", counter=read):
      uid = _id(path, lineno, "user_id", row["user_id"], rej)
      if uid is None:
        continue
      vid = _id(path, lineno, "video_id", row["video_id"], rej)
      if vid is None:
        continue
      click = store.parse_exact_int(row["is_click"])
      if click not in (0, 1):
        rej.reject(
          path,
          lineno,
          "bad_is_click",
          f"field 'is_click': expected 0 or 1, got {row['is_click']!r}",
        )
        continue
      tab = store.parse_exact_int(row["tab"])
      if tab is None or not 0 <= tab < NUM_TABS:
        rej.reject(
          path,
          lineno,
          "unknown_scenario",
          f"field 'tab': expected an integer in [0, {NUM_TABS - 1}], got {row['tab']!r}",
        )
        continue
      if not embedded:
        if uid not in users_t:
          rej.reject(path, lineno, "unknown_user", f"field 'user_id': {uid} is not in {utab.name}")
          continue
        if vid not in videos_t:
          rej.reject(
            path, lineno, "unknown_video", f"field 'video_id': {vid} is not in {vtab.name}"
          )
          continue
      nu, ni = len(users), len(items)
      u, i = users(uid), items(vid)
      if u == nu:
        ufeat.append(users_t[uid] if not embedded else [_norm(row[c]) for c in ufields])
      if i == ni:
        ifeat.append(videos_t[vid] if not embedded else [_norm(row[c]) for c in ifields])
      r_user.append(u), r_item.append(i), r_tab.append(tab), r_label.append(click)
      r_file.append(fi), r_line.append(lineno)

  if sum(read[p.name] for p in logs) == 0:
    raise store.DataError(f"{logs[0]}: no data rows (file is empty)")
  tab = np.frombuffer(r_tab, np.int8).astype(np.int64) if len(r_tab) else np.zeros(0, np.int64)
  if len(tab) == 0:
    raise store.DataError(f"{', '.join(str(p) for p in logs)}: no valid log rows")
  r_user, r_item = np.frombuffer(r_user, np.int32), np.frombuffer(r_item, np.int32)
  fidx, lines = np.frombuffer(r_file, np.int16), np.frombuffer(r_line, np.int64)

  # The same video shown again to the same user in the same tab (before choosing the tabs, so
  # that the tab sizes count exposures).
  def detail(i, j):
    where = f"line {lines[j]}" if fidx[i] == fidx[j] else f"{logs[fidx[j]].name}:{lines[j]}"
    return (
      f"fields 'user_id', 'video_id', 'tab': ({users.keys[r_user[i]]}, "
      f"{items.keys[r_item[i]]}, {tab[i]}) repeat {where}"
    )

  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_item, tab),
    lines=lines,
    paths=logs,
    files=fidx,
    values=np.frombuffer(r_label, np.int8),
    detail=detail,
  )
  r_user, r_item, tab, fidx, label = (
    r_user[dd.rows],
    r_item[dd.rows],
    tab[dd.rows],
    fidx[dd.rows],
    dd.values,
  )
  counts = np.bincount(tab, minlength=NUM_TABS)
  present = np.flatnonzero(counts)
  by_size = present[np.lexsort((present, -counts[present]))]
  kept_tabs = np.sort(by_size[:top] if top > 0 else by_size)
  keep = np.isin(tab, kept_tabs)
  for fi, c in zip(*np.unique(fidx[~keep], return_counts=True)):
    rej.counts[logs[int(fi)].name]["tab_not_kept"] += int(c)
  rows = np.flatnonzero(keep)
  n = len(rows)
  tab_to_scen = np.full(NUM_TABS, -1, np.int32)
  tab_to_scen[kept_tabs] = np.arange(len(kept_tabs))
  split = random_split(n, split_fractions(data_cfg), int(cfg_get(data_cfg, "split_seed", 42)))

  uvals = {"user_id": users.keys, **{f: [r[j] for r in ufeat] for j, f in enumerate(ufields)}}
  ivals = {"video_id": items.keys, **{f: [r[j] for r in ifeat] for j, f in enumerate(ifields)}}
  extra = {
    "dataset": "kuairand",
    "layout": layout,
    "features": "joined tables" if not embedded else "the sample's own columns (first occurrence)",
    "source_dir": str(Path(data_cfg.dir).expanduser().resolve()),
    "sources": store.source_records([*logs, *([utab, vtab] if not embedded else [])]),
    "rows_read": dict(read),
    "rows_rejected": rejected_dict(rej),
    **store.duplicates_manifest(dup_policy, dd),
    "rows_by_tab": {int(t): int(counts[t]) for t in present},
    "kept_tabs": [int(t) for t in kept_tabs],
    "options": store.data_options(data_cfg),
    "label": "is_click",
    "scenario_rule": "tab: " + ", ".join(f"{int(t)} -> {k}" for k, t in enumerate(kept_tabs)),
  }
  out = build_and_write(
    out_dir,
    scenario_names=[f"tab={int(t)}" for t in kept_tabs],
    r_user=r_user[rows],
    r_item=r_item[rows],
    scenario=tab_to_scen[tab[rows]],
    label=label[rows],
    split=split,
    user_keys=users.keys,
    item_keys=items.keys,
    user_vals=uvals,
    item_vals=ivals,
    multi=MULTI,
    min_count=int(cfg_get(data_cfg, "min_count", 1)),
    max_len=int(cfg_get(data_cfg, "max_multi_hot", 0) or 0),
    extra=extra,
  )
  log.info(
    "prepared KuaiRand (%s): %d rows in tabs %s, %d users, %d videos; rejected %s",
    layout,
    n,
    list(kept_tabs),
    len(users),
    len(items),
    extra["rows_rejected"] or "none",
  )
  return out
