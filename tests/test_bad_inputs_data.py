"""Bad input data is never silently wrong: repeated exposures, stale or damaged prepared data,
ids that do not fit, undecodable bytes, bad timestamps / labels, a full disk, killed prepares.

Data-level checks call the loaders directly on small files in tmp_path (or on a temporary copy
of the MovieLens sample from ``../shared/data``); the command line runs as a subprocess only
where its behaviour (one ``error:`` line, exit code 1, nothing half-written) is the point.
"""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import test as test_config
from sass_jax.data import aliccp, kuairand, movielens, store, synthetic, table
from sass_jax.train import loop
from test_data_more import ALI_DIR, ALI_FILES, _write_release
from test_data_sources import LOADERS, _write

REPO = Path(__file__).resolve().parents[1]
ML = REPO.parent / "shared" / "data" / "movielens_1m_sample"
RATINGS = "ratings_sample_100k.dat"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # sass_jax.main's logging format


def _ml_copy(d: Path, ratings: bytes | None = None) -> Path:
  """A temporary copy of the MovieLens sample (optionally with other ratings bytes)."""
  d.mkdir(parents=True)
  for f in ("users.dat", "movies.dat"):
    shutil.copy(ML / f, d / f)
  (d / RATINGS).write_bytes((ML / RATINGS).read_bytes() if ratings is None else ratings)
  return d


def _data_cfg(module: str, **kw):
  """``configs.<module>.get_config().data`` with overrides."""
  c = importlib.import_module(f"configs.{module}").get_config().data
  for k, v in kw.items():
    c[k] = v
  return c


def _ml_cfg(data_dir, **kw):
  c = test_config.get_config("sass_base")
  c.data.dir = str(data_dir)
  for k, v in kw.items():
    c.data[k] = v
  return c


SMALL_USERS = [
  "1::F::1::10::48067",
  "2::M::56::16::70072",
  "3::M::25::15::55117",
  "4::M::45::7::02460",
]
SMALL_RATINGS = [
  "1::1::5::978300760",
  "1::2::3::978302109",
  "2::1::4::978301968",
  "2::3::2::978300275",
  "3::2::5::978824291",
  "3::3::1::978824291",
  "4::1::4::978300760",
  "4::2::2::978300760",
  "4::3::5::978300760",
  "1::3::4::978300760",
]


def _small_ml(d: Path, users=None, ratings=None) -> Path:
  """GroupLens-layout files: 4 users, 3 movies and the given rating lines."""
  d.mkdir(parents=True)
  (d / "users.dat").write_text("\n".join(users or SMALL_USERS) + "\n", encoding="latin-1")
  (d / "movies.dat").write_text(
    "1::Toy Story (1995)::Animation|Comedy\n2::Jumanji (1995)::Adventure\n3::Heat (1995)::Action\n",
    encoding="latin-1",
  )
  (d / "ratings.dat").write_text("\n".join(ratings or SMALL_RATINGS) + "\n", encoding="latin-1")
  return d


def _files(d: Path) -> list[str]:
  """Every path under ``d`` (relative), so a test can assert nothing was added or changed."""
  return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# Sets RLIMIT_FSIZE (SIGXFSZ ignored, so a write beyond it fails with EFBIG instead of killing
# the process) and then execs the CLI: both survive exec, and unlike a preexec_fn nothing runs
# between fork and exec of this (multithreaded, JAX-importing) test process.
_LIMITED = (
  "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
  "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
  "os.execv(sys.executable, [sys.executable, '-m', 'sass_jax.main', *sys.argv[2:]])"
)


def _cli(env, workdir, data_dir, *args, limit_fsize=None):
  """``python -m sass_jax.main`` on configs/test.py:sass_base; ``limit_fsize``: RLIMIT_FSIZE
  in bytes for the child."""
  argv = [
    "--config",
    "configs/test.py:sass_base",
    "--workdir",
    str(workdir),
    f"--config.data.dir={data_dir}",
    *args,
  ]
  cmd = (
    [sys.executable, "-m", "sass_jax.main"]
    if limit_fsize is None
    else [sys.executable, "-c", _LIMITED, str(limit_fsize)]
  ) + argv
  return subprocess.run(
    cmd, cwd=REPO, env=dict(env, SASS_JAX_DEBUG="0"), capture_output=True, text=True, timeout=300
  )


def _error_line(r) -> str:
  """The one non-log stderr line of a failed CLI run (asserting there is exactly one)."""
  assert r.returncode == 1, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.strip() and not LOG_LINE.match(l)]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  return lines[0]


