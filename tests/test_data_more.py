"""Tests for the synthetic, table, Ali-CCP and KuaiRand loaders (docs/design.md §4).

Real samples are read from ``<repo>/../shared/data/<folder>`` (licensed: never copied into the
repository); every count is compared with an independent plain-Python (csv) parse of the files.
The raw Ali-CCP (Tianchi) and KuaiRand release layouts are exercised on small files this module
writes in exactly those layouts, and so are the bad-input cases.
"""

from __future__ import annotations

import collections
import csv
import importlib
import random
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from sass_jax.data import aliccp, get_preparer, kuairand, store, synthetic, table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ALI_DIR = SHARED / "ali_ccp_sample"
ALI_VARIANT = ALI_DIR / "scenario_wise_rec_variant"
KR_SAMPLE = SHARED / "kuairand_sample"
KR_FEATURES = SHARED / "kuairand_pure_features"
DOUBAN_CSV = SHARED / "douban_sample" / "douban_sample.csv"


def _cfg(module: str, arg=None, **kw) -> ml_collections.ConfigDict:
  c = importlib.import_module(f"configs.{module}").get_config(*([arg] if arg else [])).data
  for k, v in kw.items():
    c[k] = v
  return c


def _inter(data):
  return {c: np.asarray(v) for c, v in data.inter.items()}


def _spec(data, table_name, field):
  specs = data.user_specs if table_name == "users" else data.item_specs
  return next(s for s in specs if s.name == field)


