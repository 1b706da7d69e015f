"""Tests for the Douban, Amazon (CDRIB) and MIND loaders (docs/design.md §4).

The real samples are read from ``<repo>/../shared/data/<folder>`` (licensed, never copied into
the repository) and every count is checked against an independent plain-Python parse of the raw
files, plus the literals their SOURCE.md states. Bad-input cases use small files in tmp_path in
each source's layout.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from configs import movielens as ml_config
from sass_jax.data import amazon, douban, get_preparer, mind, store
from sass_jax.train import loop

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GADTCDR_DIR = SHARED / "douban_gadtcdr_book_music"
SAMPLE_DIR = SHARED / "douban_sample"
AMAZON_DIR = SHARED / "amazon_cdrib_pairs"
MIND_DIR = SHARED / "mind_multidomain_sample"


def _cfg(module: str, data_dir, **kw):
  c = importlib.import_module(f"configs.{module}").get_config().data
  c.dir = str(data_dir)
  for k, v in kw.items():
    c[k] = v
  return c


def _open(fn, cfg, out):
  return store.open_store(fn(cfg, out))


def _inter(data):
  return {c: np.asarray(v) for c, v in data.inter.items()}


def _check_rows(data, rows, scenario_names):
  """rows: per source row in file order (user raw id, item raw id, scenario name, label).

  Checks the store row by row, then the entity tables and per-scenario counts.
  """
  inter = _inter(data)
  assert data.manifest["num_interactions"] == len(rows) == len(inter["user"])
  assert data.scenario_names == list(scenario_names)
  assert data.user_raw_ids[inter["user"]].tolist() == [r[0] for r in rows]
  assert data.item_raw_ids[inter["item"]].tolist() == [r[1] for r in rows]
  k_of = {s: k for k, s in enumerate(scenario_names)}
  assert inter["scenario"].tolist() == [k_of[r[2]] for r in rows]
  assert inter["label"].tolist() == [float(r[3]) for r in rows]
  assert sorted(data.user_raw_ids.tolist()) == sorted({r[0] for r in rows})
  assert sorted(data.item_raw_ids.tolist()) == sorted({r[1] for r in rows})
  assert data.num_users == len({r[0] for r in rows})
  assert data.num_items == len({r[1] for r in rows})
  for c, dt in store.INTERACTION_COLUMNS.items():
    assert inter[c].dtype == dt


def _check_vocab(data, table, field, entity_value, train_rows, missing=None):
  """Field ``field`` of ``table`` ('users' | 'items'): its vocabulary is the set of values of the
  training rows' entities, id 0 for the others; equal values share an id, different ones don't.

  entity_value: raw entity id -> raw field value; train_rows: raw entity ids of training rows.
  """
  raw_ids = (data.user_raw_ids if table == "users" else data.item_raw_ids).tolist()
  ids = np.asarray((data.users if table == "users" else data.items)[field]).tolist()
  specs = data.user_specs if table == "users" else data.item_specs
  seen = {entity_value[e] for e in train_rows} - {missing}
  assert {s.name: s.vocab_size for s in specs}[field] == len(seen) + 1
  to_id = {}
  for e, i in zip(raw_ids, ids):
    v = entity_value[e]
    assert (i != 0) == (v in seen), (field, e, v, i)
    if i:
      assert to_id.setdefault(v, i) == i
  assert len(set(to_id.values())) == len(to_id)
  return len(seen) + 1


def _check_random_split(data, cfg, fn, tmp_path):
  n = data.manifest["num_interactions"]
  n_tr, n_va = int(round(0.8 * n)), int(round(0.1 * n))
  assert data.manifest["split_counts"] == {"train": n_tr, "valid": n_va, "test": n - n_tr - n_va}
  split = _inter(data)["split"]
  same = _inter(_open(fn, cfg, tmp_path / "same"))["split"]
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.split_seed = 7
  other = _inter(_open(fn, cfg, tmp_path / "other"))["split"]
  np.testing.assert_array_equal(same, split)
  assert (other != split).mean() > 0.2


def _check_sources(data, data_dir, names):
  src = data.manifest["sources"]
  assert set(src) == set(names)
  for name in names:
    b = (data_dir / name).read_bytes()
    assert src[name] == {
      "sha256": hashlib.sha256(b).hexdigest(),
      "bytes": len(b),
      "mtime_ns": (data_dir / name).stat().st_mtime_ns,
      "path": str((data_dir / name).resolve()),
    }


# ----------------------------------------------------------------------------------------------
# Douban, GA-DTCDR release (book + music)


@pytest.fixture(scope="module")
def gadtcdr_raw():
  rows = []  # (domain, user, item, rating) in file order, book then music
  for dom in ("book", "music"):
    with open(GADTCDR_DIR / f"douban_{dom}_ratings.dat", newline="") as f:
      for rec in csv.reader(f, delimiter="\t"):
        assert len(rec) == 3
        rows.append((dom, int(rec[0]), int(rec[1]), int(rec[2])))
  return rows


@pytest.fixture(scope="module")
def gadtcdr(tmp_path_factory):
  return _open(
    douban.prepare_gadtcdr,
    _cfg("douban", GADTCDR_DIR),
    tmp_path_factory.mktemp("gadtcdr") / "store",
  )


def test_gadtcdr_counts_match_source_and_raw(gadtcdr, gadtcdr_raw):
  raw = gadtcdr_raw
  by_dom = {d: [r for r in raw if r[0] == d] for d in ("book", "music")}
  # SOURCE.md literals
  assert [len(by_dom[d]) for d in by_dom] == [96_041, 69_709]
  assert [sum(r[3] >= 4 for r in by_dom[d]) for d in by_dom] == [69_211, 51_985]
  assert [len({r[1] for r in by_dom[d]}) for d in by_dom] == [2_110, 1_672]
  assert [len({r[2] for r in by_dom[d]}) for d in by_dom] == [6_777, 5_567]
  assert len({r[1] for r in by_dom["book"]} & {r[1] for r in by_dom["music"]}) == 1_566
  assert max(r[1] for r in raw) == 2_718
  users, items = {r[1] for r in raw}, {(r[0], r[2]) for r in raw}
  assert len(users) == 2_216 and len(items) == 12_344  # 2,718 is the id range, not a count
  man = gadtcdr.manifest
  assert man["rows_read"] == {"douban_book_ratings.dat": 96_041, "douban_music_ratings.dat": 69_709}
  assert man["rows_rejected"] == {}
  assert man["rows_kept"] == {
    "ratings": 165_750,
    "users": len(users),
    "items": len(items),
    "ratings_book": 96_041,
    "ratings_music": 69_709,
  }
  rows = [(str(u), f"{d}:{i}", d, r >= 4) for d, u, i, r in raw]
  _check_rows(gadtcdr, rows, ["book", "music"])
  inter = _inter(gadtcdr)
  assert np.bincount(inter["scenario"]).tolist() == [96_041, 69_709]
  assert np.bincount(inter["scenario"], weights=inter["label"]).astype(int).tolist() == [
    69_211,
    51_985,
  ]
  assert [sum(x) for x in zip(*man["positives_by_split_scenario"].values())] == [69_211, 51_985]
  # a book item and a music item with the same number are different items
  assert "book:1" in gadtcdr.item_raw_ids.tolist() and "music:1" in gadtcdr.item_raw_ids.tolist()
  _check_sources(gadtcdr, GADTCDR_DIR, ["douban_book_ratings.dat", "douban_music_ratings.dat"])


def test_gadtcdr_vocab_and_split(gadtcdr, gadtcdr_raw, tmp_path):
  train = _inter(gadtcdr)["split"] == 0
  rows = [(str(u), f"{d}:{i}", d) for d, u, i, _ in gadtcdr_raw]
  tr = [r for r, t in zip(rows, train) if t]
  assert [s.name for s in gadtcdr.user_specs] == ["user_id"]
  assert [s.name for s in gadtcdr.item_specs] == ["item_id", "domain"]
  users = {r[0]: r[0] for r in rows}
  items = {r[1]: r[1] for r in rows}
  item_dom = {r[1]: r[2] for r in rows}
  vu = _check_vocab(gadtcdr, "users", "user_id", users, [r[0] for r in tr])
  vi = _check_vocab(gadtcdr, "items", "item_id", items, [r[1] for r in tr])
  assert _check_vocab(gadtcdr, "items", "domain", item_dom, [r[1] for r in tr]) == 3
  assert vu < 2_216 + 1  # built from the training split only (users seen only in
  assert vi <= 12_344 + 1  # valid / test get 0)
  _check_random_split(gadtcdr, _cfg("douban", GADTCDR_DIR), douban.prepare_gadtcdr, tmp_path)


# ----------------------------------------------------------------------------------------------
# Douban, Scenario-Wise Rec sample (book / movie / music)


@pytest.fixture(scope="module")
def sample_raw():
  with open(SAMPLE_DIR / "douban_sample.csv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
  return _open(
    douban.prepare_sample,
    _cfg("douban_sample", SAMPLE_DIR),
    tmp_path_factory.mktemp("dsample") / "store",
  )


def test_douban_sample_counts_match_source_and_raw(sample, sample_raw):
  raw = sample_raw
  assert len(raw) == 3_000
  assert len({r["user_id"] for r in raw}) == 1_352 and len({r["item_id"] for r in raw}) == 2_502
  dom = collections.Counter(r["domain"] for r in raw)
  assert dom == {"movie": 2_299, "book": 364, "music": 337}
  assert collections.Counter(r["rating"] for r in raw) == {"1": 1_936, "0": 1_064}
  man = sample.manifest
  assert man["rows_read"] == {"douban_sample.csv": 3_000} and man["rows_rejected"] == {}
  assert man["rows_kept"] == {"rows": 3_000, "users": 1_352, "items": 2_502}
  rows = [
    (r["user_id"], f"{r['domain']}:{r['item_id']}", r["domain"], r["rating"] == "1") for r in raw
  ]
  _check_rows(sample, rows, ["book", "movie", "music"])
  inter = _inter(sample)
  names = ["book", "movie", "music"]
  assert np.bincount(inter["scenario"]).tolist() == [dom[n] for n in names]
  pos = collections.Counter(r["domain"] for r in raw if r["rating"] == "1")
  assert np.bincount(inter["scenario"], weights=inter["label"]).astype(int).tolist() == [
    pos[n] for n in names
  ]
  _check_sources(sample, SAMPLE_DIR, ["douban_sample.csv"])


def test_douban_sample_vocab_and_split(sample, sample_raw, tmp_path):
  train = _inter(sample)["split"] == 0
  tr = [r for r, t in zip(sample_raw, train) if t]
  assert [s.name for s in sample.user_specs] == ["user_id", "living_place", "time_bin"]
  assert [s.name for s in sample.item_specs] == ["item_id", "domain"]
  ident_u = {r["user_id"]: r["user_id"] for r in sample_raw}
  place = {r["user_id"]: r["living_place"] for r in sample_raw}
  tbin = {r["user_id"]: int(r["time_bin"]) for r in sample_raw}
  ikey = lambda r: f"{r['domain']}:{r['item_id']}"  # noqa: E731
  ident_i = {ikey(r): ikey(r) for r in sample_raw}
  idom = {ikey(r): r["domain"] for r in sample_raw}
  tr_u, tr_i = [r["user_id"] for r in tr], [ikey(r) for r in tr]
  _check_vocab(sample, "users", "user_id", ident_u, tr_u)
  v_place = _check_vocab(sample, "users", "living_place", place, tr_u, missing="")
  _check_vocab(sample, "users", "time_bin", tbin, tr_u)
  _check_vocab(sample, "items", "item_id", ident_i, tr_i)
  assert _check_vocab(sample, "items", "domain", idom, tr_i) == 4
  assert "" in place.values() and v_place <= 220  # 220 values incl. the empty one (unknown)
  _check_random_split(sample, _cfg("douban_sample", SAMPLE_DIR), douban.prepare_sample, tmp_path)


# ----------------------------------------------------------------------------------------------
# Amazon, CDRIB pairs

AMAZON_SOURCE = {  # SOURCE.md table: folder -> (train, valid, test, users, items)
  "sport_cloth": (163_291, 3_589, 3_546, 27_328, 12_655),
  "cloth_sport": (187_880, 3_156, 3_085, 41_829, 17_943),
  "game_video": (155_036, 1_381, 1_304, 25_025, 12_319),
  "video_game": (156_091, 1_435, 1_458, 19_457, 8_751),
}
AMAZON_PAIRS = {
  "sport_cloth": (("sport_cloth", "sports"), ("cloth_sport", "clothing"), 9_828),
  "game_video": (("game_video", "game"), ("video_game", "video"), 2_179),
}


def _amazon_raw(folder):
  out = {}
  for s in ("train", "valid", "test"):
    with open(AMAZON_DIR / folder / f"{s}.txt", newline="") as f:
      out[s] = [(int(a), int(b)) for a, b in csv.reader(f, delimiter="\t")]
  return out


@pytest.fixture(scope="module", params=list(AMAZON_PAIRS))
def amazon_pair(request, tmp_path_factory):
  pair = request.param
  (f0, n0), (f1, n1), c = AMAZON_PAIRS[pair]
  data = _open(
    amazon.prepare,
    _cfg("amazon_sports_clothing", AMAZON_DIR, pair=pair),
    tmp_path_factory.mktemp(pair) / "store",
  )
  return pair, data, {f0: _amazon_raw(f0), f1: _amazon_raw(f1)}


def test_amazon_counts_match_source_and_raw(amazon_pair):
  pair, data, raw = amazon_pair
  (f0, n0), (f1, n1), c = AMAZON_PAIRS[pair]
  for f in (f0, f1):
    tr, va, te, nu, ni = AMAZON_SOURCE[f]
    assert [len(raw[f][s]) for s in ("train", "valid", "test")] == [tr, va, te]
    every = [x for s in raw[f].values() for x in s]
    assert len({u for u, _ in every}) == nu and len({i for _, i in every}) == ni
    assert {u for u, _ in every if u < c} == set(range(c))  # the shared users are in both
  rows, split = [], []
  for folder, name in ((f0, n0), (f1, n1)):
    for s, sid in (("train", 0), ("valid", 1), ("test", 2)):
      for u, i in raw[folder][s]:
        rows.append((str(u) if u < c else f"{name}:{u}", f"{name}:{i}", name, 1))
        split.append(sid)
  _check_rows(data, rows, [n0, n1])
  inter = _inter(data)
  assert inter["split"].tolist() == split  # the authors' split, kept
  n_rows = [sum(AMAZON_SOURCE[f][:3]) for f in (f0, f1)]
  assert np.bincount(inter["scenario"]).tolist() == n_rows
  assert (inter["label"] == 1).all()
  users = {r[0] for r in rows}
  assert len(users) == AMAZON_SOURCE[f0][3] + AMAZON_SOURCE[f1][3] - c
  assert data.num_items == AMAZON_SOURCE[f0][4] + AMAZON_SOURCE[f1][4]
  man = data.manifest
  assert man["rows_rejected"] == {}
  assert man["rows_read"] == {
    f"{f}/{s}.txt": len(raw[f][s]) for f in (f0, f1) for s in ("train", "valid", "test")
  }
  assert man["rows_kept"]["shared_users_seen"] == c
  assert man["split_counts"] == {
    s: sum(len(raw[f][s]) for f in (f0, f1)) for s in ("train", "valid", "test")
  }
  assert [sum(x) for x in zip(*man["positives_by_split_scenario"].values())] == n_rows
  _check_sources(
    data, AMAZON_DIR, [f"{f}/{s}.txt" for f in (f0, f1) for s in ("train", "valid", "test")]
  )
  # cold-start: every valid / test user of a domain has a training row in the other domain only
  for d in (0, 1):
    held = set(inter["user"][(inter["split"] > 0) & (inter["scenario"] == d)].tolist())
    tr_same = set(inter["user"][(inter["split"] == 0) & (inter["scenario"] == d)].tolist())
    tr_other = set(inter["user"][(inter["split"] == 0) & (inter["scenario"] == 1 - d)].tolist())
    assert held and not held & tr_same and held <= tr_other


def test_amazon_vocab(amazon_pair):
  pair, data, raw = amazon_pair
  (f0, n0), (f1, n1), c = AMAZON_PAIRS[pair]
  assert [s.name for s in data.user_specs] == ["user_id"]
  assert [s.name for s in data.item_specs] == ["item_id", "domain"]
  tr_u, tr_i, ents_u, ents_i, idom = [], [], {}, {}, {}
  for folder, name in ((f0, n0), (f1, n1)):
    for s in ("train", "valid", "test"):
      for u, i in raw[folder][s]:
        ku, ki = (str(u) if u < c else f"{name}:{u}"), f"{name}:{i}"
        ents_u[ku], ents_i[ki], idom[ki] = ku, ki, name
        if s == "train":
          tr_u.append(ku), tr_i.append(ki)
  _check_vocab(data, "users", "user_id", ents_u, tr_u)
  _check_vocab(data, "items", "item_id", ents_i, tr_i)
  assert _check_vocab(data, "items", "domain", idom, tr_i) == 3


def test_amazon_swapped_pair_and_speed(tmp_path):
  t = time.time()
  data = _open(
    amazon.prepare, _cfg("amazon_sports_clothing", AMAZON_DIR, pair="cloth_sport"), tmp_path / "s"
  )
  assert time.time() - t < 15, "364k rows should prepare in a few seconds"
  assert data.scenario_names == ["clothing", "sports"]
  assert np.bincount(_inter(data)["scenario"]).tolist() == [194_121, 170_426]


def test_amazon_unknown_pair_raises(tmp_path):
  with pytest.raises(ValueError, match="config.data.pair='books_movies'"):
    amazon.prepare(_cfg("amazon_sports_clothing", AMAZON_DIR, pair="books_movies"), tmp_path / "o")
  assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# MIND multi-domain sample

MIND_SCENARIOS = ["news", "lifestyle", "sports", "finance"]


@pytest.fixture(scope="module")
def mind_raw():
  with open(MIND_DIR / "mind_sample.csv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def mind_data(tmp_path_factory):
  return _open(mind.prepare, _cfg("mind", MIND_DIR), tmp_path_factory.mktemp("mind") / "store")


def test_mind_counts_match_source_and_raw(mind_data, mind_raw):
  raw = mind_raw
  assert len(raw) == 8_000
  assert len({r["User_ID"] for r in raw}) == 7_892 and len({r["News_ID"] for r in raw}) == 1_921
  assert len({r["SubCategory"] for r in raw}) == 88
  assert sum(r["label"] == "1" for r in raw) == 363
  rows_by = collections.Counter(r["Category"] for r in raw)
  pos_by = collections.Counter(r["Category"] for r in raw if r["label"] == "1")
  assert [rows_by[c] for c in MIND_SCENARIOS] == [3_742, 1_565, 1_428, 1_265]
  assert [pos_by[c] for c in MIND_SCENARIOS] == [163, 60, 84, 56]
  man = mind_data.manifest
  assert man["rows_read"] == {"mind_sample.csv": 8_000} and man["rows_rejected"] == {}
  assert man["rows_kept"] == {"rows": 8_000, "users": 7_892, "items": 1_921}
  rows = [(r["User_ID"], r["News_ID"], r["Category"], r["label"] == "1") for r in raw]
  _check_rows(mind_data, rows, MIND_SCENARIOS)
  inter = _inter(mind_data)
  assert np.bincount(inter["scenario"]).tolist() == [3_742, 1_565, 1_428, 1_265]
  assert np.bincount(inter["scenario"], weights=inter["label"]).astype(int).tolist() == [
    163,
    60,
    84,
    56,
  ]
  _check_sources(mind_data, MIND_DIR, ["mind_sample.csv"])


def test_mind_vocab_and_split(mind_data, mind_raw, tmp_path):
  train = _inter(mind_data)["split"] == 0
  tr = [r for r, t in zip(mind_raw, train) if t]
  assert [s.name for s in mind_data.user_specs] == ["user_id"]
  assert [s.name for s in mind_data.item_specs] == ["news_id", "subcategory"]
  ident_u = {r["User_ID"]: r["User_ID"] for r in mind_raw}
  ident_i = {r["News_ID"]: r["News_ID"] for r in mind_raw}
  sub = {r["News_ID"]: r["SubCategory"] for r in mind_raw}
  _check_vocab(mind_data, "users", "user_id", ident_u, [r["User_ID"] for r in tr])
  _check_vocab(mind_data, "items", "news_id", ident_i, [r["News_ID"] for r in tr])
  assert _check_vocab(mind_data, "items", "subcategory", sub, [r["News_ID"] for r in tr]) <= 89
  _check_random_split(mind_data, _cfg("mind", MIND_DIR), mind.prepare, tmp_path)


# ----------------------------------------------------------------------------------------------
# Bad inputs in small files of each layout

GAD_BOOK = [
  "1\t1\t4",
  "1\t2\t3",
  "2\t1\t5",
  "2\t3\t2",
  "3\t2\t4",
  "3\t3\t1",
  "4\t1\t5",
  "4\t2\t4",
  "5\t3\t3",
  "5\t1\t5",
]
GAD_MUSIC = ["1\t1\t5", "2\t2\t4", "6\t1\t3", "6\t2\t5", "7\t1\t4", "7\t3\t2"]
AMZ = {
  "sport_cloth/train.txt": ["0\t0", "0\t1", "1\t1", "1\t2", "9828\t0", "9829\t2", "2\t0"],
  "sport_cloth/valid.txt": ["3\t0", "3\t2"],
  "sport_cloth/test.txt": ["4\t1"],
  "cloth_sport/train.txt": ["0\t5", "3\t5", "4\t6", "9828\t6", "9830\t5"],
  "cloth_sport/valid.txt": ["1\t6"],
  "cloth_sport/test.txt": ["2\t5", "2\t6"],
}
SAMPLE_HEADER = "user_id,item_id,rating,domain,living_place,join_time,time_bin"
SAMPLE = [
  "1691,34964,1,book,北京,2007-07-10,27",
  "2133,96073,1,movie,浙江杭州,2008-01-03,33",
  "2328,98464,0,movie,香港,2009-05-04,49",
  "1691,131210,1,music,北京,2007-07-10,27",
  '507,106008,1,movie,"山东,青岛",2008-12-25,44',
  "1913,96067,0,movie,,2010-10-03,66",
  "2133,75,1,book,浙江杭州,2008-01-03,33",
  '507,95875,0,movie,"山东,青岛",2008-12-25,44',
]
MIND_HEADER = "User_ID,News_ID,label,Category,SubCategory"
MIND_ROWS = [
  "U479610,N110473,0,sports,football_ncaa",
  "U496095,N73137,1,lifestyle,shop-holidays",
  "U614467,N18258,0,news,newsworld",
  "U498742,N40625,0,sports,football_nfl",
  "U1,N18258,1,news,newsworld",
  "U2,N5,0,finance,markets",
  "U3,N6,1,finance,markets",
  "U479610,N5,0,finance,markets",
]


def _lines(text_lines):
  return "".join(x + "\n" for x in text_lines)


# loader -> (prepare function, config module, {relative path: lines}, header line or None)
LOADERS = {
  "gadtcdr": (
    douban.prepare_gadtcdr,
    "douban",
    {"douban_book_ratings.dat": GAD_BOOK, "douban_music_ratings.dat": GAD_MUSIC},
    None,
  ),
  "amazon": (amazon.prepare, "amazon_sports_clothing", AMZ, None),
  "douban_sample": (
    douban.prepare_sample,
    "douban_sample",
    {"douban_sample.csv": SAMPLE},
    SAMPLE_HEADER,
  ),
  "mind": (mind.prepare, "mind", {"mind_sample.csv": MIND_ROWS}, MIND_HEADER),
}


def _write(d: Path, loader: str, replace: dict | None = None) -> Path:
  """Write the loader's small clean files into d; ``replace``: {relpath: new data lines}."""
  _, _, files, header = LOADERS[loader]
  files = {**files, **(replace or {})}
  for rel, lines in files.items():
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text((header + "\n" if header else "") + _lines(lines), encoding="utf-8")
  return d