def _balance(m: dict, files) -> None:
  """rows_read = rows kept + rows_rejected + rows_merged, summed over ``files``."""
  read = sum(m["rows_read"][f] for f in files)
  rejected = sum(sum(m["rows_rejected"].get(f, {}).values()) for f in files)
  merged = sum(m["rows_merged"].get(f, 0) for f in files)
  assert read == m["num_interactions"] + rejected + merged, (
    m["rows_read"],
    m["rows_rejected"],
    m["rows_merged"],
  )


# ============================================================================ 1. duplicate rows


def test_cli_prepare_of_doubled_ratings_names_both_lines_and_writes_nothing(env, tmp_path):
  raw = (ML / RATINGS).read_bytes()
  d = _ml_copy(tmp_path / "ml", raw + raw)  # cat ratings ratings
  wd = tmp_path / "wd"
  wd.mkdir()
  r = _cli(env, wd, d, "--mode", "prepare")
  first = raw.split(b"\n", 1)[0].decode().split("::")
  assert _error_line(r).startswith(
    f"error: {d / RATINGS}:100001: fields 'UserID', 'MovieID': ({first[0]}, {first[1]}) "
    "repeat line 1 (set config.data.duplicates='first'"
  ), r.stderr[-2000:]
  assert [f for f in _files(wd) if "lock" not in f] == []  # nothing half-written


def test_movielens_duplicate_policies_and_row_accounting(tmp_path):
  raw = (ML / RATINGS).read_bytes()
  d = _ml_copy(tmp_path / "ml", raw + raw)
  clean = store.open_store(movielens.prepare(_ml_cfg(ML).data, tmp_path / "clean"))
  first = store.open_store(movielens.prepare(_ml_cfg(d, duplicates="first").data, tmp_path / "f"))
  m = first.manifest
  assert m["duplicates"] == "first" and m["rows_merged"] == {RATINGS: 100000}
  assert m["rows_rejected"] == {} and m["rows_read"][RATINGS] == 200000
  assert m["num_interactions"] == 100000
  _balance(m, [RATINGS])
  for c in ("user", "item", "scenario", "label", "split"):  # exactly the clean store
    np.testing.assert_array_equal(np.asarray(first.inter[c]), np.asarray(clean.inter[c]))
  skip = store.open_store(movielens.prepare(_ml_cfg(d, on_error="skip").data, tmp_path / "s"))
  m = skip.manifest
  assert m["rows_rejected"] == {RATINGS: {"duplicate_pair": 100000}} and m["rows_merged"] == {}
  assert m["num_interactions"] == 100000
  _balance(m, [RATINGS])
  # No pair is both a training and a test row.
  u, i, s = (np.asarray(skip.inter[c]).astype(np.int64) for c in ("user", "item", "split"))
  key = u * skip.num_items + i
  assert not np.isin(key[s == 2], key[s == 0]).any()


@pytest.mark.parametrize(
  "policy,label_of_pair,kept",
  [("first", 1.0, 10), ("last", 0.0, 10), ("max", 1.0, 10), ("keep", None, 12)],
)
def test_movielens_policy_keeps_the_right_row(tmp_path, policy, label_of_pair, kept):
  # (1, 1) rated 5, then 2, then 1 (lines 1, 11, 12): labels 1, 0, 0 (rating > 3).
  d = _small_ml(
    tmp_path / "ml", ratings=SMALL_RATINGS + ["1::1::2::978300761", "1::1::1::978300762"]
  )
  data = store.open_store(movielens.prepare(_ml_cfg(d, duplicates=policy).data, tmp_path / "o"))
  m = data.manifest
  assert m["num_interactions"] == kept
  u = data.user_raw_ids[np.asarray(data.inter["user"])]
  i = data.item_raw_ids[np.asarray(data.inter["item"])]
  rows = np.flatnonzero((u == "1") & (i == "1"))
  if policy == "keep":
    assert len(rows) == 3 and m["rows_repeated"] == {"ratings.dat": 2} and m["rows_merged"] == {}
  else:
    assert len(rows) == 1 and m["rows_merged"] == {"ratings.dat": 2}
    assert float(data.inter["label"][rows[0]]) == label_of_pair
  _balance(m, ["ratings.dat"])


def test_duplicates_option_is_validated(tmp_path):
  d = _small_ml(tmp_path / "ml")
  with pytest.raises(ValueError, match=r"config.data.duplicates='drop'; expected one of 'error'"):
    movielens.prepare(_ml_cfg(d, duplicates="drop").data, tmp_path / "o")
  assert not (tmp_path / "o").exists()


