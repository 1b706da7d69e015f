"""Tests for MovieLens preparation, the store and the grain pipeline (docs/design.md §4).

The real 100k-rating sample is read from ``<repo>/../shared/data/movielens_1m_sample`` (licensed,
never copied into the repository); bad-input cases use small GroupLens-layout files in tmp_path.
"""

from __future__ import annotations

import collections
import hashlib
import re

import numpy as np
import pytest

from configs import test as test_config
from sass_jax.data import movielens, pipeline, store
from sass_jax.schema import FieldSpec

AGE_SCENARIO = {1: 0, 18: 0, 25: 1, 35: 2, 45: 2, 50: 2, 56: 2}  # SOURCE.md / Scenario-Wise Rec
SOURCE_ROWS = [21140, 39460, 39400]
SOURCE_POSITIVES = [11701, 22267, 23515]


def _data_cfg(data_dir, **kw):
  c = test_config.get_config().data
  c.dir = str(data_dir)
  for k, v in kw.items():
    c[k] = v
  return c


# ----------------------------------------------------------------------------------------------
# Independent plain-Python parse of the raw files, and the prepared store (both module-scoped)


@pytest.fixture(scope="module")
def raw(ml_sample_dir):
  users, movies, ratings = {}, {}, []
  with open(ml_sample_dir / "users.dat", encoding="latin-1") as f:
    for line in f:
      uid, gender, age, occ, zipc = line.rstrip("\n").split("::")
      users[int(uid)] = (gender, int(age), int(occ), zipc.strip()[:3])
  with open(ml_sample_dir / "movies.dat", encoding="latin-1") as f:
    for line in f:
      mid, title, genres = line.rstrip("\n").split("::")
      year = title.strip()[-5:-1]
      assert title.strip()[-6] == "(" and year.isdigit(), title
      movies[int(mid)] = (year, genres.strip().split("|"), title)
  with open(ml_sample_dir / "ratings_sample_100k.dat", encoding="latin-1") as f:
    for line in f:
      u, m, r, _ = line.rstrip("\n").split("::")
      ratings.append((int(u), int(m), int(r)))
  return users, movies, ratings


@pytest.fixture(scope="module")
def prepared(ml_sample_dir, tmp_path_factory):
  out = movielens.prepare(_data_cfg(ml_sample_dir), tmp_path_factory.mktemp("ml") / "store")
  return store.open_store(out)


def _raw_rows(data):
  """Per interaction row: (raw user id, raw movie id) as ints."""
  u = data.user_raw_ids[np.asarray(data.inter["user"])].astype(np.int64)
  m = data.item_raw_ids[np.asarray(data.inter["item"])].astype(np.int64)
  return u, m


# ----------------------------------------------------------------------------------------------
# prepare() on the real sample


def test_prepare_counts_match_source_and_raw_files(prepared, raw):
  users, movies, ratings = raw
  man = prepared.manifest
  assert man["rows_read"] == {
    "users.dat": 6040,
    "movies.dat": 3883,
    "ratings_sample_100k.dat": 100000,
  }
  assert man["rows_rejected"] == {}
  distinct_users = {u for u, _, _ in ratings}
  distinct_movies = {m for _, m, _ in ratings}
  assert len(distinct_users) == 5958 and len(distinct_movies) == 3312
  assert man["rows_kept"] == {"ratings": 100000, "users": 5958, "movies": 3312}
  assert prepared.num_users == 5958 and prepared.num_items == 3312
  assert man["split_counts"] == {"train": 80000, "valid": 10000, "test": 10000}
  assert prepared.num_scenarios == 3

  # independent per-scenario counts from the raw files
  rows, pos = [0, 0, 0], [0, 0, 0]
  for u, _, r in ratings:
    k = AGE_SCENARIO[users[u][1]]
    rows[k] += 1
    pos[k] += r > 3
  assert rows == SOURCE_ROWS and pos == SOURCE_POSITIVES
  sc = np.asarray(prepared.inter["scenario"])
  label = np.asarray(prepared.inter["label"])
  assert np.bincount(sc, minlength=3).tolist() == SOURCE_ROWS
  assert np.bincount(sc, weights=label, minlength=3).astype(int).tolist() == SOURCE_POSITIVES
  by_split = man["positives_by_split_scenario"]
  assert [sum(x) for x in zip(*by_split.values())] == SOURCE_POSITIVES
  # entity tables are every rated user / movie, sorted by raw id
  np.testing.assert_array_equal(prepared.user_raw_ids.astype(int), sorted(distinct_users))
  np.testing.assert_array_equal(prepared.item_raw_ids.astype(int), sorted(distinct_movies))