def _insert(loader, rel, pos, line):
  """{rel: data lines with ``line`` inserted as data line ``pos`` (1-based)}."""
  lines = list(LOADERS[loader][2][rel])
  lines.insert(pos - 1, line)
  return {rel: lines}


def _no_output(tmp_path, out):
  assert not out.exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


# (case id, loader, relpath, data line position, bad line, reason, message substrings)
BAD_ROWS = [
  (
    "gad_field_count",
    "gadtcdr",
    "douban_book_ratings.dat",
    3,
    "1\t5",
    "wrong_field_count",
    ["2 tab-separated fields, expected 3"],
  ),
  (
    "gad_non_numeric_user",
    "gadtcdr",
    "douban_music_ratings.dat",
    2,
    "x7\t5\t4",
    "bad_user_id",
    ["field 'user_id'", "'x7'"],
  ),
  (
    "gad_non_numeric_item",
    "gadtcdr",
    "douban_book_ratings.dat",
    5,
    "7\t1.5\t4",
    "bad_item_id",
    ["field 'item_id'", "'1.5'"],
  ),
  (
    "gad_rating_9",
    "gadtcdr",
    "douban_book_ratings.dat",
    4,
    "8\t1\t9",
    "bad_rating",
    ["field 'rating'", "9 is not one of 1..5"],
  ),
  (
    "gad_duplicate",
    "gadtcdr",
    "douban_book_ratings.dat",
    4,
    "1\t1\t2",
    "duplicate_pair",
    ["(1, 1) repeats an earlier line (line 1)"],
  ),
  (
    "amz_field_count",
    "amazon",
    "sport_cloth/train.txt",
    3,
    "5\t1\t1",
    "wrong_field_count",
    ["3 tab-separated fields, expected 2"],
  ),
  (
    "amz_non_numeric_item",
    "amazon",
    "cloth_sport/valid.txt",
    1,
    "5\tB00X",
    "bad_item_id",
    ["field 'item_id'", "'B00X'"],
  ),
  (
    "amz_negative_user",
    "amazon",
    "sport_cloth/test.txt",
    2,
    "-3\t1",
    "bad_user_id",
    ["field 'user_id'", "'-3'"],
  ),
  (
    "amz_too_large_id",
    "amazon",
    "cloth_sport/train.txt",
    2,
    "5\t99999999999",
    "bad_item_id",
    ["field 'item_id'", "99999999999 exceeds"],
  ),
  (
    "amz_duplicate_across_splits",
    "amazon",
    "sport_cloth/test.txt",
    1,
    "0\t1",
    "duplicate_pair",
    ["(0, 1) repeats an earlier line of sport_cloth (train.txt:2)"],
  ),
  (
    "sample_field_count",
    "douban_sample",
    "douban_sample.csv",
    2,
    "5,6,1,book,北京,2007-07-10",
    "wrong_field_count",
    ["6 comma-separated fields, expected 7"],
  ),
  (
    "sample_non_numeric_user",
    "douban_sample",
    "douban_sample.csv",
    3,
    "u5,6,1,book,北京,2007-07-10,27",
    "bad_user_id",
    ["field 'user_id'", "'u5'"],
  ),
  (
    "sample_unknown_domain",
    "douban_sample",
    "douban_sample.csv",
    4,
    "5,6,1,tv,北京,2007-07-10,27",
    "unknown_domain",
    ["field 'domain'", "'tv' is not one of"],
  ),
  (
    "sample_rating_5",
    "douban_sample",
    "douban_sample.csv",
    1,
    "5,6,5,book,北京,2007-07-10,27",
    "bad_rating",
    ["field 'rating'", "'5'"],
  ),
  (
    "sample_inconsistent_user",
    "douban_sample",
    "douban_sample.csv",
    5,
    "1691,6,1,book,上海,2007-07-10,27",
    "inconsistent_user",
    ["user 1691"],
  ),
  (
    "mind_field_count",
    "mind",
    "mind_sample.csv",
    2,
    "U5,N5,0,finance",
    "wrong_field_count",
    ["4 comma-separated fields, expected 5"],
  ),
  (
    "mind_non_numeric_user",
    "mind",
    "mind_sample.csv",
    3,
    "Uabc,N5,0,finance,markets",
    "bad_User_ID",
    ["field 'User_ID'", "'Uabc'"],
  ),
  (
    "mind_non_numeric_news",
    "mind",
    "mind_sample.csv",
    3,
    "U5,12,0,finance,markets",
    "bad_News_ID",
    ["field 'News_ID'", "'12'"],
  ),
  (
    "mind_unknown_category",
    "mind",
    "mind_sample.csv",
    6,
    "U5,N7,0,weather,storms",
    "unknown_Category",
    ["field 'Category'", "'weather' is not one of"],
  ),
  (
    "mind_bad_label",
    "mind",
    "mind_sample.csv",
    1,
    "U5,N5,2,finance,markets",
    "bad_label",
    ["field 'label'", "'2'"],
  ),
  (
    "mind_inconsistent_news",
    "mind",
    "mind_sample.csv",
    9,
    "U9,N5,0,finance,stocks",
    "inconsistent_News_ID",
    ["news N5"],
  ),
]