def test_resolve_duplicates_across_files_is_vectorised_and_names_both_lines(tmp_path):
  a, b = tmp_path / "a.csv", tmp_path / "b.csv"
  user = np.array([1, 2, 1, 3, 2, 1])
  item = np.array(["x", "y", "x", "x", "y", "x"])
  scen = np.array([0, 0, 1, 0, 0, 0])  # row 2 is another scenario: not a repeat
  lines = np.array([2, 3, 4, 2, 3, 4])
  files = np.array([0, 0, 0, 1, 1, 1])
  label = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
  detail = lambda i, j: f"({user[i]}, {item[i]}) repeat row {j}"  # noqa: E731
  args = dict(lines=lines, paths=[a, b], files=files, detail=detail, values=label)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{b}:3: (2, y) repeat row 1 (set config.data.duplicates='first'"),
  ):
    store.resolve_duplicates("error", store.Rejects("strict"), (user, item, scen), **args)
  rej = store.Rejects("skip")
  d = store.resolve_duplicates("error", rej, (user, item, scen), **args)
  assert d.rows.tolist() == [0, 1, 2, 3] and rej.as_dict() == {"b.csv": {"duplicate_pair": 2}}
  d = store.resolve_duplicates("first", store.Rejects("strict"), (user, item, scen), **args)
  assert d.rows.tolist() == [0, 1, 2, 3] and d.merged == {"b.csv": 2}
  assert d.values.tolist() == [0.0, 1.0, 1.0, 0.0]
  d = store.resolve_duplicates("last", store.Rejects("strict"), (user, item, scen), **args)
  assert d.rows.tolist() == [2, 3, 4, 5] and d.merged == {"a.csv": 2}
  d = store.resolve_duplicates("max", store.Rejects("strict"), (user, item, scen), **args)
  assert d.rows.tolist() == [0, 1, 2, 3] and d.values.tolist() == [1.0, 1.0, 1.0, 0.0]
  d = store.resolve_duplicates("keep", store.Rejects("strict"), (user, item, scen), **args)
  assert d.rows.tolist() == list(range(6)) and d.repeated == {"b.csv": 2} and d.merged == {}


# loader -> (repeated line, its file, default policy); the small clean files of
# test_data_sources get one line that repeats the key of their first data line.
DUP_CASES = {
  "gadtcdr": ("1\t1\t2", "douban_book_ratings.dat", "error"),
  "amazon": ("0\t0", "sport_cloth/test.txt", "error"),
  "douban_sample": ("1691,34964,0,book,北京,2007-07-10,27", "douban_sample.csv", "error"),
  "mind": ("U479610,N110473,1,sports,football_ncaa", "mind_sample.csv", "max"),
}


@pytest.mark.parametrize("loader", list(DUP_CASES))
def test_every_loader_detects_repeated_exposures(tmp_path, loader):
  fn, cfg_mod, files, header = LOADERS[loader]
  line, rel, default = DUP_CASES[loader]
  d = _write(tmp_path / "raw", loader, {rel: [*files[rel], line]})
  cfg = _data_cfg(cfg_mod)
  cfg.dir = str(d)
  n = sum(len(v) for v in files.values())
  lineno = len(files[rel]) + 1 + (header is not None)
  cfg.duplicates = "error"
  with pytest.raises(store.DataError, match=re.escape(f"{d / rel}:{lineno}:")) as e:
    fn(cfg, tmp_path / "o")
  assert re.search(r"(line|\.txt:)\s*\d", str(e.value).split(f":{lineno}:", 1)[1]), str(e.value)
  assert not (tmp_path / "o").exists()
  for policy in ("first", "max"):
    cfg.duplicates = policy
    m = store.open_store(fn(cfg, tmp_path / policy)).manifest
    assert m["num_interactions"] == n and m["rows_merged"] == {rel: 1}, m
    assert m["rows_read"][rel] == len(files[rel]) + 1
    _balance(m, list(files))
  cfg.duplicates = "keep"
  m = store.open_store(fn(cfg, tmp_path / "keep")).manifest
  assert m["num_interactions"] == n + 1 and m["rows_repeated"] == {rel: 1}
  assert _data_cfg(cfg_mod).duplicates == default  # documented in the config