def test_prepare_rows_labels_and_scenarios_match_raw(prepared, raw):
  users, _, ratings = raw
  u, m = _raw_rows(prepared)
  got = {
    (a, b): (lab, k)
    for a, b, lab, k in zip(
      u.tolist(),
      m.tolist(),
      np.asarray(prepared.inter["label"]).tolist(),
      np.asarray(prepared.inter["scenario"]).tolist(),
    )
  }
  want = {(a, b): (float(r > 3), AGE_SCENARIO[users[a][1]]) for a, b, r in ratings}
  assert len(got) == 100000
  assert got == want
  for c, dt in store.INTERACTION_COLUMNS.items():
    assert prepared.inter[c].dtype == dt


def test_prepare_vocab_sizes_from_train_split(prepared, raw):
  users, movies, _ = raw
  u, m = _raw_rows(prepared)
  train = np.asarray(prepared.inter["split"]) == 0
  tr_users, tr_movies = set(u[train].tolist()), set(m[train].tolist())
  want_u = {
    "user_id": 1 + len(tr_users),
    "gender": 1 + len({users[x][0] for x in tr_users}),
    "age": 1 + len({users[x][1] for x in tr_users}),
    "occupation": 1 + len({users[x][2] for x in tr_users}),
    "zip": 1 + len({users[x][3] for x in tr_users}),
  }
  want_i = {
    "movie_id": 1 + len(tr_movies),
    "genres": 1 + len({g for x in tr_movies for g in movies[x][1]}),
    "year": 1 + len({movies[x][0] for x in tr_movies}),
  }
  assert [s.name for s in prepared.user_specs] == list(want_u)
  assert [s.name for s in prepared.item_specs] == list(want_i)
  assert {s.name: s.vocab_size for s in prepared.user_specs} == want_u
  assert {s.name: s.vocab_size for s in prepared.item_specs} == want_i
  assert want_u["gender"] == 3 and want_u["age"] == 8 and want_i["genres"] == 19
  assert len(tr_users) < 5958 and len(tr_movies) < 3312  # the vocab is not the whole table
  # an entity that never appears in the training split gets the unknown id 0
  user_id = np.asarray(prepared.users["user_id"])
  not_train = ~np.isin(prepared.user_raw_ids.astype(int), list(tr_users))
  assert not_train.any() and (user_id[not_train] == 0).all() and (user_id[~not_train] > 0).all()
  movie_id = np.asarray(prepared.items["movie_id"])
  not_train = ~np.isin(prepared.item_raw_ids.astype(int), list(tr_movies))
  assert not_train.any() and (movie_id[not_train] == 0).all() and (movie_id[~not_train] > 0).all()


def _assert_same_partition(raw_values, ids):
  """Equal raw values <=> equal ids (for values that got a non-zero id)."""
  to_ids = collections.defaultdict(set)
  for v, i in zip(raw_values, ids):
    to_ids[v].add(int(i))
  assert all(len(s) == 1 for s in to_ids.values()), "one raw value mapped to several ids"
  nonzero = [next(iter(s)) for s in to_ids.values() if next(iter(s)) != 0]
  assert len(nonzero) == len(set(nonzero)), "different raw values share an id"