def _read(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _no_output(out: Path):
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_registry_points_at_these_loaders():
  assert get_preparer("synthetic") is synthetic.prepare
  assert get_preparer("table") is table.prepare
  assert get_preparer("aliccp") is aliccp.prepare
  assert get_preparer("kuairand") is kuairand.prepare


# ----------------------------------------------------------------------------- synthetic


def _syn(tmp_path, name="s", **kw):
  c = _cfg("synthetic")
  for k, v in kw.items():
    c[k] = v
  return store.open_store(synthetic.prepare(c, tmp_path / name))


def test_synthetic_sizes_and_split(tmp_path):
  t = time.time()
  d = _syn(tmp_path)  # the default: 1e5 rows
  assert time.time() - t < 30
  c = _cfg("synthetic")
  inter = _inter(d)
  assert d.manifest["num_interactions"] == c.num_rows == 100_000
  assert (d.num_users, d.num_items, d.num_scenarios) == (c.num_users, c.num_items, c.num_scenarios)
  assert [s.name for s in d.user_specs] == ["user_id"] + [
    f"user_f{j}" for j in range(c.num_user_fields)
  ]
  assert [s.name for s in d.item_specs] == ["item_id"] + [
    f"item_f{j}" for j in range(c.num_item_fields)
  ]
  counts = np.bincount(inter["split"], minlength=3)
  assert abs(counts[0] - 80_000) <= 2 and abs(counts[1] - 10_000) <= 2
  assert 0.07 < inter["label"].mean() < 0.13  # ctr = 0.1
  assert set(np.unique(inter["scenario"])) == {0, 1, 2}
  # Vocabularies: ids from the training split (id 0 = never in training).
  train = inter["split"] == 0
  assert _spec(d, "users", "user_id").vocab_size == len(np.unique(inter["user"][train])) + 1
  assert _spec(d, "items", "item_id").vocab_size == len(np.unique(inter["item"][train])) + 1
  unseen = np.setdiff1d(np.arange(d.num_items), inter["item"][train])
  assert (np.asarray(d.items["item_id"])[unseen] == 0).all()
  assert d.manifest["rows_rejected"] == {} and d.manifest["rows_read"] == {"generated": 100_000}
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch removed


def test_synthetic_deterministic_for_a_seed(tmp_path):
  kw = dict(
    num_rows=20_000, num_users=2_000, num_items=1_000, num_scenarios=4, seed=7, chunk_rows=4096
  )
  a, b = _syn(tmp_path, "a", **kw), _syn(tmp_path, "b", **kw)
  c = _syn(tmp_path, "c", **{**kw, "seed": 8})
  for col in store.INTERACTION_COLUMNS:
    np.testing.assert_array_equal(a.inter[col], b.inter[col])
  for f in a.users:
    np.testing.assert_array_equal(a.users[f], b.users[f])
  for f in a.items:
    np.testing.assert_array_equal(a.items[f], b.items[f])
  assert not np.array_equal(a.inter["item"], c.inter["item"])
  assert a.num_scenarios == 4 and a.manifest["num_interactions"] == 20_000


def test_synthetic_scenarios_differ(tmp_path):
  d = _syn(tmp_path, num_rows=60_000, num_users=3_000, num_items=2_000, seed=1)
  inter = _inter(d)
  tops = []
  for k in range(d.num_scenarios):
    cnt = np.bincount(inter["item"][inter["scenario"] == k], minlength=d.num_items)
    tops.append(set(np.argsort(-cnt, kind="stable")[:20].tolist()))
  for a in range(len(tops)):
    for b in range(a + 1, len(tops)):
      assert len(tops[a] & tops[b]) < 10, "scenario-specific popularity should differ"
  top10 = d.manifest["generator"]["popularity_top10_by_scenario"]
  assert len({tuple(t) for t in top10}) == d.num_scenarios
  # Features carry the planted signal: the click rate of (user_f0, item_f0) pairs varies far
  # more than binomial noise would (chi-square per pair, about 1 without signal).
  uf = np.asarray(d.users["user_f0"])[inter["user"]].astype(np.int64)
  itf = np.asarray(d.items["item_f0"])[inter["item"]].astype(np.int64)
  pair = uf * 1000 + itf
  _, inv, n = np.unique(pair, return_inverse=True, return_counts=True)
  clicks = np.bincount(inv, weights=inter["label"])
  p = inter["label"].mean()
  ok = n >= 30
  chi2 = ((clicks[ok] - n[ok] * p) ** 2 / (n[ok] * p * (1 - p))).mean()
  assert chi2 > 3, chi2


def test_synthetic_large_config_and_limits(tmp_path):
  c = _cfg("synthetic", "large")
  assert c.num_rows == 10_000_000 and c.num_items >= 1_000_000 and c.num_users >= 1_000_000
  with pytest.raises(ValueError, match="num_rows"):
    synthetic.prepare(_cfg("synthetic", num_rows=10), tmp_path / "x")
  with pytest.raises(ValueError, match="num_items"):
    synthetic.prepare(_cfg("synthetic", num_items=20_000_000), tmp_path / "x")
  _no_output(tmp_path / "x")


# ----------------------------------------------------------------------------- table


def _table_cfg(path, **kw):
  c = _cfg("table_example", path=str(path))
  for k, v in kw.items():
    c[k] = v
  return c


def test_table_on_douban_sample(tmp_path):
  rows = _read(DOUBAN_CSV)
  d = store.open_store(table.prepare(_table_cfg(DOUBAN_CSV), tmp_path / "t"))
  inter = _inter(d)
  assert d.manifest["num_interactions"] == len(rows) == 3000
  assert d.num_users == len({r["user_id"] for r in rows}) == 1352
  assert d.num_items == len({r["item_id"] for r in rows}) == 2502
  assert d.scenario_names == ["domain=book", "domain=movie", "domain=music"]
  by_dom = collections.Counter(r["domain"] for r in rows)
  assert np.bincount(inter["scenario"]).tolist() == [
    by_dom["book"],
    by_dom["movie"],
    by_dom["music"],
  ]
  assert inter["label"].tolist() == [float(r["rating"]) for r in rows]
  assert d.user_raw_ids[inter["user"]].tolist() == [r["user_id"] for r in rows]
  assert d.item_raw_ids[inter["item"]].tolist() == [r["item_id"] for r in rows]
  # First occurrence per user; vocabulary from the training rows.
  first = {}
  for r in rows:
    first.setdefault(r["user_id"], r["living_place"])
  train = inter["split"] == 0
  tr_users = {rows[j]["user_id"] for j in np.flatnonzero(train)}
  assert (
    _spec(d, "users", "living_place").vocab_size
    == len({first[u] for u in tr_users if first[u]}) + 1
  )
  assert _spec(d, "users", "user_id").vocab_size == len(tr_users) + 1
  assert np.bincount(inter["split"]).tolist() == [2400, 300, 300]
  assert (
    d.manifest["rows_read"] == {"douban_sample.csv": 3000} and d.manifest["rows_rejected"] == {}
  )


def _small_table(path: Path, rows, header=("uid", "iid", "page", "click", "age", "tags", "cat")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


SMALL_ROWS = [
  ("1", "10", "home", "1", "20", "x|y", "c1"),
  ("2", "20", "feed", "0", "30", "y", "c2"),
  ("1", "20", "home", "0", "99", "z", "c9"),  # user 1 again: its first row's features stay
  ("3", "10", "feed", "1", "40", "", "c1"),
] * 5


def _small_cfg(path, **kw):
  return _table_cfg(
    path,
    user_id_col="uid",
    item_id_col="iid",
    scenario_col="page",
    label_col="click",
    user_cols=("age", "tags"),
    item_cols=("cat",),
    multi_hot_cols=("tags",),
    separator="|",
    label_threshold=0.5,
    split_seed=3,
    **kw,
  )


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_csv_and_parquet(tmp_path, fmt):
  path = _small_table(tmp_path / "t.csv", SMALL_ROWS)
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*SMALL_ROWS))
    names = ("uid", "iid", "page", "click", "age", "tags", "cat")
    tbl = pa.table({n: list(c) for n, c in zip(names, cols)})
    tbl = tbl.set_column(3, "click", pa.array([int(x) for x in cols[3]]))
    path = tmp_path / "t.parquet"
    pq.write_table(tbl, path)
  # Each row 5 times: kept with duplicates='keep' and counted (the default, 'error', refuses).
  d = store.open_store(table.prepare(_small_cfg(path, duplicates="keep"), tmp_path / "out"))
  inter = _inter(d)
  assert d.manifest["rows_repeated"] == {path.name: 16} and d.manifest["duplicates"] == "keep"
  assert d.manifest["num_interactions"] == 20 and d.num_users == 3 and d.num_items == 2
  assert d.scenario_names == ["page=feed", "page=home"]
  assert inter["label"].sum() == 10
  tags = _spec(d, "users", "tags")
  assert tags.multi_hot == 2
  mask = np.asarray(d.user_masks["tags"])
  raw = d.user_raw_ids.tolist()
  assert mask[raw.index("1")].tolist() == [True, True]  # "x|y", not user 1's later "z"
  assert mask[raw.index("3")].tolist() == [False, False]  # empty list
  assert tags.vocab_size <= 3  # x, y (z never becomes a feature value)