def test_mind_default_merges_impressions_clicked_in_any(tmp_path):
  fn, _, files, _ = LOADERS["mind"]
  rows = files["mind_sample.csv"]
  d = _write(tmp_path / "raw", "mind", {"mind_sample.csv": [*rows, rows[0].replace(",0,", ",1,")]})
  cfg = _data_cfg("mind")
  cfg.dir = str(d)
  data = store.open_store(fn(cfg, tmp_path / "o"))
  u = data.user_raw_ids[np.asarray(data.inter["user"])]
  i = data.item_raw_ids[np.asarray(data.inter["item"])]
  (row,) = np.flatnonzero((u == "U479610") & (i == "N110473"))
  assert float(data.inter["label"][row]) == 1.0
  assert data.manifest["duplicates"] == "max" and data.manifest["rows_merged"] == {
    "mind_sample.csv": 1
  }


def _table_csv(path: Path, rows, header=("uid", "iid", "page", "click")):
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def _table_cfg(path, **kw):
  c = _data_cfg("table_example")
  c.path, c.user_id_col, c.item_id_col, c.scenario_col, c.label_col = (
    str(path),
    "uid",
    "iid",
    "page",
    "click",
  )
  c.user_cols, c.item_cols, c.label_threshold = (), (), 0.5
  for k, v in kw.items():
    c[k] = v
  return c


TABLE_ROWS = [
  ("1", "10", "home", "1"),
  ("2", "20", "feed", "0"),
  ("1", "20", "home", "0"),
  ("3", "10", "feed", "1"),
  ("2", "10", "home", "1"),
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_table_repeated_rows(tmp_path, fmt):
  rows = TABLE_ROWS + [("2", "20", "feed", "1")]  # repeats line 3's exposure
  path = _table_csv(tmp_path / "t.csv", rows)
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("uid", "iid", "page", "click")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({n: list(c) for n, c in zip(names, zip(*rows))}), path)
  where = "line 3" if fmt == "csv" else "row 2"
  at = 7 if fmt == "csv" else 6
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{path}:{at}: fields 'uid', 'iid', 'page': (2, 20, feed) repeat {where}"),
  ):
    table.prepare(_table_cfg(path), tmp_path / "o")
  m = store.open_store(table.prepare(_table_cfg(path, duplicates="max"), tmp_path / "m")).manifest
  assert m["num_interactions"] == 5 and m["rows_merged"] == {path.name: 1}
  _balance(m, [path.name])


def test_kuairand_default_merges_and_counts_repeats(tmp_path):
  logs = _write_release(tmp_path / "rel")
  cfg = _data_cfg("kuairand")
  cfg.dir, cfg.features_dir, cfg.include_random, cfg.top_tabs = str(tmp_path / "rel"), None, True, 0
  data = store.open_store(kuairand.prepare(cfg, tmp_path / "k"))
  rows = [r for f in sorted(logs) if "standard" in f for r in logs[f]]
  rows += logs["log_random_4_22_to_5_08_pure.csv"]  # the loader's file order
  best = {}
  for u, v, click, tab in rows:
    best[(u, v, tab)] = max(best.get((u, v, tab), 0), click)
  m = data.manifest
  assert m["num_interactions"] == len(best) < len(rows)
  assert sum(m["rows_merged"].values()) == len(rows) - len(best)
  u = data.user_raw_ids[np.asarray(data.inter["user"])].astype(int)
  v = data.item_raw_ids[np.asarray(data.inter["item"])].astype(int)
  tabs = [int(n.split("=")[1]) for n in data.scenario_names]
  t = np.asarray(tabs)[np.asarray(data.inter["scenario"])]
  got = {(a, b, c): lab for a, b, c, lab in zip(u, v, t, np.asarray(data.inter["label"]))}
  assert got == {k: float(x) for k, x in best.items()}
  assert m["duplicates"] == "max"  # the config's default
  _balance(m, [f for f in m["rows_read"] if f.startswith("log_")])


def test_aliccp_keeps_and_counts_repeated_impressions(tmp_path):
  d = tmp_path / "csv"
  d.mkdir()
  for f in ALI_FILES.values():
    (d / f).write_bytes((ALI_DIR / f).read_bytes())
  cfg = _data_cfg("aliccp")
  cfg.dir = str(d)
  keep = store.open_store(aliccp.prepare(cfg, tmp_path / "k")).manifest
  assert keep["duplicates"] == "keep" and keep["num_interactions"] == 200
  repeated = sum(keep["rows_repeated"].values())
  assert repeated > 0
  cfg.duplicates = "first"
  first = store.open_store(aliccp.prepare(cfg, tmp_path / "f")).manifest
  assert first["num_interactions"] == 200 - repeated
  assert sum(first["rows_merged"].values()) == repeated
  cfg.duplicates = "error"
  with pytest.raises(
    store.DataError,
    match=r"ali_ccp_\w+_sample\.csv:\d+: fields '101', '205', "
    r"'301': .* repeat (line \d+|ali_ccp_\w+\.csv:\d+)",
  ):
    aliccp.prepare(cfg, tmp_path / "e")


