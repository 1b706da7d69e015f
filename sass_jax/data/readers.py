"""Readers shared by the Douban, Amazon and MIND loaders (docs/design.md §4).

A vectorised reader of delimited integer files with a per-line fallback that names the bad line
(``read_int_table``), a CSV row reader (``read_csv_rows``), the source bytes with one-line errors
(``read_source``), and a vocabulary column built from training-row values (``vocab_column``).
Rejected rows are counted in a ``store.Rejects``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from sass_jax.data import store
from sass_jax.data.store import Rejects
from sass_jax.schema import FieldSpec

INT32_MAX = np.iinfo(np.int32).max


def read_source(path: Path, what: str) -> bytes:
  """The bytes of ``path``; FileNotFoundError / DataError (empty file) naming it."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: file not found (expected {what})")
  raw = path.read_bytes()
  if not raw.strip():
    raise store.DataError(f"{path}: file is empty")
  return raw


def _fast_int_table(raw: bytes, sep: bytes, ncol: int):
  """int64 [n, ncol] if ``raw`` is clean (digits and separators only, ncol fields per line, no
  empty field or line, no value over 10 digits); None otherwise (the caller then goes line by
  line to name the bad line)."""
  if not raw.endswith(b"\n"):
    raw = raw + b"\n"
  buf = np.frombuffer(raw, np.uint8)
  is_sep, is_nl = buf == sep[0], buf == 10
  delim = is_sep | is_nl
  if not np.all(delim | ((buf >= 48) & (buf <= 57))):
    return None
  if delim[0] or np.any(delim[1:] & delim[:-1]):
    return None
  dpos = np.flatnonzero(delim)
  if np.diff(np.concatenate([[-1], dpos])).max() > 11:
    return None
  nl = np.flatnonzero(is_nl)
  per_line = np.diff(np.concatenate([[0], np.cumsum(is_sep)[nl]]))
  if np.any(per_line != ncol - 1):
    return None
  tokens = raw.replace(sep, b"\n").split()
  return np.array(tokens).astype(np.int64).reshape(len(nl), ncol)


def read_int_table(
  path: Path, columns: tuple[str, ...], rej: Rejects, what: str, sep: bytes = b"\t"
):
  """Read a headerless file of ``len(columns)`` non-negative integers per line.

  Returns (values int64 [n, ncol], linenos int64 [n], rows_read). Blank lines are ignored; a line
  with the wrong field count, a non-integer or negative value, or a value over 2**31 - 1 is
  rejected (strict: DataError naming file:line and field). Clean files take a vectorised path;
  otherwise lines are checked one by one. Raises FileNotFoundError / DataError for a missing or
  empty file.
  """
  path = Path(path)
  raw = read_source(path, what)
  ncol = len(columns)
  vals = _fast_int_table(raw, sep, ncol)
  if vals is not None:
    linenos = np.arange(1, len(vals) + 1, dtype=np.int64)
    n_read = len(vals)
  else:
    rows, lines, n_read = [], [], 0
    sep_name = "tab" if sep == b"\t" else repr(sep.decode())
    for lineno, line in enumerate(raw.splitlines(), start=1):
      if not line.strip():
        continue
      n_read += 1
      parts = line.split(sep)
      if len(parts) != ncol:
        rej.reject(
          path,
          lineno,
          "wrong_field_count",
          f"{len(parts)} {sep_name}-separated fields, expected {ncol} ({', '.join(columns)})",
        )
        continue
      row = []
      for name, p in zip(columns, parts):
        p = p.strip()
        if not p.isdigit():
          rej.reject(
            path,
            lineno,
            f"bad_{name}",
            f"field {name!r}: expected a non-negative integer, got "
            f"{p.decode('utf-8', 'replace')!r}",
          )
          break
        row.append(int(p))
      else:
        rows.append(row)
        lines.append(lineno)
    vals = np.asarray(rows, np.int64).reshape(len(rows), ncol)
    linenos = np.asarray(lines, np.int64)
  keep = np.ones(len(vals), bool)
  for j, name in enumerate(columns):
    bad = keep & (vals[:, j] > INT32_MAX)
    keep &= rej.reject_rows(
      path,
      bad,
      linenos,
      f"bad_{name}",
      lambda i, j=j, name=name: f"field {name!r}: {vals[i, j]} exceeds {INT32_MAX}",
    )
  return vals[keep], linenos[keep], n_read


def read_csv_rows(path: Path, columns: tuple[str, ...], rej: Rejects, what: str):
  """Yield (lineno, dict) for the rows of a UTF-8 CSV whose header is exactly ``columns``.

  A row with the wrong field count or a byte that is not UTF-8 ('bad_encoding', naming the
  row's line) is rejected (under 'skip' it is yielded as (lineno, None) so the caller can count
  it as read); a wrong or undecodable header raises DataError (line 1). Blank lines are ignored.
  Raises FileNotFoundError / DataError for a missing or empty file.
  """
  from sass_jax.data.table import bad_utf8

  path = Path(path)
  raw = read_source(path, what)
  # surrogateescape keeps an undecodable byte in its row (as U+DC80..U+DCFF), so the row -- and
  # only that row -- is rejected with its true line number.
  text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
  reader = csv.reader(io.StringIO(text, newline=""))
  header = next(reader)
  if bad_utf8(header):
    raise store.DataError(f"{path}:1: header is not valid UTF-8 ({bad_utf8(header)})")
  if tuple(h.strip() for h in header) != tuple(columns):
    raise store.DataError(f"{path}:1: header {','.join(header)!r}, expected {','.join(columns)!r}")
  n = len(columns)
  for row in reader:
    lineno = reader.line_num
    if not row or (len(row) == 1 and not row[0].strip()):
      continue
    if len(row) != n:
      rej.reject(
        path,
        lineno,
        "wrong_field_count",
        f"{len(row)} comma-separated fields, expected {n} ({', '.join(columns)})",
      )
      yield lineno, None  # counted as read (and rejected) by the caller
      continue
    bad = bad_utf8(row, columns)
    if bad:
      rej.reject(path, lineno, "bad_encoding", f"not valid UTF-8: {bad}")
      yield lineno, None
      continue
    yield lineno, dict(zip(columns, row))


def vocab_column(name: str, train_values, entity_values, min_count: int, missing=None):
  """(int32 ids [num_entities], FieldSpec) with a vocabulary built from training-row values.

  ``missing``: a value (e.g. the empty string) that always maps to the unknown id 0.
  """
  train_values = np.asarray(train_values)
  if missing is not None:
    train_values = train_values[train_values != missing]
  vocab = store.build_vocab(train_values, min_count)
  return store.apply_vocab(np.asarray(entity_values), vocab), FieldSpec(name, len(vocab) + 1)
