"""MIND (Microsoft News) impressions with the news category as the scenario (docs/design.md §4).

The Scenario-Wise Rec layout (``mind_multidomain_sample/mind_sample.csv``): one row per
(user, shown news, click 0/1), header ``User_ID,News_ID,label,Category,SubCategory``.
See ``mind_multidomain_sample/SOURCE.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.store import Rejects, random_split
from sass_jax.data.readers import read_csv_rows, vocab_column

log = logging.getLogger(__name__)

FILE = "mind_sample.csv"
COLUMNS = ("User_ID", "News_ID", "label", "Category", "SubCategory")
# Scenario-Wise Rec's four categories; scenario k = SCENARIOS[k].
SCENARIOS = ("news", "lifestyle", "sports", "finance")


def _valid_id(value: str, prefix: str) -> bool:
  return len(value) > 1 and value[0] == prefix and value[1:].isdigit()


def prepare(data_cfg, out_dir: str | Path) -> Path:
  """The MIND multi-domain CSV ``data_cfg.dir / data_cfg.file`` -> a 4-scenario store.

  Reads a UTF-8 CSV with the header ``User_ID,News_ID,label,Category,SubCategory`` (default file
  ``mind_sample.csv``). Scenario = ``Category`` (news 0 / lifestyle 1 / sports 2 / finance 3);
  label = ``label`` (1 = clicked in that impression); every row is an exposure. Split: seeded
  random ``data_cfg.split`` (8:1:1) with ``data_cfg.split_seed``. Fields: users ``user_id``;
  items ``news_id``, ``subcategory``. Vocabularies from the training split (values seen fewer
  than ``data_cfg.min_count`` times -> 0). The same (user, news) pair may occur in several rows
  (several impressions); ``data_cfg.duplicates`` (default 'max') decides: 'max' keeps one row
  (the first) labelled 1 if any of the impressions was clicked, counting the others in the
  manifest's rows_merged -- so one exposure never lands in both the training and the test
  split; see ``store.resolve_duplicates`` for 'error' / 'first' / 'last' / 'keep'.

  Rejected rows (wrong field count; a byte that is not UTF-8; User_ID not ``U<digits>``; News_ID not ``N<digits>``; label
  not 0/1; Category not one of the four; empty SubCategory; a News_ID whose Category or
  SubCategory differ from an earlier row): 'strict' raises store.DataError naming file:line and
  field; 'skip' counts them in manifest['rows_rejected'][file][reason]. A missing file raises
  FileNotFoundError; an empty file or a wrong header DataError; nothing is written then.
  Source: docs/design.md §4; ``mind_multidomain_sample/SOURCE.md`` (GitHub
  Xiaopengli1/Scenario-Wise-Rec, built from MIND's behaviors.tsv and news.tsv).
  """
  data_dir = Path(data_cfg.dir).expanduser()
  path = data_dir / data_cfg.get("file", FILE)
  rej = Rejects(data_cfg.on_error, data_dir)
  dup_policy = store.duplicates_policy(data_cfg, "max")
  scen_of = {s: k for k, s in enumerate(SCENARIOS)}
  news: dict[str, tuple[int, str]] = {}
  r_user, r_news, r_label, r_scen, r_line = [], [], [], [], []
  n_read = 0
  for lineno, row in read_csv_rows(path, COLUMNS, rej, "the Scenario-Wise Rec MIND layout"):
    n_read += 1
    if row is None:
      continue
    uid, nid, label, cat, sub = (row[c].strip() for c in COLUMNS)
    if not _valid_id(uid, "U"):
      rej.reject(path, lineno, "bad_User_ID", f"field 'User_ID': expected U<digits>, got {uid!r}")
      continue
    if not _valid_id(nid, "N"):
      rej.reject(path, lineno, "bad_News_ID", f"field 'News_ID': expected N<digits>, got {nid!r}")
      continue
    if label not in ("0", "1"):
      rej.reject(path, lineno, "bad_label", f"field 'label': expected 0 or 1, got {label!r}")
      continue
    if cat not in scen_of:
      rej.reject(
        path,
        lineno,
        "unknown_Category",
        f"field 'Category': {cat!r} is not one of {', '.join(SCENARIOS)}",
      )
      continue
    if not sub:
      rej.reject(path, lineno, "bad_SubCategory", "field 'SubCategory': empty")
      continue
    attrs = (scen_of[cat], sub)
    if news.setdefault(nid, attrs) != attrs:
      rej.reject(
        path,
        lineno,
        "inconsistent_News_ID",
        f"fields 'Category', 'SubCategory': ({cat!r}, {sub!r}) differ from news {nid}'s "
        f"earlier ({SCENARIOS[news[nid][0]]!r}, {news[nid][1]!r})",
      )
      continue
    r_user.append(uid), r_news.append(nid), r_label.append(label == "1")
    r_scen.append(attrs[0]), r_line.append(lineno)
  if not r_user:
    raise store.DataError(f"{path}: no valid rows")
  r_user, r_news = np.asarray(r_user), np.asarray(r_news)
  r_scen, r_label = np.asarray(r_scen, np.int32), np.asarray(r_label, np.float32)
  r_line = np.asarray(r_line, np.int64)
  # The same news shown to the same user in several impressions (the category, hence the
  # scenario, follows from the news).
  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_news),
    lines=r_line,
    paths=[path],
    values=r_label,
    detail=lambda i, j: (
      f"fields 'User_ID', 'News_ID': ({r_user[i]}, {r_news[i]}) repeat line {r_line[j]}"
    ),
  )
  r_user, r_news, r_scen, r_label = r_user[dd.rows], r_news[dd.rows], r_scen[dd.rows], dd.values
  n = len(r_user)
  split = random_split(n, data_cfg.split, data_cfg.split_seed)
  train = split == 0
  mc = data_cfg.min_count

  user_raw, user_row = np.unique(r_user, return_inverse=True)
  item_raw, item_row = np.unique(r_news, return_inverse=True)
  r_sub = np.asarray([news[x][1] for x in r_news])
  ucol, uspec = vocab_column("user_id", r_user[train], user_raw, mc)
  icol, ispec = vocab_column("news_id", r_news[train], item_raw, mc)
  scol, sspec = vocab_column(
    "subcategory", r_sub[train], np.asarray([news[x][1] for x in item_raw]), mc
  )
  inter = {
    "user": user_row.astype(np.int32),
    "item": item_row.astype(np.int32),
    "scenario": r_scen,
    "label": r_label,
    "split": split,
  }
  rejected = rej.as_dict()
  extra = {
    "dataset": "mind",
    "source_dir": str(data_dir.resolve()),
    "sources": store.source_records([path], rej.root),
    "rows_read": {rej.key(path): n_read},
    "rows_rejected": rejected,
    **store.duplicates_manifest(dup_policy, dd),
    "rows_kept": {"rows": n, "users": len(user_raw), "items": len(item_raw)},
    "options": store.data_options(data_cfg),
    "label": "label (click in the impression)",
    "scenario_rule": "Category: " + ", ".join(f"{s} -> {k}" for k, s in enumerate(SCENARIOS)),
  }
  out = store.write_store(
    out_dir,
    scenario_names=list(SCENARIOS),
    user_specs=[uspec],
    item_specs=[ispec, sspec],
    users={"user_id": ucol},
    items={"news_id": icol, "subcategory": scol},
    user_masks={},
    item_masks={},
    inter=inter,
    user_raw_ids=user_raw,
    item_raw_ids=item_raw,
    extra_manifest=extra,
  )
  log.info(
    "prepared %d MIND impressions (%d users, %d news; rejected %s) into %s",
    n,
    len(user_raw),
    len(item_raw),
    rejected or "none",
    out,
  )
  return out