def test_table_bad_input(tmp_path):
  good = list(SMALL_ROWS[:4])
  out = tmp_path / "out"
  # Missing column: always an error naming the file and the column.
  p = _small_table(
    tmp_path / "nocol.csv",
    [r[:6] for r in good],
    header=("uid", "iid", "page", "click", "age", "tags"),
  )
  with pytest.raises(store.DataError, match=r"nocol\.csv: column 'cat' not found"):
    table.prepare(_small_cfg(p, on_error="skip"), out)
  _no_output(out)
  # Wrong column count (line 3), non-numeric id (line 4), unknown scenario (line 5).
  p = tmp_path / "bad.csv"
  _small_table(p, good)
  lines = p.read_text().splitlines()
  lines[2] = lines[2] + ",extra"
  lines[3] = lines[3].replace("1,20,", "x1,20,", 1)
  lines[4] = lines[4].replace("feed", "search")
  p.write_text("\n".join(lines) + "\n")
  kw = dict(numeric_ids=True, scenarios=("home", "feed"))
  with pytest.raises(store.DataError, match=r"bad\.csv:3: 8 fields, expected 7"):
    table.prepare(_small_cfg(p, **kw), out)
  _no_output(out)
  p2 = tmp_path / "bad2.csv"
  p2.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
  with pytest.raises(
    store.DataError, match=r"bad2\.csv:3: field 'uid': expected an integer id, got 'x1'"
  ):
    table.prepare(_small_cfg(p2, **kw), out)
  p3 = tmp_path / "bad3.csv"
  p3.write_text("\n".join(lines[:2] + lines[4:]) + "\n")
  with pytest.raises(store.DataError, match=r"bad3\.csv:3: field 'page': 'search' is not one of"):
    table.prepare(_small_cfg(p3, **kw), out)
  _no_output(out)
  d = store.open_store(table.prepare(_small_cfg(p, on_error="skip", **kw), out))
  assert d.manifest["rows_rejected"] == {
    "bad.csv": {"wrong_field_count": 1, "bad_uid": 1, "unknown_scenario": 1}
  }
  assert d.manifest["rows_read"] == {"bad.csv": 4} and d.manifest["num_interactions"] == 1
  # Empty file and missing file.
  (tmp_path / "empty.csv").write_text("")
  with pytest.raises(store.DataError, match=r"empty\.csv: file is empty"):
    table.prepare(_small_cfg(tmp_path / "empty.csv"), tmp_path / "o2")
  (tmp_path / "header.csv").write_text("uid,iid,page,click,age,tags,cat\n")
  with pytest.raises(store.DataError, match=r"header\.csv: no data rows"):
    table.prepare(_small_cfg(tmp_path / "header.csv"), tmp_path / "o2")
  with pytest.raises(FileNotFoundError, match=r"nothere\.csv: file not found"):
    table.prepare(_small_cfg(tmp_path / "nothere.csv"), tmp_path / "o2")
  _no_output(tmp_path / "o2")


# ----------------------------------------------------------------------------- Ali-CCP

ALI_FILES = {
  "train": "ali_ccp_train_sample.csv",
  "valid": "ali_ccp_val_sample.csv",
  "test": "ali_ccp_test_sample.csv",
}