def test_prepare_feature_columns_match_raw(prepared, raw):
  users, movies, _ = raw
  uraw = prepared.user_raw_ids.astype(int)
  for j, f in enumerate(("gender", "age", "occupation", "zip")):
    _assert_same_partition([users[x][j] for x in uraw], np.asarray(prepared.users[f]))
  mraw = prepared.item_raw_ids.astype(int)
  year = np.asarray(prepared.items["year"])
  _assert_same_partition([movies[x][0] for x in mraw], year)
  row = {mid: i for i, mid in enumerate(mraw)}
  # Toy Story (1), Jumanji (2) are 1995; Star Wars (260) is 1977; Matrix (2571) is 1999
  assert movies[1][2].startswith("Toy Story") and movies[260][0] == "1977"
  assert year[row[1]] == year[row[2]] != 0
  assert len({year[row[1]], year[row[260]], year[row[2571]]}) == 3
  # genres: multi-hot [N, max_genres], mask counts the movie's genres, ids consistent
  genres, mask = np.asarray(prepared.items["genres"]), np.asarray(prepared.item_masks["genres"])
  assert genres.shape == mask.shape == (3312, 6) and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(1), [len(movies[x][1]) for x in mraw])
  assert (genres[~mask] == 0).all()
  names = [g for x in mraw for g in movies[x][1]]
  _assert_same_partition(names, genres[mask])  # row-major order matches the genre lists
  assert mask[row[1]].sum() == 3 and mask[row[2571]].sum() == 3  # A|C|C; Action|Sci-Fi|Thriller


def test_prepare_manifest_sources_and_options(prepared, ml_sample_dir):
  src = prepared.manifest["sources"]
  for name in ("users.dat", "movies.dat", "ratings_sample_100k.dat"):
    data = (ml_sample_dir / name).read_bytes()
    assert src[name] == {
      "sha256": hashlib.sha256(data).hexdigest(),
      "bytes": len(data),
      "mtime_ns": (ml_sample_dir / name).stat().st_mtime_ns,
      "path": str((ml_sample_dir / name).resolve()),
    }
  assert prepared.manifest["options"]["split_seed"] == 42
  assert prepared.manifest["scenario_names"] == list(movielens.SCENARIOS)


def test_split_is_fixed_by_seed(prepared, ml_sample_dir, tmp_path):
  base = np.asarray(prepared.inter["split"])
  same = store.open_store(movielens.prepare(_data_cfg(ml_sample_dir), tmp_path / "same"))
  other = store.open_store(
    movielens.prepare(_data_cfg(ml_sample_dir, split_seed=7), tmp_path / "other")
  )
  np.testing.assert_array_equal(np.asarray(same.inter["split"]), base)
  o = np.asarray(other.inter["split"])
  assert np.bincount(o).tolist() == [80000, 10000, 10000]
  assert (o != base).mean() > 0.2  # a different seed gives a genuinely different split
  # rows are in file order in every store; only the split column moves
  np.testing.assert_array_equal(np.asarray(other.inter["user"]), np.asarray(prepared.inter["user"]))


# ----------------------------------------------------------------------------------------------
# Bad inputs in small GroupLens-layout files

USERS = [
  b"1::F::1::10::48067",
  b"2::M::56::16::70072",
  b"3::M::25::15::55117",
  b"4::M::45::7::02460",
  b"5::F::25::20::55455",
]
MOVIES = [
  b"1::Toy Story (1995)::Animation|Children's|Comedy",
  b"2::Jumanji (1995)::Adventure|Children's|Fantasy",
  b"3::Grumpier Old Men (1995)::Comedy|Romance",
  b"4::Caf\xe9 Society (1999)::Drama",
]  # latin-1, not UTF-8
RATINGS = [
  b"%d::%d::%d::9783007%02d" % (u, m, (u + m) % 5 + 1, i)
  for i, (u, m) in enumerate((u, m) for u in range(1, 6) for m in range(1, 5))
]