def _file_lineno(loader, pos):
  return pos + (1 if LOADERS[loader][3] else 0)  # the CSV header is line 1


@pytest.mark.parametrize(
  "case,loader,rel,pos,line,reason,parts", BAD_ROWS, ids=[c[0] for c in BAD_ROWS]
)
def test_bad_row_strict_raises_with_location(tmp_path, case, loader, rel, pos, line, reason, parts):
  fn, cfg_mod, _, _ = LOADERS[loader]
  d = _write(tmp_path / "raw", loader, _insert(loader, rel, pos, line))
  out = tmp_path / "out"
  with pytest.raises(store.DataError) as e:
    fn(_cfg(cfg_mod, d, on_error="strict"), out)
  msg = str(e.value)
  assert f"{Path(rel).name}:{_file_lineno(loader, pos)}:" in msg, msg
  assert str(d / rel) in msg
  for p in parts:
    assert p in msg, msg
  _no_output(tmp_path, out)


@pytest.mark.parametrize(
  "case,loader,rel,pos,line,reason,parts", BAD_ROWS, ids=[c[0] for c in BAD_ROWS]
)
def test_bad_row_skip_counts_and_drops(tmp_path, case, loader, rel, pos, line, reason, parts):
  fn, cfg_mod, files, _ = LOADERS[loader]
  clean = _open(fn, _cfg(cfg_mod, _write(tmp_path / "clean", loader)), tmp_path / "c")
  d = _write(tmp_path / "raw", loader, _insert(loader, rel, pos, line))
  data = _open(fn, _cfg(cfg_mod, d, on_error="skip"), tmp_path / "o")
  man = data.manifest
  assert man["rows_rejected"] == {rel: {reason: 1}}
  assert man["rows_read"][rel] == len(files[rel]) + 1
  assert man["rows_read"] == {**clean.manifest["rows_read"], rel: len(files[rel]) + 1}
  assert man["rows_kept"] == clean.manifest["rows_kept"]
  assert man["num_interactions"] == sum(len(v) for v in files.values())
  # the kept rows are exactly the clean files' rows
  for c in ("user", "item", "scenario", "label"):
    np.testing.assert_array_equal(np.asarray(data.inter[c]), np.asarray(clean.inter[c]), err_msg=c)
  np.testing.assert_array_equal(data.user_raw_ids, clean.user_raw_ids)


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("policy", ["strict", "skip"])
def test_empty_file_raises(tmp_path, loader, policy):
  fn, cfg_mod, files, _ = LOADERS[loader]
  rel = list(files)[-1]
  d = _write(tmp_path / "raw", loader)
  (d / rel).write_bytes(b"")
  out = tmp_path / "out"
  with pytest.raises(store.DataError, match=f"{Path(rel).name}: file is empty"):
    fn(_cfg(cfg_mod, d, on_error=policy), out)
  _no_output(tmp_path, out)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_missing_file_raises(tmp_path, loader):
  fn, cfg_mod, files, _ = LOADERS[loader]
  rel = list(files)[-1]
  d = _write(tmp_path / "raw", loader)
  (d / rel).unlink()
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError) as e:
    fn(_cfg(cfg_mod, d), out)
  assert str(d / rel) in str(e.value)
  _no_output(tmp_path, out)