def test_synthetic_counts_repeated_draws(tmp_path):
  cfg = _data_cfg("synthetic")
  cfg.num_rows, cfg.num_users, cfg.num_items = 5000, 100, 50
  data = store.open_store(synthetic.prepare(cfg, tmp_path / "s"))
  u, i, k = (np.asarray(data.inter[c]).astype(np.int64) for c in ("user", "item", "scenario"))
  distinct = len(set(zip(u.tolist(), i.tolist(), k.tolist())))
  assert data.manifest["duplicates"] == "keep"
  assert data.manifest["rows_repeated"] == {"generated": 5000 - distinct} and distinct < 5000


# ============================================================================ 2. stale prepared data


def test_changed_source_is_not_reused(tmp_path, caplog):
  d = _ml_copy(tmp_path / "ml")
  wd = tmp_path / "wd"
  cfg = _ml_cfg(d)
  assert loop.prepare(cfg, wd).manifest["num_interactions"] == 100000
  manifest = (wd / "data" / "manifest.json").read_bytes()
  lines = (d / RATINGS).read_bytes().splitlines(keepends=True)
  (d / RATINGS).write_bytes(b"".join(lines[:50000]))  # cut to 50k rows
  with pytest.raises(store.DataError) as e:
    loop.prepare(cfg, wd)  # train / eval: not reused
  msg = str(e.value)
  assert msg.startswith(f"{d / RATINGS}: changed since {wd / 'data'} was prepared from it"), msg
  assert "run --mode prepare to prepare the data again, or use a new --workdir" in msg
  assert (wd / "data" / "manifest.json").read_bytes() == manifest
  # --mode prepare (force) prepares it again; then it is reused.
  assert loop.prepare(cfg, wd, force=True).manifest["num_interactions"] == 50000
  assert loop.prepare(cfg, wd).manifest["num_interactions"] == 50000


def test_touched_identical_source_and_old_manifests(tmp_path, caplog):
  d = _ml_copy(tmp_path / "ml")
  wd = tmp_path / "wd"
  cfg = _ml_cfg(d)
  loop.prepare(cfg, wd)
  st = (d / RATINGS).stat()
  os.utime(d / RATINGS, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
  with caplog.at_level("INFO", logger="sass_jax"):
    assert loop.prepare(cfg, wd).manifest["num_interactions"] == 100000
  assert "using prepared data" in caplog.text
  # A manifest written before sizes / mtimes / paths were recorded: sha256 decides.
  mpath = wd / "data" / "manifest.json"
  man = json.loads(mpath.read_text())
  for info in man["sources"].values():
    for k in ("bytes", "mtime_ns", "path"):
      info.pop(k, None)
  mpath.write_text(json.dumps(man))
  assert loop.prepare(cfg, wd).manifest["num_interactions"] == 100000
  raw = bytearray((d / RATINGS).read_bytes())
  j = raw.index(b"::", raw.index(b"::") + 2) + 2  # the first line's rating digit
  raw[j : j + 1] = b"1" if raw[j : j + 1] != b"1" else b"2"  # same size, other bytes
  (d / RATINGS).write_bytes(bytes(raw))
  with pytest.raises(store.DataError, match=re.escape(f"{d / RATINGS}: changed since")):
    loop.prepare(cfg, wd)


def test_cli_train_on_changed_source_is_one_error_line(env, tmp_path):
  d = _ml_copy(tmp_path / "ml")
  wd = tmp_path / "wd"
  loop.prepare(_ml_cfg(d), wd)
  before = {p: (wd / p).stat().st_mtime_ns for p in _files(wd)}
  lines = (d / RATINGS).read_bytes().splitlines(keepends=True)
  (d / RATINGS).write_bytes(b"".join(lines[:50000]))
  r = _cli(env, wd, d, "--mode", "train", "--config.train.num_steps=2")
  assert _error_line(r).startswith(
    f"error: {d / RATINGS}: changed since {wd / 'data'} was prepared from it"
  ), r.stderr[-2000:]
  assert "using prepared data" not in r.stderr
  after = {p: (wd / p).stat().st_mtime_ns for p in _files(wd) if "lock" not in p}
  assert after == before


# ============================================================================ 7. ids that do not fit

BIG = 2**63


def test_movielens_id_beyond_int64_is_a_rejected_row(tmp_path):
  users = [
    "1::F::1::10::48067",
    f"{BIG}::M::56::16::70072",
    f"{BIG + 1}::M::25::15::55117",
    "4::M::45::7::02460",
  ]
  ratings = [
    "1::1::5::978300760",
    f"{BIG}::1::4::978301968",
    f"{BIG + 1}::2::5::978824291",
    "4::3::5::978300760",
  ]
  d = _small_ml(tmp_path / "ml", users=users, ratings=ratings)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{d / 'users.dat'}:2: field 'UserID': {BIG} does not fit a 64-bit integer"),
  ):
    movielens.prepare(_ml_cfg(d).data, tmp_path / "o")
  assert not (tmp_path / "o").exists()
  data = store.open_store(movielens.prepare(_ml_cfg(d, on_error="skip").data, tmp_path / "s"))
  m = data.manifest
  assert m["rows_rejected"] == {"users.dat": {"bad_UserID": 2}, "ratings.dat": {"bad_UserID": 2}}
  assert sorted(data.user_raw_ids.tolist()) == ["1", "4"]  # no '1.0', no merged users
  _balance(m, ["ratings.dat"])