def _write_raw(d, users=None, movies=None, ratings=None, ratings_name="ratings.dat"):
  d.mkdir(parents=True, exist_ok=True)
  for name, lines in (
    ("users.dat", users if users is not None else USERS),
    ("movies.dat", movies if movies is not None else MOVIES),
    (ratings_name, ratings if ratings is not None else RATINGS),
  ):
    if lines is not None:
      (d / name).write_bytes(b"".join(x + b"\n" for x in lines))
  return d


def _replace(lines, lineno, new):
  out = list(lines)
  out[lineno - 1] = new
  return out


# (case id, file, kwargs for _write_raw, line number, reason, message substrings)
BAD_ROWS = [
  (
    "wrong_field_count",
    "ratings.dat",
    dict(ratings=_replace(RATINGS, 3, b"1::3::4")),
    3,
    "wrong_field_count",
    ["3 '::'-separated fields, expected 4"],
  ),
  (
    "non_numeric_rating",
    "ratings.dat",
    dict(ratings=_replace(RATINGS, 5, b"2::1::x::978300760")),
    5,
    "bad_Rating",
    ["field 'Rating'", "'x'"],
  ),
  (
    "rating_7",
    "ratings.dat",
    dict(ratings=_replace(RATINGS, 7, b"2::3::7::978300760")),
    7,
    "bad_Rating",
    ["field 'Rating'", "7 is not one of"],
  ),
  (
    "unknown_user",
    "ratings.dat",
    dict(ratings=_replace(RATINGS, 2, b"99::1::4::978300760")),
    2,
    "unknown_user",
    ["field 'UserID'", "99 is not in users.dat"],
  ),
  (
    "unknown_movie",
    "ratings.dat",
    dict(ratings=_replace(RATINGS, 4, b"1::99::4::978300760")),
    4,
    "unknown_movie",
    ["field 'MovieID'", "99 is not in movies.dat"],
  ),
  # a sixth user without ratings, so 'skip' drops exactly one row
  (
    "bad_age",
    "users.dat",
    dict(users=USERS + [b"6::F::30::1::12345"]),
    6,
    "bad_Age",
    ["field 'Age'", "30 is not one of"],
  ),
  (
    "bad_gender",
    "users.dat",
    dict(users=USERS + [b"6::X::25::1::12345"]),
    6,
    "bad_Gender",
    ["field 'Gender'"],
  ),
]


def _no_output(tmp_path, out):
  assert not out.exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_small_clean_files_prepare(tmp_path):
  raw_dir = _write_raw(tmp_path / "raw")
  data = store.open_store(movielens.prepare(_data_cfg(raw_dir), tmp_path / "out"))
  assert data.manifest["rows_read"] == {"users.dat": 5, "movies.dat": 4, "ratings.dat": 20}
  assert data.manifest["rows_rejected"] == {}
  assert data.manifest["split_counts"] == {"train": 16, "valid": 2, "test": 2}
  # the latin-1 title parsed: movie 4 has its own year (1999), movies 1-3 share 1995
  y = {int(r): int(v) for r, v in zip(data.item_raw_ids, data.items["year"])}
  assert y[1] == y[2] == y[3] and y[4] != y[1] and y[4] != 0 and y[1] != 0
  np.testing.assert_array_equal(
    np.asarray(data.inter["label"]),
    [float((u + m) % 5 + 1 > 3) for u in range(1, 6) for m in range(1, 5)],
  )
  np.testing.assert_array_equal(np.asarray(data.inter["scenario"]), np.repeat([0, 2, 1, 2, 1], 4))


@pytest.mark.parametrize(
  "case,fname,files,lineno,reason,parts", BAD_ROWS, ids=[c[0] for c in BAD_ROWS]
)
def test_bad_row_strict_raises_with_location(tmp_path, case, fname, files, lineno, reason, parts):
  raw_dir = _write_raw(tmp_path / "raw", **files)
  out = tmp_path / "out"
  with pytest.raises(store.DataError) as e:
    movielens.prepare(_data_cfg(raw_dir, on_error="strict"), out)
  msg = str(e.value)
  assert f"{fname}:{lineno}:" in msg
  for p in parts:
    assert p in msg
  _no_output(tmp_path, out)