@pytest.mark.parametrize("folder", [ALI_DIR, ALI_VARIANT])
def test_aliccp_csv_sample(tmp_path, folder):
  rows = {s: _read(folder / f) for s, f in ALI_FILES.items()}
  d = store.open_store(aliccp.prepare(_cfg("aliccp", dir=str(folder)), tmp_path / "a"))
  inter = _inter(d)
  m = d.manifest
  assert m["rows_read"] == {f: len(rows[s]) for s, f in ALI_FILES.items()}
  assert m["num_interactions"] == sum(len(r) for r in rows.values()) == 200
  assert (
    m["split_counts"]
    == {s: len(r) for s, r in rows.items()}
    == {"train": 100, "valid": 50, "test": 50}
  )
  assert d.scenario_names == ["301=1", "301=2", "301=3"]
  everything = [r for s in ("train", "valid", "test") for r in rows[s]]

  # Entities: the encoded id; id 0 (rare) is keyed by the entity's whole field tuple.
  def key(r, idf, fields):
    return r[idf] if r[idf] != "0" else tuple(r[f] for f in fields)

  ukey = [key(r, "101", aliccp.USER_FIELDS) for r in everything]
  ikey = [key(r, "205", aliccp.ITEM_FIELDS) for r in everything]
  assert d.num_users == len(set(ukey))
  assert d.num_items == len(set(ikey))
  assert len(set(inter["item"].tolist())) == d.num_items
  assert [
    len({ikey[j] for j in np.flatnonzero(inter["item"] == i)}) for i in range(d.num_items)
  ] == [1] * d.num_items
  for sid, s in enumerate(("train", "valid", "test")):
    by = collections.Counter(int(r["301"]) - 1 for r in rows[s])
    sel = inter["split"] == sid
    assert np.bincount(inter["scenario"][sel], minlength=3).tolist() == [by[0], by[1], by[2]]
    assert m["positives_by_split_scenario"][s] == [
      sum(r["click"] == "1" and r["301"] == str(k + 1) for r in rows[s]) for k in range(3)
    ]
  assert inter["label"].tolist() == [float(r["click"]) for r in everything]
  # Vocabulary: nonzero values (0 = unknown in torch-rechub's encoding) of the training rows'
  # entities, features from each entity's first row.
  first_item = {}
  for r, k in zip(everything, ikey):
    first_item.setdefault(k, r)
  train_items = {ikey[j] for j in range(len(everything)) if j < len(rows["train"])}
  for field in ("205", "206", "207", "216"):
    assert (
      _spec(d, "items", field).vocab_size
      == len({first_item[k][field] for k in train_items} - {"0"}) + 1
    )
  assert _spec(d, "users", "121").vocab_size == len({r["121"] for r in rows["train"]} - {"0"}) + 1
  assert [s.name for s in d.user_specs] == list(aliccp.USER_FIELDS)
  assert [s.name for s in d.item_specs] == list(aliccp.ITEM_FIELDS)
  assert _spec(d, "users", "109_14").multi_hot == 1
  if folder == ALI_VARIANT:  # its SOURCE.md: train 1:69, 2:19, 3:12
    assert np.bincount(inter["scenario"][inter["split"] == 0]).tolist() == [69, 19, 12]


SCEN_FIDS = ("9351665", "9351666", "9351667")


def _feat(pairs):
  return "\x01".join(f"{f}\x02{i}\x03{w}" for f, i, w in pairs)


def _write_raw(d: Path, seed=0, test=True):
  """Tianchi-layout files; returns the expected rows [(part, user, item, scen fid, click)] and
  each user's first 109_14 list."""
  rnd = random.Random(seed)
  d.mkdir(parents=True, exist_ok=True)
  users = {}
  expected, first_beh = [], {}
  for part in ("train", "test") if test else ("train",):
    cfi_user, lines = {}, []
    for j in range(6):
      cfi = f"{part}{j:04x}cafe"
      uid = 1000 + rnd.randrange(4)
      beh = rnd.sample(range(50_000, 50_020), rnd.randint(1, 7))
      pairs = [
        ("101", uid, "1.0"),
        ("121", 70 + uid % 3, "1.0"),
        ("122", 80, "1.0"),
        ("124", 90 + uid % 2, "1.0"),
        ("125", 95, "1.0"),
        ("126", 96, "1.0"),
        ("127", 97, "1.0"),
        ("128", 98, "1.0"),
        ("129", 99, "1.0"),
      ]
      pairs += [("109_14", b, f"{rnd.random():.3f}") for b in beh]
      pairs += [
        ("110_14", 60_000 + uid, "2.0"),
        ("127_14", 61_000, "1.0"),
        ("150_14", 62_000 + j, "1.0"),
        ("150_14", 62_100, "1.0"),
      ]
      lines.append(f"{cfi},{len(pairs)},{_feat(pairs)}")
      cfi_user[cfi] = uid
      first_beh.setdefault(uid, beh)
      users.setdefault(uid, pairs)
    (d / f"common_features_{part}.csv").write_text("\n".join(lines) + "\n")
    sk = []
    for j in range(40 if part == "train" else 15):
      cfi = rnd.choice(sorted(cfi_user))
      item = 7000 + rnd.randrange(12)
      scen = rnd.choices(SCEN_FIDS, weights=(5, 1, 4))[0]
      click = int(rnd.random() < 0.3)
      pairs = [
        ("205", item, "1.0"),
        ("206", 300 + item % 4, "1.0"),
        ("207", 400 + item % 5, "1.0"),
        ("210", 500 + item % 2, "1.0"),
        ("216", 600 + item % 3, "1.0"),
        ("301", scen, "1.0"),
        ("508", 9_000 + j, "0.5"),
        ("853", 9_500, "0.1"),
      ]
      sk.append(
        f"{part}{j},{click},{click and int(rnd.random() < 0.2)},{cfi},{len(pairs)},{_feat(pairs)}"
      )
      expected.append((part, cfi_user[cfi], item, scen, click))
    (d / f"sample_skeleton_{part}.csv").write_text("\n".join(sk) + "\n")
  return expected, first_beh


