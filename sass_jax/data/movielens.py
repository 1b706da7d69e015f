"""MovieLens-1M in the GroupLens layout, as three age scenarios (docs/design.md §4).

Reads ``users.dat``, ``movies.dat`` (ISO-8859-1) and ``ratings.dat`` (or the shared sample's
``ratings_sample_100k.dat``), all ``::``-separated without a header. Scenario = age group
{1, 18} / {25} / {35, 45, 50, 56} (Scenario-Wise Rec); label = rating > 3.
User fields: user_id, gender, age, occupation, zip (first ``zip_prefix_len`` characters);
item fields: movie_id, genres (multi-hot with a mask), year (parsed from the title).
Vocabularies come from the training split (id 0 = unknown); the split is a seeded random
8:1:1 split of the rating rows.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.schema import FieldSpec

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
# Published by GroupLens next to the archive (ml-1m.zip.md5).
ML1M_MD5 = "c4d9eecfca2ab87c1945afe126590906"
RATINGS_NAMES = ("ratings.dat", "ratings_sample_100k.dat")
SCENARIOS = ("age_under25", "age_25_34", "age_35plus")
AGE_TO_SCENARIO = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}
USER_FIELDS = ("user_id", "gender", "age", "occupation", "zip")
ITEM_FIELDS = ("movie_id", "genres", "year")
_YEAR = re.compile(r"\((\d{4})\)\s*$")

log = logging.getLogger(__name__)


def _read_lines(
  path: Path, encoding: str, expect_fields: int, rej: store.Rejects, read: collections.Counter
):
  """Yield (lineno, fields) of a '::' file, validating the field count and the encoding.

  ``read[path.name]`` counts every non-blank line, rejected ones included, so that the
  manifest's rows_read = rows kept + rows rejected.
  """
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found (expected the GroupLens ML-1M layout)")
  raw = path.read_bytes()
  if not raw.strip():
    raise store.DataError(f"{path}: file is empty")
  for lineno, line in enumerate(raw.splitlines(), start=1):
    if not line.strip():
      continue
    read[path.name] += 1
    try:
      text = line.decode(encoding)
    except UnicodeDecodeError as e:
      rej.reject(path, lineno, "bad_encoding", f"not valid {encoding}: {e.reason}")
      continue
    parts = text.split("::")
    if len(parts) != expect_fields:
      rej.reject(
        path,
        lineno,
        "wrong_field_count",
        f"{len(parts)} '::'-separated fields, expected {expect_fields}",
      )
      continue
    yield lineno, parts


def _int(path, lineno, field, value, rej, valid=None, lo=store.INT64_MIN):
  """The integer in ``value`` or None after rejecting the row: not a plain decimal integer,
  below ``lo``, beyond int64 (ids are never read as floats), or not in ``valid``."""
  v = rej.id_field(path, lineno, field, value, lo=lo)
  if v is None:
    return None
  if valid is not None and v not in valid:
    rej.reject(path, lineno, f"bad_{field}", f"field {field!r}: {v} is not one of {sorted(valid)}")
    return None
  return v


def find_ratings(data_dir: Path) -> Path:
  """The ratings file in ``data_dir``: ratings.dat, else ratings_sample_100k.dat."""
  for name in RATINGS_NAMES:
    if (data_dir / name).is_file():
      return data_dir / name
  raise FileNotFoundError(
    f"{data_dir}: none of {', '.join(RATINGS_NAMES)} found; pass "
    "--config.data.dir=<folder with the GroupLens ml-1m files> or "
    "--config.data.download=True"
  )


def download(dest: Path) -> Path:
  """Download ml-1m.zip from GroupLens into ``dest``, verify its MD5, unpack; return the folder.

  Raises store.DataError if the checksum does not match (the archive is deleted).
  """
  dest.mkdir(parents=True, exist_ok=True)
  zpath = dest / "ml-1m.zip"
  if not zpath.exists():
    tmp = zpath.with_suffix(".part")
    log.info("downloading %s", ML1M_URL)
    urllib.request.urlretrieve(ML1M_URL, tmp)
    tmp.rename(zpath)
  md5 = hashlib.md5(zpath.read_bytes()).hexdigest()
  if md5 != ML1M_MD5:
    zpath.unlink()
    raise store.DataError(f"{zpath}: MD5 {md5} does not match GroupLens' {ML1M_MD5}")
  with zipfile.ZipFile(zpath) as z:
    z.extractall(dest)
  return dest / "ml-1m"


def prepare(data_cfg, out_dir: str | Path) -> Path:
  """Read the raw MovieLens files named by ``data_cfg`` and write a store at ``out_dir``.

  data_cfg fields: dir, download, on_error ('strict'|'skip'), duplicates (default 'error'),
  split (train, valid, test fractions), split_seed, zip_prefix_len, min_count, max_genres.

  Bad rows: a wrong field count; an id that is not a decimal integer or does not fit int64;
  a rating outside 1..5; a negative or non-integer timestamp; an unknown user / movie; a
  repeated UserID / MovieID line. A (user, movie) pair rated on two lines is handled by
  ``duplicates`` (``store.resolve_duplicates``; 'error' makes it a bad row naming both lines).
  Raises FileNotFoundError / store.DataError naming the file and line on bad input (policy
  'strict'); under 'skip' rejected rows are counted by file and reason in the manifest
  (rows_read = kept + rejected + merged, per file).
  """
  data_dir = Path(data_cfg.dir).expanduser()
  if data_cfg.download:
    data_dir = download(data_dir)
  rej = store.Rejects(data_cfg.on_error)
  users_path, movies_path = data_dir / "users.dat", data_dir / "movies.dat"
  ratings_path = find_ratings(data_dir)
  dup_policy = store.duplicates_policy(data_cfg, "error")
  read = collections.Counter()

  users = {}
  for lineno, (uid, gender, age, occ, zipc) in _read_lines(users_path, "latin-1", 5, rej, read):
    u = _int(users_path, lineno, "UserID", uid, rej)
    a = _int(users_path, lineno, "Age", age, rej, AGE_TO_SCENARIO)
    o = _int(users_path, lineno, "Occupation", occ, rej, range(21))
    if None in (u, a, o):
      continue
    if gender not in ("M", "F"):
      rej.reject(
        users_path, lineno, "bad_Gender", f"field 'Gender': expected M or F, got {gender!r}"
      )
      continue
    if u in users:
      rej.reject(
        users_path, lineno, "duplicate_UserID", f"field 'UserID': {u} repeats an earlier line"
      )
      continue
    users[u] = (gender, a, o, zipc.strip()[: data_cfg.zip_prefix_len])

  movies = {}
  for lineno, (mid, title, genres) in _read_lines(movies_path, "latin-1", 3, rej, read):
    m = _int(movies_path, lineno, "MovieID", mid, rej)
    if m is None:
      continue
    if m in movies:
      rej.reject(
        movies_path, lineno, "duplicate_MovieID", f"field 'MovieID': {m} repeats an earlier line"
      )
      continue
    ym = _YEAR.search(title)
    g = [x for x in genres.strip().split("|") if x][: data_cfg.max_genres]
    movies[m] = (ym.group(1) if ym else "", g)

  r_user, r_item, r_rating, r_line = [], [], [], []
  for lineno, (uid, mid, rating, ts) in _read_lines(ratings_path, "latin-1", 4, rej, read):
    u = _int(ratings_path, lineno, "UserID", uid, rej)
    if u is None:
      continue
    m = _int(ratings_path, lineno, "MovieID", mid, rej)
    if m is None:
      continue
    r = _int(ratings_path, lineno, "Rating", rating, rej, range(1, 6))
    if r is None:
      continue
    if _int(ratings_path, lineno, "Timestamp", ts, rej, lo=0) is None:
      continue
    if u not in users:
      rej.reject(ratings_path, lineno, "unknown_user", f"field 'UserID': {u} is not in users.dat")
      continue
    if m not in movies:
      rej.reject(
        ratings_path, lineno, "unknown_movie", f"field 'MovieID': {m} is not in movies.dat"
      )
      continue
    r_user.append(u), r_item.append(m), r_rating.append(r), r_line.append(lineno)
  if not r_user:
    raise store.DataError(f"{ratings_path}: no valid rating rows")

  r_user, r_item, r_rating = (np.asarray(a, np.int64) for a in (r_user, r_item, r_rating))
  r_line = np.asarray(r_line, np.int64)
  # A (user, movie) pair rated twice (the scenario follows from the user).
  dd = store.resolve_duplicates(
    dup_policy,
    rej,
    (r_user, r_item),
    lines=r_line,
    paths=[ratings_path],
    values=r_rating,
    detail=lambda i, j: (
      f"fields 'UserID', 'MovieID': ({r_user[i]}, {r_item[i]}) repeat line {r_line[j]}"
    ),
  )
  r_user, r_item, r_rating = r_user[dd.rows], r_item[dd.rows], dd.values
  n = len(r_user)
  split = store.random_split(n, data_cfg.split, data_cfg.split_seed)

  # Entity tables: every user / movie that appears in any rating row, sorted by raw id.
  user_raw, user_row = np.unique(r_user, return_inverse=True)
  item_raw, item_row = np.unique(r_item, return_inverse=True)
  train = split == 0
  tr_users, tr_items = r_user[train], r_item[train]
  mc = data_cfg.min_count

  ucols, specs_u = {}, []
  per_user = {
    "user_id": (lambda u: u),
    "gender": (lambda u: users[u][0]),
    "age": (lambda u: users[u][1]),
    "occupation": (lambda u: users[u][2]),
    "zip": (lambda u: users[u][3]),
  }
  for f in USER_FIELDS:
    vocab = store.build_vocab([per_user[f](u) for u in tr_users], mc)
    ucols[f] = store.apply_vocab(np.asarray([per_user[f](u) for u in user_raw]), vocab)
    specs_u.append(FieldSpec(f, len(vocab) + 1))

  icols, imasks, specs_i = {}, {}, []
  vocab = store.build_vocab(tr_items, mc)
  icols["movie_id"] = store.apply_vocab(item_raw, vocab)
  specs_i.append(FieldSpec("movie_id", len(vocab) + 1))
  gvocab = store.build_vocab([g for m in tr_items for g in movies[m][1]], mc)
  L = data_cfg.max_genres
  genres = np.zeros((len(item_raw), L), np.int32)
  for row, m in enumerate(item_raw):
    ids = [gvocab.get(g, 0) for g in movies[m][1]]
    genres[row, : len(ids)] = ids
  icols["genres"] = genres
  imasks["genres"] = np.asarray([[j < len(movies[m][1]) for j in range(L)] for m in item_raw])
  specs_i.append(FieldSpec("genres", len(gvocab) + 1, multi_hot=L))
  yvocab = store.build_vocab([movies[m][0] for m in tr_items], mc)
  icols["year"] = store.apply_vocab(np.asarray([movies[m][0] for m in item_raw]), yvocab)
  specs_i.append(FieldSpec("year", len(yvocab) + 1))

  scen = np.asarray([AGE_TO_SCENARIO[users[u][1]] for u in r_user], np.int32)
  inter = {
    "user": user_row.astype(np.int32),
    "item": item_row.astype(np.int32),
    "scenario": scen,
    "label": (r_rating > 3).astype(np.float32),
    "split": split,
  }
  rejected = {k: dict(v) for k, v in rej.counts.items()}
  extra = {
    "dataset": "movielens_1m",
    "source_dir": str(data_dir.resolve()),
    "sources": store.source_records((users_path, movies_path, ratings_path)),
    "rows_read": dict(read),
    "rows_rejected": rejected,
    **store.duplicates_manifest(dup_policy, dd),
    "rows_kept": {"ratings": n, "users": len(user_raw), "movies": len(item_raw)},
    "options": store.data_options(data_cfg),
    "label": "rating > 3",
    "scenario_rule": "age {1,18} -> 0, {25} -> 1, {35,45,50,56} -> 2",
  }
  out = store.write_store(
    out_dir,
    scenario_names=list(SCENARIOS),
    user_specs=specs_u,
    item_specs=specs_i,
    users=ucols,
    items=icols,
    user_masks={},
    item_masks=imasks,
    inter=inter,
    user_raw_ids=user_raw,
    item_raw_ids=item_raw,
    extra_manifest=extra,
  )
  log.info(
    "prepared %d ratings (%d users, %d movies; rejected %s) into %s",
    n,
    len(user_raw),
    len(item_raw),
    rejected or "none",
    out,
  )
  return out