@pytest.mark.parametrize(
  "case,fname,files,lineno,reason,parts", BAD_ROWS, ids=[c[0] for c in BAD_ROWS]
)
def test_bad_row_skip_counts_and_drops(tmp_path, case, fname, files, lineno, reason, parts):
  raw_dir = _write_raw(tmp_path / "raw", **files)
  data = store.open_store(movielens.prepare(_data_cfg(raw_dir, on_error="skip"), tmp_path / "o"))
  man = data.manifest
  assert man["rows_rejected"] == {fname: {reason: 1}}
  n_ratings = 19 if fname == "ratings.dat" else 20
  assert man["rows_kept"]["ratings"] == n_ratings == data.manifest["num_interactions"]
  assert man["rows_kept"]["users"] == 5
  if fname == "ratings.dat":
    # the dropped row's (user, movie) pair is gone
    bad = RATINGS[lineno - 1].split(b"::")
    pairs = set(
      zip(
        data.user_raw_ids[np.asarray(data.inter["user"])].astype(int).tolist(),
        data.item_raw_ids[np.asarray(data.inter["item"])].astype(int).tolist(),
      )
    )
    assert (int(bad[0]), int(bad[1])) not in pairs and len(pairs) == 19


@pytest.mark.parametrize("policy", ["strict", "skip"])
def test_empty_ratings_file_raises(tmp_path, policy):
  raw_dir = _write_raw(tmp_path / "raw", ratings=[])
  assert (raw_dir / "ratings.dat").read_bytes() == b""
  out = tmp_path / "out"
  with pytest.raises(store.DataError, match=r"ratings\.dat: file is empty"):
    movielens.prepare(_data_cfg(raw_dir, on_error=policy), out)
  _no_output(tmp_path, out)


def test_missing_users_file_raises(tmp_path):
  raw_dir = _write_raw(tmp_path / "raw")
  (raw_dir / "users.dat").unlink()
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError, match=re.escape(str(raw_dir / "users.dat"))):
    movielens.prepare(_data_cfg(raw_dir), out)
  _no_output(tmp_path, out)


def test_missing_ratings_file_raises(tmp_path):
  raw_dir = _write_raw(tmp_path / "raw")
  (raw_dir / "ratings.dat").unlink()
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError) as e:
    movielens.prepare(_data_cfg(raw_dir), out)
  assert str(raw_dir) in str(e.value)
  assert "ratings.dat" in str(e.value) and "ratings_sample_100k.dat" in str(e.value)
  _no_output(tmp_path, out)


def test_all_rows_rejected_raises(tmp_path):
  raw_dir = _write_raw(tmp_path / "raw", ratings=[b"1::1::9::978300760"])
  out = tmp_path / "out"
  with pytest.raises(store.DataError, match=r"ratings\.dat: no valid rating rows"):
    movielens.prepare(_data_cfg(raw_dir, on_error="skip"), out)
  _no_output(tmp_path, out)


# ----------------------------------------------------------------------------------------------
# Store atomicity


def _tiny_store_args(value=1):
  spec = FieldSpec("f", 4)
  return dict(
    scenario_names=["a", "b"],
    user_specs=[spec],
    item_specs=[spec],
    users={"f": np.full(3, value, np.int32)},
    items={"f": np.array([1, 2], np.int32)},
    user_masks={},
    item_masks={},
    inter={
      "user": np.array([0, 1, 2], np.int32),
      "item": np.array([0, 1, 1], np.int32),
      "scenario": np.array([0, 1, 1], np.int32),
      "label": np.array([1, 0, 1], np.float32),
      "split": np.array([0, 0, 2], np.int8),
    },
    user_raw_ids=np.array(["u1", "u2", "u3"]),
    item_raw_ids=np.array(["i1", "i2"]),
    extra_manifest={"note": value},
  )


