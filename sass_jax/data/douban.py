"""Douban as a multi-scenario data set, two releases (docs/design.md §4).

- ``prepare_gadtcdr``: the GA-DTCDR release (book + music ratings, users shared across domains),
  ``../shared/data/douban_gadtcdr_book_music`` (see its SOURCE.md).
- ``prepare_sample``: the Scenario-Wise Rec sample (book / movie / music rows with user side
  features), ``../shared/data/douban_sample`` (see its SOURCE.md).

The file readers it shares with ``amazon.py`` and ``mind.py`` are in ``readers.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.readers import INT32_MAX, read_csv_rows, read_int_table, vocab_column
from sass_jax.data.store import Rejects, random_split

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Shared by both releases.
# ----------------------------------------------------------------------------------------------


def _entities(r_user, r_item, r_dom, domain_names):
  """Entity tables of per-domain item ids: items are keyed by (domain, id).

  Returns (item_key int64 [n], user_raw, user_row [n], item_keys [I], item_row [n],
  item_dom [I], item_raw str [I] as '<domain>:<id>').
  """
  item_key = (r_dom << 32) | r_item
  user_raw, user_row = np.unique(r_user, return_inverse=True)
  item_keys, item_row = np.unique(item_key, return_inverse=True)
  item_dom, item_num = item_keys >> 32, item_keys & 0xFFFFFFFF
  item_raw = np.asarray([f"{domain_names[d]}:{i}" for d, i in zip(item_dom, item_num)])
  return item_key, user_raw, user_row, item_keys, item_row, item_dom, item_raw


# ----------------------------------------------------------------------------------------------
# GA-DTCDR release: douban_{domain}_ratings.dat, user_id <TAB> item_id <TAB> rating.
# ----------------------------------------------------------------------------------------------

GADTCDR_DOMAINS = ("book", "music")
GADTCDR_COLUMNS = ("user_id", "item_id", "rating")


def find_gadtcdr_file(data_dir: Path, domain: str) -> Path:
  """The ratings file of ``domain``: ``douban_<domain>_ratings.dat`` (the shared copy) or the
  repository's ``Data/douban_<domain>/ratings.dat`` layout (``data_dir`` = the repo or Data/).

  Raises FileNotFoundError naming the expected file if neither exists.
  """
  flat = data_dir / f"douban_{domain}_ratings.dat"
  for p in (
    flat,
    data_dir / f"douban_{domain}" / "ratings.dat",
    data_dir / "Data" / f"douban_{domain}" / "ratings.dat",
  ):
    if p.is_file():
      return p
  raise FileNotFoundError(
    f"{flat}: file not found (expected the GA-DTCDR ratings of domain "
    f"{domain!r}: douban_{domain}_ratings.dat or "
    f"douban_{domain}/ratings.dat in {data_dir})"
  )


def prepare_gadtcdr(data_cfg, out_dir: str | Path) -> Path:
  """Douban book + music ratings of the GA-DTCDR release -> a 2-scenario store at ``out_dir``.

  Reads ``douban_<domain>_ratings.dat`` (or ``douban_<domain>/ratings.dat``) for each of
  ``data_cfg.domains`` (default ('book', 'music')): tab-separated ``user_id, item_id, rating``,
  no header. Scenario k = the k-th domain (the file). User ids are shared across the domains;
  item ids are per domain, so an item is keyed by (domain, item_id) (raw id ``"book:1630"``).
  Label = rating >= 4; every rating is an exposure. Split: seeded random
  ``data_cfg.split`` (8:1:1) of all rating rows with ``data_cfg.split_seed``.
  Fields: users ``user_id``; items ``item_id``, ``domain``. Vocabularies from the training split
  (values seen fewer than ``data_cfg.min_count`` times -> 0).

  Rejected rows (wrong field count, non-integer id or rating, rating outside 1..5, an id over
  2**31 - 1): 'strict' raises store.DataError naming file:line and field; 'skip' counts them in
  manifest['rows_rejected'][file][reason]. A (user, item) pair rated twice within a domain is
  handled by ``data_cfg.duplicates`` (default 'error': a bad row as above, 'duplicate_pair';
  see ``store.resolve_duplicates``). A missing file raises
  FileNotFoundError, an empty one DataError; nothing is written then.
  Source: docs/design.md §4; ``douban_gadtcdr_book_music/SOURCE.md`` (GitHub fengzhu1/GA-DTCDR).
  """
  data_dir = Path(data_cfg.dir).expanduser()
  domains = tuple(data_cfg.get("domains", GADTCDR_DOMAINS))
  if len(domains) < 1 or len(set(domains)) != len(domains):
    raise ValueError(f"config.data.domains must be distinct domain names, got {domains}")
  rej = Rejects(data_cfg.on_error, data_dir)
  dup_policy = store.duplicates_policy(data_cfg, "error")
  paths = [find_gadtcdr_file(data_dir, d) for d in domains]

  read, parts = {}, []
  for k, path in enumerate(paths):
    vals, linenos, n_read = read_int_table(
      path, GADTCDR_COLUMNS, rej, "GA-DTCDR layout: user_id<TAB>item_id<TAB>rating"
    )
    read[rej.key(path)] = n_read
    bad = (vals[:, 2] < 1) | (vals[:, 2] > 5)
    keep = rej.reject_rows(
      path, bad, linenos, "bad_rating", lambda i: f"field 'rating': {vals[i, 2]} is not one of 1..5"
    )
    vals, linenos = vals[keep], linenos[keep]
    parts.append(np.column_stack([vals, np.full(len(vals), k, np.int64), linenos]))
  allv = np.concatenate(parts)
  # A (user, item) pair rated twice within a domain (scenario); items are per domain.
  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (allv[:, 0], allv[:, 1], allv[:, 3]),
    lines=allv[:, 4],
    paths=paths,
    files=allv[:, 3],
    values=allv[:, 2],
    detail=lambda i, j: (
      f"fields 'user_id', 'item_id': ({allv[i, 0]}, {allv[i, 1]}) repeats "
      f"an earlier line (line {allv[j, 4]})"
    ),
  )
  allv = allv[dd.rows]
  allv[:, 2] = dd.values
  allv = allv[:, :4]
  if len(allv) == 0:
    raise store.DataError(f"{', '.join(map(str, paths))}: no valid rating rows")
  r_user, r_item, r_rating, r_dom = allv.T
  n = len(allv)
  split = random_split(n, data_cfg.split, data_cfg.split_seed)
  train = split == 0
  mc = data_cfg.min_count

  item_key, user_raw, user_row, item_keys, item_row, item_dom, item_raw = _entities(
    r_user, r_item, r_dom, domains
  )

  ucol, uspec = vocab_column("user_id", r_user[train], user_raw, mc)
  icol, ispec = vocab_column("item_id", item_key[train], item_keys, mc)
  dcol, dspec = vocab_column("domain", r_dom[train], item_dom, 1)
  inter = {
    "user": user_row.astype(np.int32),
    "item": item_row.astype(np.int32),
    "scenario": r_dom.astype(np.int32),
    "label": (r_rating >= 4).astype(np.float32),
    "split": split,
  }
  rejected = rej.as_dict()
  extra = {
    "dataset": "douban_gadtcdr",
    "source_dir": str(data_dir.resolve()),
    "sources": store.source_records(paths, rej.root),
    "rows_read": read,
    "rows_rejected": rejected,
    **store.duplicates_manifest(dup_policy, dd),
    "rows_kept": {
      "ratings": n,
      "users": len(user_raw),
      "items": len(item_keys),
      **{f"ratings_{d}": int((r_dom == k).sum()) for k, d in enumerate(domains)},
    },
    "options": store.data_options(data_cfg),
    "label": "rating >= 4",
    "scenario_rule": "the file's domain: "
    + ", ".join(f"{d} -> {k}" for k, d in enumerate(domains)),
  }
  out = store.write_store(
    out_dir,
    scenario_names=list(domains),
    user_specs=[uspec],
    item_specs=[ispec, dspec],
    users={"user_id": ucol},
    items={"item_id": icol, "domain": dcol},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=user_raw.astype(str),
    item_raw_ids=item_raw,
    extra_manifest=extra,
  )
  log.info(
    "prepared %d Douban ratings (%d users, %d items; rejected %s) into %s",
    n,
    len(user_raw),
    len(item_keys),
    rejected or "none",
    out,
  )
  return out


# ----------------------------------------------------------------------------------------------
# Scenario-Wise Rec sample: douban_sample.csv.
# ----------------------------------------------------------------------------------------------

SAMPLE_FILE = "douban_sample.csv"
SAMPLE_COLUMNS = ("user_id", "item_id", "rating", "domain", "living_place", "join_time", "time_bin")
SAMPLE_SCENARIOS = ("book", "movie", "music")


def prepare_sample(data_cfg, out_dir: str | Path) -> Path:
  """The Scenario-Wise Rec Douban sample -> a 3-scenario store at ``out_dir``.

  Reads ``data_cfg.dir / data_cfg.file`` (default ``douban_sample.csv``): a UTF-8 CSV with the
  header ``user_id,item_id,rating,domain,living_place,join_time,time_bin``. Scenario = ``domain``
  (book 0 / movie 1 / music 2); label = ``rating`` (already 0/1); every row is an exposure.
  Split: seeded random ``data_cfg.split`` (8:1:1) with ``data_cfg.split_seed``.
  Fields: users ``user_id``, ``living_place`` (empty = unknown id 0), ``time_bin`` (join-month
  bucket; ``join_time`` itself is not used); items ``item_id`` (keyed by (domain, item_id), raw
  id ``"movie:95875"``), ``domain``. Vocabularies from the training split.

  Rejected rows (wrong field count, a byte that is not UTF-8, non-integer user_id / item_id /
  time_bin or one over 2**31 - 1, rating not 0/1, domain not book/movie/music, a user whose
  living_place / time_bin differ from an earlier row; under ``data_cfg.duplicates='error'``, the
  default, a (user_id, item_id, domain) repeating an earlier row):
  'strict' raises store.DataError naming file:line and field; 'skip' counts them in
  manifest['rows_rejected'][file][reason]. A missing file raises FileNotFoundError; an empty file
  or a wrong header raises DataError; nothing is written then.
  Source: docs/design.md §4; ``douban_sample/SOURCE.md`` (GitHub Xiaopengli1/Scenario-Wise-Rec).
  """
  data_dir = Path(data_cfg.dir).expanduser()
  path = data_dir / data_cfg.get("file", SAMPLE_FILE)
  rej = Rejects(data_cfg.on_error, data_dir)
  dup_policy = store.duplicates_policy(data_cfg, "error")
  scen_of = {s: k for k, s in enumerate(SAMPLE_SCENARIOS)}
  users: dict[int, tuple[str, int]] = {}
  r_user, r_item, r_label, r_scen, r_line = [], [], [], [], []
  n_read = 0
  for lineno, row in read_csv_rows(
    path, SAMPLE_COLUMNS, rej, "the Scenario-Wise Rec douban_sample.csv layout"
  ):
    n_read += 1
    if row is None:
      continue
    ints = []
    for f in ("user_id", "item_id", "time_bin"):
      v = rej.id_field(path, lineno, f, row[f], lo=0, hi=INT32_MAX)
      if v is None:
        break
      ints.append(v)
    else:
      u, i, tbin = ints
      rating, dom = row["rating"].strip(), row["domain"].strip()
      if rating not in ("0", "1"):
        rej.reject(path, lineno, "bad_rating", f"field 'rating': expected 0 or 1, got {rating!r}")
        continue
      if dom not in scen_of:
        rej.reject(
          path,
          lineno,
          "unknown_domain",
          f"field 'domain': {dom!r} is not one of {', '.join(SAMPLE_SCENARIOS)}",
        )
        continue
      attrs = (row["living_place"].strip(), tbin)
      if users.setdefault(u, attrs) != attrs:
        rej.reject(
          path,
          lineno,
          "inconsistent_user",
          f"fields 'living_place', 'time_bin': {attrs} differ from user {u}'s earlier {users[u]}",
        )
        continue
      r_user.append(u), r_item.append(i), r_label.append(rating == "1"), r_scen.append(scen_of[dom])
      r_line.append(lineno)
  if not r_user:
    raise store.DataError(f"{path}: no valid rows")
  r_user, r_item, r_scen, r_line = (
    np.asarray(a, np.int64) for a in (r_user, r_item, r_scen, r_line)
  )
  r_label = np.asarray(r_label, np.float32)
  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_item, r_scen),
    lines=r_line,
    paths=[path],
    values=r_label,
    detail=lambda i, j: (
      f"fields 'user_id', 'item_id', 'domain': ({r_user[i]}, {r_item[i]}, "
      f"{SAMPLE_SCENARIOS[r_scen[i]]}) repeat line {r_line[j]}"
    ),
  )
  r_user, r_item, r_scen, r_label = r_user[dd.rows], r_item[dd.rows], r_scen[dd.rows], dd.values
  n = len(r_user)
  split = random_split(n, data_cfg.split, data_cfg.split_seed)
  train = split == 0
  mc = data_cfg.min_count

  item_key, user_raw, user_row, item_keys, item_row, item_dom, item_raw = _entities(
    r_user, r_item, r_scen, SAMPLE_SCENARIOS
  )
  place = np.asarray([users[u][0] for u in r_user])
  tbin = np.asarray([users[u][1] for u in r_user])

  ucols, uspecs = {}, []
  for name, tr, ent, missing in (
    ("user_id", r_user[train], user_raw, None),
    ("living_place", place[train], np.asarray([users[u][0] for u in user_raw]), ""),
    ("time_bin", tbin[train], np.asarray([users[u][1] for u in user_raw]), None),
  ):
    ucols[name], spec = vocab_column(name, tr, ent, mc, missing)
    uspecs.append(spec)
  icol, ispec = vocab_column("item_id", item_key[train], item_keys, mc)
  dcol, dspec = vocab_column("domain", r_scen[train], item_dom, 1)
  inter = {
    "user": user_row.astype(np.int32),
    "item": item_row.astype(np.int32),
    "scenario": r_scen.astype(np.int32),
    "label": r_label,
    "split": split,
  }
  rejected = rej.as_dict()
  extra = {
    "dataset": "douban_sample",
    "source_dir": str(data_dir.resolve()),
    "sources": store.source_records([path], rej.root),
    "rows_read": {rej.key(path): n_read},
    "rows_rejected": rejected,
    **store.duplicates_manifest(dup_policy, dd),
    "rows_kept": {"rows": n, "users": len(user_raw), "items": len(item_keys)},
    "options": store.data_options(data_cfg),
    "label": "rating (0/1 in the file)",
    "scenario_rule": "domain: " + ", ".join(f"{s} -> {k}" for k, s in enumerate(SAMPLE_SCENARIOS)),
  }
  out = store.write_store(
    out_dir,
    scenario_names=list(SAMPLE_SCENARIOS),
    user_specs=uspecs,
    item_specs=[ispec, dspec],
    users=ucols,
    items={"item_id": icol, "domain": dcol},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=user_raw.astype(str),
    item_raw_ids=item_raw,
    extra_manifest=extra,
  )
  log.info(
    "prepared %d Douban sample rows (%d users, %d items; rejected %s) into %s",
    n,
    len(user_raw),
    len(item_keys),
    rejected or "none",
    out,
  )
  return out
