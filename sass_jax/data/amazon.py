"""Amazon cross-domain pairs of the CDRIB release as 2-scenario data sets (docs/design.md §4).

A pair is two folders ``A_B`` and ``B_A`` (e.g. ``sport_cloth`` = Sports and ``cloth_sport`` =
Clothing), each with ``train.txt``, ``valid.txt``, ``test.txt``: tab-separated ``user_id item_id``,
0-based, no header, one implicit positive per line. See ``amazon_cdrib_pairs/SOURCE.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.store import Rejects
from sass_jax.data.readers import read_int_table, vocab_column

log = logging.getLogger(__name__)

# pair -> ((folder, scenario name) of domain 0, the same of domain 1, shared-user count C).
# Ids 0..C-1 are the overlapping users of the pair (SOURCE.md, "User and domain encoding").
PAIRS = {
  "sport_cloth": (("sport_cloth", "sports"), ("cloth_sport", "clothing"), 9828),
  "cloth_sport": (("cloth_sport", "clothing"), ("sport_cloth", "sports"), 9828),
  "game_video": (("game_video", "game"), ("video_game", "video"), 2179),
  "video_game": (("video_game", "video"), ("game_video", "game"), 2179),
}
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")  # -> split 0 / 1 / 2 (the authors')
COLUMNS = ("user_id", "item_id")
_DOMAIN_ONLY = 1 << 32  # user key of a domain-only user of domain d: (d + 1) * 2**32 + id


def resolve_pair(data_cfg):
  """((folder, name), (folder, name), C) for ``data_cfg.pair``.

  A pair not in PAIRS, named ``a_b``, is read from folders ``a_b`` and ``b_a`` with scenario
  names ``a`` / ``b``; it needs ``data_cfg.shared_users`` (C) > 0. A positive
  ``data_cfg.shared_users`` also overrides C of a known pair. Raises ValueError otherwise.
  """
  pair = data_cfg.get("pair", "sport_cloth")
  shared = int(data_cfg.get("shared_users", 0) or 0)
  if pair in PAIRS:
    d0, d1, c = PAIRS[pair]
    return d0, d1, (shared if shared > 0 else c)
  parts = str(pair).split("_")
  if len(parts) != 2 or not all(parts) or shared <= 0:
    raise ValueError(
      f"config.data.pair={pair!r}: expected one of {sorted(PAIRS)}, or a "
      "folder name 'a_b' (with folder 'b_a' beside it) together with "
      "config.data.shared_users > 0"
    )
  a, b = parts
  return (f"{a}_{b}", a), (f"{b}_{a}", b), shared


def prepare(data_cfg, out_dir: str | Path) -> Path:
  """One CDRIB Amazon pair (``data_cfg.pair``, default 'sport_cloth') -> a 2-scenario store.

  Reads ``<dir>/<folder>/{train,valid,test}.txt`` of both folders of the pair. Scenario = the
  folder (0 = the pair's first domain, e.g. sports; 1 = the second, e.g. clothing). Label 1 for
  every row (implicit positives; no negatives are stored). The split is the authors': train.txt
  -> train, valid.txt -> valid, test.txt -> test (valid / test users are cold-start in that
  domain: all their rows of the domain are held out; they appear in the other domain's train).
  Users: ids below the pair's shared-user count C (9,828 Sports/Clothing, 2,179 Game/Video) are
  the same person in both folders; an id >= C is a user of that folder only (raw id
  ``"<domain>:<id>"``; shared users keep the plain id). Items are per folder (raw id
  ``"<domain>:<id>"``). Fields: users ``user_id``; items ``item_id``, ``domain``; vocabularies
  from the training split (values seen fewer than ``data_cfg.min_count`` times -> 0).

  Rejected rows (wrong field count, non-integer or negative id, an id over 2**31 - 1):
  'strict' raises store.DataError naming file:line and field; 'skip' counts them in
  manifest['rows_rejected']['<folder>/<file>'][reason]. A (user, item) pair repeating an
  earlier line of the same folder, in any split, is handled by ``data_cfg.duplicates``
  (default 'error': a bad row as above, 'duplicate_pair'; 'first' keeps the earliest split's).
  A missing file raises FileNotFoundError, an empty one DataError; an unknown pair ValueError;
  nothing is written then.
  Source: docs/design.md §4; ``amazon_cdrib_pairs/SOURCE.md`` (GitHub cjx96/CDRIB).
  """
  data_dir = Path(data_cfg.dir).expanduser()
  (f0, n0), (f1, n1), n_shared = resolve_pair(data_cfg)
  domains = (n0, n1)
  rej = Rejects(data_cfg.on_error, data_dir)
  dup_policy = store.duplicates_policy(data_cfg, "error")
  paths = [data_dir / f / s for f in (f0, f1) for s in SPLIT_FILES]
  for p in paths:  # fail before reading anything if the layout is incomplete
    if not p.is_file():
      raise FileNotFoundError(
        f"{p}: file not found (expected the CDRIB layout "
        f"<dir>/{{{f0},{f1}}}/{{{','.join(SPLIT_FILES)}}})"
      )

  read, parts = {}, []
  merged, repeated = {}, {}
  for d, folder in enumerate((f0, f1)):
    dom_parts = []
    for s, fname in enumerate(SPLIT_FILES):
      path = data_dir / folder / fname
      vals, linenos, n_read = read_int_table(
        path, COLUMNS, rej, "CDRIB layout: user_id<TAB>item_id"
      )
      read[rej.key(path)] = n_read
      dom_parts.append((path, vals, linenos, s))
    # A (user, item) pair may occur once per folder (train, then valid, then test).
    allv = np.concatenate([v for _, v, _, _ in dom_parts])
    all_lines = np.concatenate([ln for _, _, ln, _ in dom_parts])
    all_file = np.concatenate([np.full(len(v), s) for _, v, _, s in dom_parts])
    dd = store.resolve_duplicates(
      dup_policy,
      rej,
      (allv[:, 0], allv[:, 1]),
      lines=all_lines,
      paths=[p for p, _, _, _ in dom_parts],
      files=all_file,
      detail=lambda i, j, allv=allv, folder=folder: (
        f"fields 'user_id', 'item_id': ({allv[i, 0]}, {allv[i, 1]}) repeats an earlier line "
        f"of {folder} ({SPLIT_FILES[all_file[j]]}:{all_lines[j]})"
      ),
    )
    merged.update(dd.merged), repeated.update(dd.repeated)
    parts.append(
      np.column_stack([allv[dd.rows], np.full(len(dd.rows), d, np.int64), all_file[dd.rows]])
    )
  allv = np.concatenate(parts)
  if len(allv) == 0:
    raise store.DataError(f"{data_dir}/{{{f0},{f1}}}: no valid rows")
  r_user, r_item, r_dom, r_split = allv.T
  n = len(allv)
  split = r_split.astype(np.int8)
  train = split == 0
  mc = data_cfg.min_count

  user_key = np.where(r_user < n_shared, r_user, (r_dom + 1) * _DOMAIN_ONLY + r_user)
  item_key = r_dom * _DOMAIN_ONLY + r_item
  user_keys, user_row = np.unique(user_key, return_inverse=True)
  item_keys, item_row = np.unique(item_key, return_inverse=True)
  u_scope, u_num = user_keys // _DOMAIN_ONLY, user_keys % _DOMAIN_ONLY
  user_raw = np.asarray(
    [str(u) if sc == 0 else f"{domains[sc - 1]}:{u}" for sc, u in zip(u_scope, u_num)]
  )
  item_dom, item_num = item_keys // _DOMAIN_ONLY, item_keys % _DOMAIN_ONLY
  item_raw = np.asarray([f"{domains[d]}:{i}" for d, i in zip(item_dom, item_num)])

  ucol, uspec = vocab_column("user_id", user_key[train], user_keys, mc)
  icol, ispec = vocab_column("item_id", item_key[train], item_keys, mc)
  dcol, dspec = vocab_column("domain", r_dom[train], item_dom, 1)
  inter = {
    "user": user_row.astype(np.int32),
    "item": item_row.astype(np.int32),
    "scenario": r_dom.astype(np.int32),
    "label": np.ones(n, np.float32),
    "split": split,
  }
  rejected = rej.as_dict()
  extra = {
    "dataset": "amazon_cdrib",
    "pair": data_cfg.get("pair", "sport_cloth"),
    "shared_users": n_shared,
    "source_dir": str(data_dir.resolve()),
    "sources": store.source_records(paths, rej.root),
    "rows_read": read,
    "rows_rejected": rejected,
    "duplicates": dup_policy,
    "rows_merged": merged,
    "rows_repeated": repeated,
    "rows_kept": {
      "rows": n,
      "users": len(user_keys),
      "items": len(item_keys),
      "shared_users_seen": int((u_scope == 0).sum()),
      **{f"rows_{nm}": int((r_dom == d).sum()) for d, nm in enumerate(domains)},
    },
    "options": store.data_options(data_cfg),
    "label": "1 (implicit positives)",
    "scenario_rule": f"the folder: {f0} ({n0}) -> 0, {f1} ({n1}) -> 1",
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
    user_raw_ids=user_raw,
    item_raw_ids=item_raw,
    extra_manifest=extra,
  )
  log.info(
    "prepared %d Amazon %s/%s rows (%d users, %d items; rejected %s) into %s",
    n,
    n0,
    n1,
    len(user_keys),
    len(item_keys),
    rejected or "none",
    out,
  )
  return out