def _failing_save(monkeypatch, after):
  real = np.save
  calls = {"n": 0}

  def save(*a, **k):
    calls["n"] += 1
    if calls["n"] > after:
      raise OSError("disk full (simulated)")
    return real(*a, **k)

  monkeypatch.setattr(store.np, "save", save)
  return calls


@pytest.mark.parametrize("after", [0, 3, 6])
def test_interrupted_store_write_leaves_nothing(tmp_path, monkeypatch, after):
  path = tmp_path / "parent" / "store"
  calls = _failing_save(monkeypatch, after)
  with pytest.raises(store.DataError, match="simulated"):  # one line naming the file
    store.write_store(path, **_tiny_store_args())
  assert calls["n"] == after + 1
  assert not store.is_complete(path) and not path.exists()
  assert list((tmp_path / "parent").iterdir()) == []  # no leftover temp directory
  with pytest.raises(FileNotFoundError, match="manifest.json missing"):
    store.open_store(path)


def test_interrupted_rewrite_keeps_previous_store(tmp_path, monkeypatch):
  path = tmp_path / "store"
  store.write_store(path, **_tiny_store_args(1))
  _failing_save(monkeypatch, 4)
  with pytest.raises(store.DataError, match="simulated"):
    store.write_store(path, **_tiny_store_args(2))
  monkeypatch.undo()
  assert store.is_complete(path)
  old = store.open_store(path)
  assert old.manifest["note"] == 1 and np.asarray(old.users["f"]).tolist() == [1, 1, 1]
  assert [p.name for p in tmp_path.iterdir()] == ["store"]
  # an uninterrupted rewrite replaces it
  store.write_store(path, **_tiny_store_args(2))
  assert store.open_store(path).manifest["note"] == 2
  assert [p.name for p in tmp_path.iterdir()] == ["store"]


def test_write_store_validates_ids(tmp_path):
  args = _tiny_store_args()
  args["users"] = {"f": np.array([1, 4, 0], np.int32)}  # 4 is outside [0, 4)
  with pytest.raises(store.DataError, match=r"users\.f: ids outside \[0, 4\)"):
    store.write_store(tmp_path / "s", **args)
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Input pipeline


def _row_lookup(data):
  u = np.asarray(data.inter["user"]).astype(np.int64)
  i = np.asarray(data.inter["item"]).astype(np.int64)
  return dict(zip((u * data.num_items + i).tolist(), range(len(u))))