def test_aliccp_raw_layout(tmp_path):
  expected, first_beh = _write_raw(tmp_path / "raw")
  cfg = _cfg("aliccp", dir=str(tmp_path / "raw"))
  d = store.open_store(aliccp.prepare(cfg, tmp_path / "a"))
  inter = _inter(d)
  m = d.manifest
  assert m["layout"] == "raw"
  assert m["rows_read"] == {
    "common_features_train.csv": 6,
    "sample_skeleton_train.csv": 40,
    "common_features_test.csv": 6,
    "sample_skeleton_test.csv": 15,
  }
  assert m["num_interactions"] == len(expected) == 55
  assert d.scenario_names == [f"301={f}" for f in SCEN_FIDS]
  assert d.user_raw_ids[inter["user"]].tolist() == [str(r[1]) for r in expected]
  assert d.item_raw_ids[inter["item"]].tolist() == [str(r[2]) for r in expected]
  assert inter["scenario"].tolist() == [SCEN_FIDS.index(r[3]) for r in expected]
  assert inter["label"].tolist() == [float(r[4]) for r in expected]
  # Test file = test split; the train file is cut 8:1 into train / valid.
  assert (inter["split"] == 2).tolist() == [r[0] == "test" for r in expected]
  assert np.bincount(inter["split"]).tolist() == [round(40 * 8 / 9), 40 - round(40 * 8 / 9), 15]
  assert d.num_users == len({r[1] for r in expected})
  assert d.num_items == len({r[2] for r in expected})
  # Multi-valued 109_14 kept whole (every value of the user's first common-feature line).
  beh = _spec(d, "users", "109_14")
  assert beh.multi_hot == max(len(first_beh[int(u)]) for u in d.user_raw_ids)
  mask = np.asarray(d.user_masks["109_14"])
  ids = np.asarray(d.users["109_14"])
  for row, u in enumerate(d.user_raw_ids):
    assert mask[row].sum() == len(first_beh[int(u)])
  train_users = {str(r[1]) for r, s in zip(expected, inter["split"]) if s == 0}
  train_vals = {b for u in train_users for b in first_beh[int(u)]}
  assert beh.vocab_size == len(train_vals) + 1
  for row, u in enumerate(d.user_raw_ids):  # training users' values all have ids
    if u in train_users:
      assert (ids[row][mask[row]] > 0).all()
  assert _spec(d, "users", "150_14").multi_hot == 2
  # Cross fields are not features of either tower.
  assert not {"508", "853"} & {s.name for s in d.user_specs + d.item_specs}
  # Without the test pair: a random 8:1:1 split of the train file.
  expected2, _ = _write_raw(tmp_path / "raw2", test=False)
  d2 = store.open_store(aliccp.prepare(_cfg("aliccp", dir=str(tmp_path / "raw2")), tmp_path / "a2"))
  assert np.bincount(np.asarray(d2.inter["split"])).tolist() == [32, 4, 4]


def _edit_line(path: Path, lineno: int, fn):
  lines = path.read_text().split("\n")
  lines[lineno - 1] = fn(lines[lineno - 1])
  path.write_text("\n".join(lines))


def test_aliccp_raw_bad_input(tmp_path):
  raw = tmp_path / "raw"
  _write_raw(raw)
  sk = raw / "sample_skeleton_train.csv"
  _edit_line(sk, 2, lambda l: l.rsplit(",", 1)[0])  # 5 columns
  _edit_line(sk, 4, lambda l: l.replace("205\x027", "205\x02x7", 1))  # non-numeric id
  _edit_line(sk, 6, lambda l: l.replace("301\x02935166", "301\x02835166", 1))  # unknown scenario
  out = tmp_path / "a"
  cfg = _cfg("aliccp", dir=str(raw), scenarios=SCEN_FIDS)
  with pytest.raises(
    store.DataError, match=r"sample_skeleton_train\.csv:2: 5 comma-separated fields, expected 6"
  ):
    aliccp.prepare(cfg, out)
  _no_output(out)
  good = sk.read_text().split("\n")
  sk.write_text("\n".join(good[2:]))  # drop lines 1-2: the bad id is now on line 2
  with pytest.raises(
    store.DataError, match=r"sample_skeleton_train\.csv:2: field '205': expected an integer"
  ):
    aliccp.prepare(cfg, out)
  sk.write_text("\n".join(good[4:]))  # the unknown scenario is now on line 2
  with pytest.raises(
    store.DataError, match=r"sample_skeleton_train\.csv:2: field '301': 835166\d is not one of"
  ):
    aliccp.prepare(cfg, out)
  _no_output(out)
  sk.write_text("\n".join(good))
  d = store.open_store(
    aliccp.prepare(_cfg("aliccp", dir=str(raw), scenarios=SCEN_FIDS, on_error="skip"), out)
  )
  assert d.manifest["rows_rejected"] == {
    "sample_skeleton_train.csv": {
      "wrong_field_count": 1,
      "bad_feature_id": 1,
      "unknown_scenario": 1,
    }
  }
  assert d.manifest["num_interactions"] == 55 - 3
  # Empty and missing files.
  raw = tmp_path / "raw_b"
  _write_raw(raw)
  cfg = _cfg("aliccp", dir=str(raw), scenarios=SCEN_FIDS)
  (raw / "common_features_test.csv").write_text("")
  with pytest.raises(store.DataError, match=r"common_features_test\.csv: file is empty"):
    aliccp.prepare(cfg, tmp_path / "b")
  (raw / "common_features_test.csv").unlink()
  (raw / "common_features_train.csv").unlink()
  with pytest.raises(FileNotFoundError, match=r"common_features_train\.csv: file not found"):
    aliccp.prepare(cfg, tmp_path / "b")
  _no_output(tmp_path / "b")


