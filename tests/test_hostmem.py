"""sass_jax/hostmem.py: freed host memory is kept for the next step (glibc's malloc)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sass_jax import hostmem

# A worker thread mallocs, fills and frees 256 MiB twice (as XLA:CPU's worker threads do with a
# step's temporaries); prints the minor page faults of the second round.
PROBE = textwrap.dedent(
  """
  import ctypes, ctypes.util, json, resource, threading
  from sass_jax import hostmem
  kept = hostmem.keep_freed_memory()
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
  libc.free.argtypes = [ctypes.c_void_p]
  n, out = 1 << 28, {}
  def work():
    for i in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      p = libc.malloc(n)
      ctypes.memset(p, 1, n)
      out[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
      libc.free(p)
  t = threading.Thread(target=work)
  t.start(); t.join()
  print(json.dumps({"kept": kept, "faults": out[1]}))
  """
)
PAGES = (1 << 28) // 4096  # 65,536 pages of 4 KiB


def _probe(value: str | None) -> dict:
  env = {k: v for k, v in os.environ.items() if k != hostmem.ENV}
  if value is not None:
    env[hostmem.ENV] = value
  r = subprocess.run(
    [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120
  )
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_second_allocation_reuses_the_freed_pages():
  kept = _probe(None)
  system = _probe("system")
  assert kept["kept"] is True and system["kept"] is False
  # as is, the freed block went back to the system: every page faults again
  assert system["faults"] > 0.9 * PAGES, system
  # kept: the same pages serve the second allocation
  assert kept["faults"] < 0.05 * PAGES, kept


def test_a_bad_setting_is_one_clear_error(monkeypatch):
  monkeypatch.setenv(hostmem.ENV, "tcmalloc")
  with pytest.raises(ValueError, match="SASS_JAX_MALLOC='tcmalloc'"):
    hostmem.keep_freed_memory()


def test_system_leaves_malloc_alone(monkeypatch):
  monkeypatch.setenv(hostmem.ENV, "system")
  assert hostmem.keep_freed_memory() is False