def _rows_of(batch, data, lookup):
  keys = (batch["user_index"].astype(np.int64) * data.num_items + batch["item_index"]).tolist()
  return np.array([lookup[k] for k in keys])


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _assert_batches_equal(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_finetune_batches_are_training_positives(prepared):
  lookup = _row_lookup(prepared)
  split, label = np.asarray(prepared.inter["split"]), np.asarray(prepared.inter["label"])
  sc = np.asarray(prepared.inter["scenario"])
  train_pos = np.flatnonzero((split == 0) & (label == 1))
  counts = np.bincount(
    np.asarray(prepared.inter["item"])[train_pos], minlength=prepared.num_items
  ).astype(np.float64)
  logq = np.log(np.maximum(counts, 1) / np.maximum(counts, 1).sum())
  it = pipeline.make_iterator(prepared, "finetune", 256, seed=0, num_batches=4)
  n = 0
  for batch in it:
    rows = _rows_of(batch, prepared, lookup)
    assert (split[rows] == 0).all() and (label[rows] == 1).all()
    np.testing.assert_array_equal(batch["scenario"], sc[rows])
    np.testing.assert_allclose(batch["item_logq"], logq[batch["item_index"]], rtol=1e-5)
    users = np.asarray(prepared.users["user_id"])
    np.testing.assert_array_equal(batch["user"]["user_id"], users[batch["user_index"]])
    np.testing.assert_array_equal(
      batch["item"]["genres_mask"], np.asarray(prepared.item_masks["genres"])[batch["item_index"]]
    )
    assert batch["user"]["user_id"].dtype == np.int32 and batch["scenario"].dtype == np.int32
    n += 1
  assert n == 4


def test_pretrain_batches_views_and_entire_space(prepared):
  lookup = _row_lookup(prepared)
  split, label = np.asarray(prepared.inter["split"]), np.asarray(prepared.inter["label"])
  labels = []
  for batch in pipeline.make_iterator(prepared, "pretrain", 256, seed=1, num_batches=3):
    rows = _rows_of(batch, prepared, lookup)
    assert (split[rows] == 0).all()
    labels.append(label[rows])
    for key in ("user_views", "item_views"):
      v = batch[key]
      assert v.shape == (256, 2) and v.dtype == np.int32
      assert ((v >= 0) & (v < 3)).all() and (v[:, 0] != v[:, 1]).all()
      assert len({tuple(x) for x in v.tolist()}) == 6  # all ordered pairs occur
  labels = np.concatenate(labels)
  assert (labels == 0).any() and (labels == 1).any()  # clicked and unclicked exposures


@pytest.mark.parametrize("stream", ["finetune", "pretrain"])
def test_restored_iterator_yields_same_next_batch(prepared, stream):
  it = pipeline.make_iterator(prepared, stream, 64, seed=3, num_batches=10)
  first = next(it)
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = pipeline.make_iterator(prepared, stream, 64, seed=3, num_batches=10)
  resumed.set_state(state)
  _assert_batches_equal(next(resumed), expected)
  assert not np.array_equal(first["item_index"], expected["item_index"])


@pytest.mark.parametrize("stream", ["finetune", "pretrain"])
def test_process_shards_partition_the_global_batch(prepared, stream):
  keys = ("user_index", "item_index", "scenario") + (("item_logq",) if stream == "finetune" else ())
  full = pipeline.BatchFn(prepared, stream, 64, seed=5)
  p0 = pipeline.BatchFn(prepared, stream, 64, seed=5, process_index=0, process_count=2)
  p1 = pipeline.BatchFn(prepared, stream, 64, seed=5, process_index=1, process_count=2)
  for i in (0, 7):
    f, a, b = full(i), p0(i), p1(i)
    for k in keys:
      assert len(a[k]) == len(b[k]) == 32
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k], err_msg=k)
    for table in ("user", "item"):
      for k in f[table]:
        np.testing.assert_array_equal(np.concatenate([a[table][k], b[table][k]]), f[table][k])
    ra = set(zip(a["user_index"].tolist(), a["item_index"].tolist()))
    rb = set(zip(b["user_index"].tolist(), b["item_index"].tolist()))
    assert not ra & rb


def test_pretrain_views_do_not_depend_on_process_count(prepared):
  full = pipeline.BatchFn(prepared, "pretrain", 64, seed=5)(2)
  a = pipeline.BatchFn(prepared, "pretrain", 64, seed=5, process_index=0, process_count=2)(2)
  b = pipeline.BatchFn(prepared, "pretrain", 64, seed=5, process_index=1, process_count=2)(2)
  for k in ("user_views", "item_views"):
    np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), full[k], err_msg=k)


def test_epoch_covers_every_row_once(prepared):
  """Nothing is dropped at an epoch boundary: the first n positions are a permutation."""
  lookup = _row_lookup(prepared)
  fn = pipeline.BatchFn(prepared, "pretrain", 8192, seed=2)
  rows = np.concatenate([_rows_of(fn(i), prepared, lookup) for i in range(10)])
  n = 80000
  np.testing.assert_array_equal(np.sort(rows[:n]), prepared.rows("train"))
  assert set(rows[n:].tolist()) <= set(prepared.rows("train").tolist())
  assert not np.array_equal(rows[n : 2 * n][:100], rows[:100])  # next epoch reshuffled