def test_aliccp_csv_bad_input(tmp_path):
  src = ALI_DIR
  d = tmp_path / "csv"
  d.mkdir()
  for f in ALI_FILES.values():
    (d / f).write_bytes((src / f).read_bytes())  # a temporary copy, deleted with tmp_path
  tr = d / ALI_FILES["train"]
  _edit_line(tr, 3, lambda l: "abc," + l.split(",", 1)[1])  # click not a number? -> id test
  _edit_line(tr, 5, lambda l: ",".join((p if j != 2 else "u7") for j, p in enumerate(l.split(","))))
  _edit_line(tr, 7, lambda l: ",".join((p if j != 20 else "7") for j, p in enumerate(l.split(","))))
  _edit_line(tr, 9, lambda l: l + ",1")
  out = tmp_path / "a"
  with pytest.raises(store.DataError, match=r"ali_ccp_train_sample\.csv:3: field 'click'"):
    aliccp.prepare(_cfg("aliccp", dir=str(d)), out)
  _no_output(out)
  data = store.open_store(
    aliccp.prepare(_cfg("aliccp", dir=str(d), on_error="skip"), tmp_path / "ok")
  )
  assert data.manifest["rows_rejected"] == {
    "ali_ccp_train_sample.csv": {
      "bad_click": 1,
      "bad_101": 1,
      "unknown_scenario": 1,
      "wrong_field_count": 1,
    }
  }
  assert data.manifest["split_counts"]["train"] == 96
  _edit_line(tr, 3, lambda l: "0," + l.split(",", 1)[1])
  _edit_line(tr, 9, lambda l: l.rsplit(",", 1)[0])
  with pytest.raises(
    store.DataError,
    match=r"ali_ccp_train_sample\.csv:5: field '101': expected an integer id, got 'u7'",
  ):
    aliccp.prepare(_cfg("aliccp", dir=str(d)), out)
  _edit_line(tr, 5, lambda l: l.replace(",u7,", ",1,", 1))
  with pytest.raises(
    store.DataError, match=r"ali_ccp_train_sample\.csv:7: field '301': 7 is not one of"
  ):
    aliccp.prepare(_cfg("aliccp", dir=str(d)), out)
  _no_output(out)
  (d / ALI_FILES["test"]).write_text("")
  with pytest.raises(store.DataError, match=r"ali_ccp_test_sample\.csv: file is empty"):
    aliccp.prepare(_cfg("aliccp", dir=str(d), on_error="skip"), out)
  (d / ALI_FILES["test"]).unlink()
  with pytest.raises(FileNotFoundError, match=r"'test'"):
    aliccp.prepare(_cfg("aliccp", dir=str(d)), out)
  (tmp_path / "nothing").mkdir()
  with pytest.raises(FileNotFoundError, match="neither the Tianchi layout"):
    aliccp.prepare(_cfg("aliccp", dir=str(tmp_path / "nothing")), out)
  with pytest.raises(FileNotFoundError, match="Ali-CCP directory not found"):
    aliccp.prepare(_cfg("aliccp", dir=str(tmp_path / "no_such_dir")), out)
  _no_output(out)
  # A missing column names the file and the column.
  for f in (d / ALI_FILES["train"], d / ALI_FILES["valid"]):
    f.write_text(f.read_text().replace("click,purchase,101,", "click,purchase,1O1,", 1))
  (d / ALI_FILES["test"]).write_bytes((src / ALI_FILES["test"]).read_bytes())
  with pytest.raises(store.DataError, match=r"ali_ccp_train_sample\.csv: column '101' not found"):
    aliccp.prepare(_cfg("aliccp", dir=str(d), on_error="skip"), out)
  _no_output(out)


# ----------------------------------------------------------------------------- KuaiRand