def test_table_numeric_id_beyond_int64_is_rejected(tmp_path):
  rows = TABLE_ROWS + [(str(2**64), "10", "home", "1"), (str(2**64 + 1), "10", "home", "0")]
  path = _table_csv(tmp_path / "t.csv", rows)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{path}:7: field 'uid': {2**64} does not fit a 64-bit integer"),
  ):
    table.prepare(_table_cfg(path, numeric_ids=True), tmp_path / "o")
  m = store.open_store(
    table.prepare(_table_cfg(path, numeric_ids=True, on_error="skip"), tmp_path / "s")
  ).manifest
  assert m["rows_rejected"] == {"t.csv": {"bad_uid": 2}} and m["num_interactions"] == 5


def test_douban_sample_id_beyond_int32_is_rejected(tmp_path):
  fn, _, files, header = LOADERS["douban_sample"]
  rows = files["douban_sample.csv"]
  d = _write(
    tmp_path / "raw",
    "douban_sample",
    {"douban_sample.csv": [*rows, f"{BIG},6,1,book,北京,2007-07-10,27"]},
  )
  cfg = _data_cfg("douban_sample")
  cfg.dir = str(d)
  with pytest.raises(
    store.DataError,
    match=re.escape(
      f"douban_sample.csv:{len(rows) + 2}: field 'user_id': {BIG} does not fit [0, 2147483647]"
    ),
  ):
    fn(cfg, tmp_path / "o")


def test_aliccp_ids_are_exact_integers_not_floats(tmp_path):
  d = tmp_path / "csv"
  d.mkdir()
  for f in ALI_FILES.values():
    (d / f).write_bytes((ALI_DIR / f).read_bytes())
  tr = d / ALI_FILES["train"]
  lines = tr.read_text().splitlines()
  col = lines[0].split(",").index("101")
  for k, uid in ((1, "9007199254740993"), (2, "9007199254740992")):  # 2**53 + 1, 2**53
    parts = lines[k].split(",")
    parts[col] = uid
    lines[k] = ",".join(parts)
  tr.write_text("\n".join(lines) + "\n")
  cfg = _data_cfg("aliccp")
  cfg.dir = str(d)
  data = store.open_store(aliccp.prepare(cfg, tmp_path / "a"))
  raw = data.user_raw_ids.tolist()
  assert "9007199254740993" in raw and "9007199254740992" in raw  # two users, not merged


# ============================================================================ encoding


@pytest.mark.parametrize("bad_line", [10, 2000])
def test_csv_with_a_non_utf8_byte_names_its_line(tmp_path, bad_line):
  uniq = [(str(k), str(k % 37), ("home", "feed")[k % 2], str(k % 2)) for k in range(2500)]
  path = _table_csv(tmp_path / "t.csv", uniq)
  lines = path.read_bytes().split(b"\n")
  lines[bad_line - 1] = lines[bad_line - 1].replace(b",", b"\xff,", 1)  # in field 'uid'
  path.write_bytes(b"\n".join(lines))
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{path}:{bad_line}: not valid UTF-8: byte 0xff in field 'uid'"),
  ):
    table.prepare(_table_cfg(path), tmp_path / "o")
  m = store.open_store(table.prepare(_table_cfg(path, on_error="skip"), tmp_path / "s")).manifest
  assert m["rows_rejected"] == {"t.csv": {"bad_encoding": 1}}
  assert m["num_interactions"] == len(uniq) - 1 and m["rows_read"] == {"t.csv": len(uniq)}


