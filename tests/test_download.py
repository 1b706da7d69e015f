"""--config.data.download=True: the GroupLens archive is verified by MD5 (no network in tests)."""

import hashlib
import io
import zipfile

import pytest

from sass_jax.data import movielens, store


def _fake_zip(with_files=True) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    if with_files:
      z.writestr("ml-1m/users.dat", "1::F::1::10::48067\n")
  return buf.getvalue()


def _patch_download(monkeypatch, payload: bytes, calls: list):
  def fake_urlretrieve(url, dest):
    calls.append(url)
    with open(dest, "wb") as f:
      f.write(payload)

  monkeypatch.setattr(movielens.urllib.request, "urlretrieve", fake_urlretrieve)


def test_checksum_mismatch_raises_and_deletes_archive(tmp_path, monkeypatch):
  calls = []
  _patch_download(monkeypatch, _fake_zip(), calls)
  with pytest.raises(
    store.DataError,
    match=r"ml-1m\.zip: MD5 [0-9a-f]{32} does not match GroupLens' " + movielens.ML1M_MD5,
  ):
    movielens.download(tmp_path)
  assert calls == [movielens.ML1M_URL]
  assert not (tmp_path / "ml-1m.zip").exists()
  assert not (tmp_path / "ml-1m").exists()


def test_matching_checksum_unpacks(tmp_path, monkeypatch):
  payload = _fake_zip()
  monkeypatch.setattr(movielens, "ML1M_MD5", hashlib.md5(payload).hexdigest())
  calls = []
  _patch_download(monkeypatch, payload, calls)
  out = movielens.download(tmp_path)
  assert out == tmp_path / "ml-1m"
  assert (out / "users.dat").read_text() == "1::F::1::10::48067\n"
  # A second call reuses the verified archive instead of downloading again.
  movielens.download(tmp_path)
  assert len(calls) == 1