def test_kuairand_sample_with_pure_features(tmp_path):
  rows = _read(KR_SAMPLE / "kuairand_sample.csv")
  users = {r["user_id"]: r for r in _read(KR_FEATURES / "user_features_pure.csv")}
  videos = {r["video_id"]: r for r in _read(KR_FEATURES / "video_features_basic_pure.csv")}
  d = store.open_store(kuairand.prepare(_cfg("kuairand"), tmp_path / "k"))
  inter = _inter(d)
  m = d.manifest
  assert m["num_interactions"] == len(rows) == 200
  assert d.num_users == len({r["user_id"] for r in rows}) == 145
  assert d.num_items == len({r["video_id"] for r in rows}) == 29
  assert d.scenario_names == ["tab=1"] and m["rows_by_tab"] == {"1": 200}
  assert inter["label"].sum() == sum(r["is_click"] == "1" for r in rows) == 32
  assert d.user_raw_ids[inter["user"]].tolist() == [r["user_id"] for r in rows]
  assert m["rows_read"] == {
    "kuairand_sample.csv": 200,
    "user_features_pure.csv": 27285,
    "video_features_basic_pure.csv": 7583,
  }
  train = np.flatnonzero(inter["split"] == 0)
  tr_users = {rows[j]["user_id"] for j in train}
  tr_videos = {rows[j]["video_id"] for j in train}
  assert (
    _spec(d, "users", "user_active_degree").vocab_size
    == len({users[u]["user_active_degree"] for u in tr_users}) + 1
  )
  assert (
    _spec(d, "items", "author_id").vocab_size
    == len({videos[v]["author_id"] for v in tr_videos}) + 1
  )
  tags = [[t for t in videos[v]["tag"].split(",") if t] for v in d.item_raw_ids]
  tag = _spec(d, "items", "tag")
  assert tag.multi_hot == max(len(t) for t in tags)
  assert tag.vocab_size == len({t for v in tr_videos for t in videos[v]["tag"].split(",") if t}) + 1
  assert np.asarray(d.item_masks["tag"]).sum(1).tolist() == [len(t) for t in tags]


LOG_HEADER = (
  "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,"
  "is_forward,is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,"
  "comment_stay_time,is_profile_enter,is_rand,tab"
)
USER_HEADER = (
  "user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,"
  "follow_user_num,follow_user_num_range,fans_user_num,fans_user_num_range,"
  "friend_user_num,friend_user_num_range,register_days,register_days_range,"
  + ",".join(f"onehot_feat{j}" for j in range(18))
)
VIDEO_HEADER = (
  "video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
  "server_width,server_height,music_id,music_type,tag"
)
TAB_WEIGHTS = {0: 30, 1: 25, 2: 6, 4: 20, 6: 15, 9: 4}


def _write_release(d: Path, seed=0):
  """KuaiRand release layout; returns {file name: [(user, video, click, tab)]}."""
  rnd = random.Random(seed)
  d.mkdir(parents=True, exist_ok=True)
  ulines = [USER_HEADER]
  for u in range(12):
    ulines.append(
      f"{u},{rnd.choice(['full_active', 'high_active', 'UNKNOWN'])},0,-124,{u % 2},"
      f'{u * 3},"[0,10)",5,"(250,500]",1,"[1,5)",{100 + u},730+,'
      + ",".join(str(rnd.randrange(3)) + ("" if j < 12 else ".0") for j in range(18))
    )
  (d / "user_features_pure.csv").write_text("\n".join(ulines) + "\n")
  vlines = [VIDEO_HEADER]
  for v in range(9):
    tag = ["", "7", '"7,12"', '"3,7,12"'][v % 4]
    vlines.append(
      f"{v},{100 + v % 5},NORMAL,2022-04-10,Web,0.0,1000.0,720.0,1280.0,{555 + v},9.0,{tag}"
    )
  (d / "video_features_basic_pure.csv").write_text("\n".join(vlines) + "\n")
  logs = {}
  for name, n in (
    ("log_standard_4_08_to_4_21_pure.csv", 60),
    ("log_standard_4_22_to_5_08_pure.csv", 40),
    ("log_random_4_22_to_5_08_pure.csv", 20),
  ):
    rows, lines = [], [LOG_HEADER]
    for _ in range(n):
      u, v = rnd.randrange(12), rnd.randrange(9)
      click = int(rnd.random() < 0.4)
      tab = rnd.choices(list(TAB_WEIGHTS), weights=list(TAB_WEIGHTS.values()))[0]
      rows.append((u, v, click, tab))
      lines.append(
        f"{u},{v},20220408,10,1649380000000,{click},0,0,0,0,0,0,1000,5000,0,0,0,"
        f"{int('random' in name)},{tab}"
      )
    (d / name).write_text("\n".join(lines) + "\n")
    logs[name] = rows
  return logs