def test_douban_csv_with_a_non_utf8_byte_rejects_only_that_row(tmp_path):
  fn, _, files, _ = LOADERS["douban_sample"]
  rows = files["douban_sample.csv"]
  d = _write(tmp_path / "raw", "douban_sample")
  p = d / "douban_sample.csv"
  lines = p.read_bytes().split(b"\n")
  lines[4] = lines[4].replace("北京".encode(), b"\xe5\x8c")  # line 5: a cut character
  p.write_bytes(b"\n".join(lines))
  cfg = _data_cfg("douban_sample")
  cfg.dir = str(d)
  with pytest.raises(
    store.DataError, match=re.escape(f"{p}:5: not valid UTF-8: byte 0xe5 in field 'living_place'")
  ):
    fn(cfg, tmp_path / "o")
  cfg.on_error = "skip"
  m = store.open_store(fn(cfg, tmp_path / "s")).manifest
  assert m["rows_rejected"] == {"douban_sample.csv": {"bad_encoding": 1}}
  assert m["num_interactions"] == len(rows) - 1


# ============================================================================ MovieLens accounting


def test_movielens_rows_read_counts_rejected_lines_and_checks_timestamps(tmp_path):
  base = SMALL_RATINGS
  ratings = (
    base[:3] + ["1::2::3"] + base[3:5] + ["2::2::4::abc"] + base[5:7] + ["3::1::4::-5"] + base[7:]
  )
  d = _small_ml(tmp_path / "ml", ratings=ratings)
  with pytest.raises(store.DataError, match=re.escape(f"{d / 'ratings.dat'}:4: 3 '::'-separated")):
    movielens.prepare(_ml_cfg(d).data, tmp_path / "o")
  ratings[3] = base[0].replace("1::1::", "2::2::")
  d2 = _small_ml(tmp_path / "ml2", ratings=ratings)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{d2 / 'ratings.dat'}:7: field 'Timestamp': expected an integer, got 'abc'"),
  ):
    movielens.prepare(_ml_cfg(d2).data, tmp_path / "o")
  ratings[6] = base[0].replace("1::1::", "3::1::")
  d3 = _small_ml(tmp_path / "ml3", ratings=ratings)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{d3 / 'ratings.dat'}:10: field 'Timestamp': -5 does not fit [0, "),
  ):
    movielens.prepare(_ml_cfg(d3).data, tmp_path / "o")
  m = store.open_store(movielens.prepare(_ml_cfg(d, on_error="skip").data, tmp_path / "s")).manifest
  assert m["rows_rejected"] == {"ratings.dat": {"wrong_field_count": 1, "bad_Timestamp": 2}}
  assert m["rows_read"]["ratings.dat"] == 13 and m["num_interactions"] == 10
  _balance(m, ["ratings.dat"])


def test_table_label_inf_is_rejected_like_nan(tmp_path):
  rows = TABLE_ROWS + [("4", "10", "home", "inf"), ("5", "10", "home", "nan")]
  path = _table_csv(tmp_path / "t.csv", rows)
  with pytest.raises(
    store.DataError,
    match=re.escape(f"{path}:7: field 'click': expected a finite number, got 'inf'"),
  ):
    table.prepare(_table_cfg(path), tmp_path / "o")
  m = store.open_store(table.prepare(_table_cfg(path, on_error="skip"), tmp_path / "s")).manifest
  assert m["rows_rejected"] == {"t.csv": {"bad_label": 2}} and m["num_interactions"] == 5


# ============================================================================ damaged store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
  d = _small_ml(tmp_path_factory.mktemp("ml") / "ml")
  return movielens.prepare(_ml_cfg(d).data, tmp_path_factory.mktemp("st") / "data")


@pytest.mark.parametrize(
  "damage,file,what",
  [
    ("truncate", "interactions/label.npy", "unreadable"),
    ("truncate", "users/raw_id.npy", "unreadable"),
    ("delete", "items/genres.mask.npy", "file missing"),
    ("garble", "manifest.json", "unreadable manifest"),
    ("short", "interactions/user.npy", "3 rows, but the manifest says 10"),
  ],
)
def test_damaged_store_error_names_the_file(small_store, tmp_path, damage, file, what):
  s = tmp_path / "data"
  shutil.copytree(small_store, s)
  f = s / file
  if damage == "truncate":
    f.write_bytes(f.read_bytes()[:-7])
  elif damage == "delete":
    f.unlink()
  elif damage == "garble":
    f.write_text(f.read_text()[:40])
  else:
    np.save(f, np.zeros(3, np.int32))
  with pytest.raises(store.DataError) as e:
    store.open_store(s)
  assert str(e.value).startswith(f"{f}: {what}"), str(e.value)
  assert "run --mode prepare to prepare it again" in str(e.value)