@pytest.mark.parametrize("loader", ["douban_sample", "mind"])
def test_wrong_csv_header_raises(tmp_path, loader):
  fn, cfg_mod, files, header = LOADERS[loader]
  rel = list(files)[0]
  d = _write(tmp_path / "raw", loader)
  (d / rel).write_text(header.replace(",", ";", 1) + "\n" + _lines(files[rel]), encoding="utf-8")
  out = tmp_path / "out"
  with pytest.raises(store.DataError, match=f"{rel}:1: header"):
    fn(_cfg(cfg_mod, d), out)
  _no_output(tmp_path, out)


def test_gadtcdr_unknown_domain_file_raises(tmp_path):
  d = _write(tmp_path / "raw", "gadtcdr")
  with pytest.raises(FileNotFoundError, match="douban_movie_ratings.dat"):
    douban.prepare_gadtcdr(_cfg("douban", d, domains=("book", "movie")), tmp_path / "out")
  _no_output(tmp_path, tmp_path / "out")


def test_gadtcdr_repository_layout_and_crlf(tmp_path):
  """The repo's douban_<d>/ratings.dat layout and CRLF / blank lines (the per-line path) give
  the same store as the flat, clean files (the vectorised path)."""
  flat = _open(
    douban.prepare_gadtcdr, _cfg("douban", _write(tmp_path / "flat", "gadtcdr")), tmp_path / "a"
  )
  repo = tmp_path / "repo"
  for dom, lines in (("book", GAD_BOOK), ("music", GAD_MUSIC)):
    (repo / f"douban_{dom}").mkdir(parents=True)
    (repo / f"douban_{dom}" / "ratings.dat").write_bytes(
      b"\r\n".join(x.encode() for x in lines[:2])
      + b"\r\n\r\n"
      + b"\r\n".join(x.encode() for x in lines[2:])
    )
  other = _open(douban.prepare_gadtcdr, _cfg("douban", repo), tmp_path / "b")
  for c in store.INTERACTION_COLUMNS:
    np.testing.assert_array_equal(np.asarray(other.inter[c]), np.asarray(flat.inter[c]))
  assert other.item_raw_ids.tolist() == flat.item_raw_ids.tolist()
  assert set(other.manifest["rows_read"]) == {"douban_book/ratings.dat", "douban_music/ratings.dat"}