@pytest.mark.parametrize("include_random", [False, True])
def test_kuairand_release_layout(tmp_path, include_random):
  logs = _write_release(tmp_path / "rel")
  # Every log row kept (the random rows repeat (user, video, tab)s; the default 'max' merges
  # them, tested in test_bad_inputs_data.py).
  cfg = _cfg(
    "kuairand",
    dir=str(tmp_path / "rel"),
    features_dir=None,
    include_random=include_random,
    duplicates="keep",
  )
  d = store.open_store(kuairand.prepare(cfg, tmp_path / "k"))
  inter = _inter(d)
  m = d.manifest
  used = [f for f in logs if include_random or "random" not in f]
  rows = [r for f in used for r in logs[f]]
  by_tab = collections.Counter(r[3] for r in rows)
  kept = sorted(sorted(by_tab, key=lambda t: (-by_tab[t], t))[:4])
  assert m["layout"] == "release" and m["kept_tabs"] == kept
  assert d.scenario_names == [f"tab={t}" for t in kept]
  kept_rows = [r for r in rows if r[3] in kept]
  assert m["num_interactions"] == len(kept_rows)
  assert np.bincount(inter["scenario"]).tolist() == [by_tab[t] for t in kept]
  assert inter["label"].tolist() == [float(r[2]) for r in kept_rows]
  assert d.user_raw_ids[inter["user"]].tolist() == [str(r[0]) for r in kept_rows]
  assert d.num_users == len({r[0] for r in kept_rows}) and d.num_items == len(
    {r[1] for r in kept_rows}
  )
  for f in used:  # dropped tabs: counted per file, never silently
    n_drop = sum(r[3] not in kept for r in logs[f])
    assert m["rows_rejected"].get(f, {}).get("tab_not_kept", 0) == n_drop
    assert m["rows_read"][f] == len(logs[f])
  assert sum(v["tab_not_kept"] for v in m["rows_rejected"].values()) == len(rows) - len(kept_rows)
  assert ("log_random_4_22_to_5_08_pure.csv" in m["rows_read"]) == include_random
  tag = _spec(d, "items", "tag")
  assert tag.multi_hot == 3
  masks = np.asarray(d.item_masks["tag"]).sum(1)
  assert masks.tolist() == [[0, 1, 2, 3][int(v) % 4] for v in d.item_raw_ids]
  # onehot_feat12.. are written as floats ("1.0"): read as the same ids as "1".
  assert _spec(d, "users", "onehot_feat12").vocab_size <= 4
  # top_tabs=0 keeps every tab.
  d_all = store.open_store(
    kuairand.prepare(
      _cfg(
        "kuairand",
        dir=str(tmp_path / "rel"),
        features_dir=None,
        top_tabs=0,
        include_random=include_random,
        duplicates="keep",
      ),
      tmp_path / "k_all",
    )
  )
  assert d_all.manifest["num_interactions"] == len(rows) and d_all.num_scenarios == len(by_tab)


def test_kuairand_bad_input(tmp_path):
  rel = tmp_path / "rel"
  _write_release(rel)
  log1 = rel / "log_standard_4_08_to_4_21_pure.csv"
  _edit_line(log1, 3, lambda l: l + ",5")  # wrong column count
  _edit_line(log1, 4, lambda l: "u" + l)  # non-numeric user id
  _edit_line(log1, 5, lambda l: l.rsplit(",", 1)[0] + ",99")  # unknown scenario (tab 99)
  _edit_line(log1, 6, lambda l: "55" + l[l.index(",") :])  # user not in the user table
  out = tmp_path / "k"
  cfg = dict(dir=str(rel), features_dir=None)
  with pytest.raises(
    store.DataError, match=r"log_standard_4_08_to_4_21_pure\.csv:3: 20 fields, expected 19"
  ):
    kuairand.prepare(_cfg("kuairand", **cfg), out)
  _no_output(out)
  lines = log1.read_text().split("\n")
  log1.write_text("\n".join(lines[:2] + lines[3:]))
  with pytest.raises(
    store.DataError,
    match=r"log_standard_4_08_to_4_21_pure\.csv:3: field 'user_id': expected an integer id",
  ):
    kuairand.prepare(_cfg("kuairand", **cfg), out)
  log1.write_text("\n".join(lines[:2] + lines[4:]))
  with pytest.raises(
    store.DataError,
    match=r"log_standard_4_08_to_4_21_pure\.csv:3: field 'tab': expected an integer in \[0, 14\], got '99'",
  ):
    kuairand.prepare(_cfg("kuairand", **cfg), out)
  log1.write_text("\n".join(lines[:2] + lines[5:]))
  with pytest.raises(
    store.DataError,
    match=r"log_standard_4_08_to_4_21_pure\.csv:3: field 'user_id': 55 is not in user_features_pure\.csv",
  ):
    kuairand.prepare(_cfg("kuairand", **cfg), out)
  _no_output(out)
  log1.write_text("\n".join(lines))
  d = store.open_store(kuairand.prepare(_cfg("kuairand", on_error="skip", **cfg), out))
  rej = d.manifest["rows_rejected"][log1.name]
  assert {k: v for k, v in rej.items() if k != "tab_not_kept"} == {
    "wrong_field_count": 1,
    "bad_user_id": 1,
    "unknown_scenario": 1,
    "unknown_user": 1,
  }
  # A missing column, an empty file, a missing feature table.
  log1.write_text("\n".join([lines[0].replace(",tab", ",tabx")] + lines[1:]))
  with pytest.raises(
    store.DataError, match=r"log_standard_4_08_to_4_21_pure\.csv: column 'tab' not found"
  ):
    kuairand.prepare(_cfg("kuairand", on_error="skip", **cfg), tmp_path / "k2")
  log1.write_text("")
  with pytest.raises(store.DataError, match=r"log_standard_4_08_to_4_21_pure\.csv: file is empty"):
    kuairand.prepare(_cfg("kuairand", on_error="skip", **cfg), tmp_path / "k2")
  (rel / "video_features_basic_pure.csv").unlink()
  with pytest.raises(FileNotFoundError, match="video_features_basic"):
    kuairand.prepare(_cfg("kuairand", **cfg), tmp_path / "k2")
  _no_output(tmp_path / "k2")