def test_cli_damaged_manifest_is_one_error_line(env, tmp_path, small_store):
  wd = tmp_path / "wd"
  shutil.copytree(small_store, wd / "data")
  m = wd / "data" / "manifest.json"
  data_dir = json.loads(m.read_text())["options"]["dir"]
  m.write_text(m.read_text()[:-20])
  before = _files(wd)
  r = _cli(env, wd, data_dir, "--mode", "train", "--config.train.num_steps=2")
  assert _error_line(r).startswith(f"error: {m}: unreadable manifest ("), r.stderr[-2000:]
  assert [f for f in _files(wd) if "lock" not in f] == before


# ============================================================================ disk full


def test_cli_prepare_beyond_the_file_size_limit_is_one_error_line(env, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  r = _cli(env, wd, ML, "--mode", "prepare", limit_fsize=64 * 1024)
  line = _error_line(r)
  assert re.match(
    rf"error: file too large \(the file size limit was reached\) while writing "
    rf"{re.escape(str(wd / 'data'))}/\w+/\w+(\.mask)?\.npy; nothing was written to "
    rf"{re.escape(str(wd / 'data'))}$",
    line,
  ), line
  assert [f for f in _files(wd) if "lock" not in f] == []  # the temporary copy is gone


def test_no_space_left_names_the_file_and_keeps_the_old_store(tmp_path, monkeypatch):
  d = _small_ml(tmp_path / "ml")
  out = tmp_path / "wd" / "data"
  movielens.prepare(_ml_cfg(d).data, out)
  before = {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()}
  calls = {"n": 0}
  real = np.save

  def save(f, arr, **kw):
    calls["n"] += 1
    if calls["n"] == 4:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(f, arr, **kw)

  monkeypatch.setattr(store.np, "save", save)
  with pytest.raises(store.DataError) as e:
    movielens.prepare(_ml_cfg(d, min_count=2).data, out)
  assert re.fullmatch(
    rf"no space left on device while writing {re.escape(str(out))}/users/\w+\.npy; "
    rf"nothing was written to {re.escape(str(out))}",
    str(e.value),
  ), str(e.value)
  assert sorted(p.name for p in out.parent.iterdir()) == ["data"]
  assert {p: (out / p).read_bytes() for p in _files(out) if (out / p).is_file()} == before


# ============================================================================ killed prepares


def _host() -> str:
  """This host's name as it appears in the store's temporary directory names."""
  return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_temporary_copies_of_killed_prepares_are_removed(tmp_path, small_store):
  wd = tmp_path / "wd"
  shutil.copytree(small_store, wd / "data")
  cfg = _ml_cfg(json.loads((wd / "data" / "manifest.json").read_text())["options"]["dir"])
  host = _host()
  dead = _dead_pid()
  live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    stale = [
      f".data.tmp-{host}-{dead}-x1y2",
      f".data.old-{dead}",
      f".data.old-{host}-{dead}",
      f".data.gen-{host}-{dead}-abc",
    ]
    kept = [
      f".data.tmp-{host}-{live.pid}-q",
      f".data.tmp-otherhost-{dead}-q",
      ".data.tmp-zz9",
      f".other.tmp-{host}-{dead}-q",
    ]
    for n in stale + kept:
      (wd / n / "users").mkdir(parents=True)
      (wd / n / "users" / "user_id.npy").write_bytes(b"x" * 1000)
    loop.prepare(cfg, wd)  # a later run (data reused)
    assert sorted(p.name for p in wd.iterdir()) == sorted(["data", *kept])
  finally:
    live.kill()
    live.wait()


def test_old_store_left_between_the_two_renames_is_restored(tmp_path, small_store):
  wd = tmp_path / "wd"
  dead = _dead_pid()
  shutil.copytree(small_store, wd / f".data.old-{_host()}-{dead}")  # data itself missing
  (wd / f".data.tmp-{_host()}-{dead}-abc").mkdir()
  manifest = json.loads((small_store / "manifest.json").read_text())
  data = loop.prepare(_ml_cfg(manifest["options"]["dir"]), wd)  # restored, then reused
  assert data.manifest == manifest
  assert sorted(p.name for p in wd.iterdir()) == ["data"]