def test_amazon_small_user_and_item_keys(tmp_path):
  """Ids < C are one person in both folders; ids >= C and all item ids are per folder."""
  data = _open(
    amazon.prepare, _cfg("amazon_sports_clothing", _write(tmp_path / "r", "amazon")), tmp_path / "o"
  )
  assert sorted(data.user_raw_ids.tolist()) == sorted(
    ["0", "1", "2", "3", "4", "sports:9828", "sports:9829", "clothing:9828", "clothing:9830"]
  )
  assert sorted(data.item_raw_ids.tolist()) == sorted(
    ["sports:0", "sports:1", "sports:2", "clothing:5", "clothing:6"]
  )
  inter = _inter(data)
  assert inter["split"].tolist() == [0] * 7 + [1] * 2 + [2] + [0] * 5 + [1] + [2] * 2


# ----------------------------------------------------------------------------------------------
# Configs

CONFIGS = {
  "douban": "douban_gadtcdr",
  "douban_sample": "douban_sample",
  "amazon_sports_clothing": "amazon_cdrib",
  "mind": "mind",
}


@pytest.mark.parametrize("module", list(CONFIGS))
def test_config_loads_and_prepares(tmp_path, module):
  mod = importlib.import_module(f"configs.{module}")
  cfg, base = mod.get_config(), mod.get_config("sass_base")
  ref = ml_config.get_config()
  assert set(cfg.keys()) == set(ref.keys())
  for sec in ref.keys():
    if isinstance(ref[sec], ml_collections.ConfigDict) and sec != "data":
      assert set(cfg[sec].keys()) == set(ref[sec].keys()), sec
  assert cfg.data.name == CONFIGS[module] and base.pretrain.num_steps == 0
  assert Path(cfg.data.dir).is_dir() and Path(cfg.data.dir).resolve().parent == SHARED.resolve()
  assert get_preparer(cfg.data.name) is not None
  data = loop.prepare(cfg, tmp_path)
  assert data.manifest["options"] == store.data_options(cfg.data)
  n_pos = len(data.rows("train", labeled_positive=True))
  assert 0 < cfg.train.batch_size <= n_pos
  assert cfg.pretrain.batch_size <= len(data.rows("train"))
  assert loop.prepare(cfg, tmp_path).path == data.path  # reused, not prepared again
