"""Host memory policy of a training process: keep freed memory for the next step (glibc).

XLA:CPU allocates a step's temporaries as one buffer per execution (about 200 MB for the
fine-tune step of ``configs/aliccp_scale.py`` at batch 4096) and frees it at the end. glibc's
malloc serves an allocation that large from a fresh ``mmap`` and returns it with ``munmap``, so
every step touches about 49,000 new 4 KiB pages, each a page fault that the kernel zero-fills:
78 ms of system CPU time per step there, and 235 ms of wall time per bfloat16 step against
214 ms with the memory kept (two cores; docs/design.md §6, BENCHMARKS.md).

``keep_freed_memory()`` asks glibc (``mallopt``) to serve every thread from the main heap
(``M_ARENA_MAX`` = 1: a thread's own arena cannot hold a block above 64 MB and falls back to
``mmap``), never to ``mmap`` (``M_MMAP_MAX`` = 0) and to give freed memory back to the system
only above 2 GiB of free heap (``M_TRIM_THRESHOLD``). The process then keeps its peak host
memory, as a TCMalloc or jemalloc process does. It acts on arenas made after the call: call it
first thing in a process, before JAX starts its worker threads (the CLIs do, through
``keep_freed_memory_or_exit``: ``sass_jax.main``, ``sass_jax.bench.*``).
``SASS_JAX_MALLOC=system`` leaves malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)
ENV = "SASS_JAX_MALLOC"  # 'system': keep_freed_memory() does nothing


def keep_freed_memory() -> bool:
  """Apply the policy of the module docstring; returns True when it is in force, False where it
  does not apply (``SASS_JAX_MALLOC=system``, a platform other than Linux, a C library without
  glibc's ``mallopt``, e.g. musl). Raises ValueError for another value of
  ``SASS_JAX_MALLOC`` (it takes 'system', 'keep' or nothing)."""
  choice = os.environ.get(ENV, "keep") or "keep"
  if choice not in ("keep", "system"):
    raise ValueError(f"{ENV}={choice!r}: expected 'keep' (the default) or 'system'")
  if choice == "system" or not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(
    mallopt(param, value) == 1
    for param, value in (
      (M_ARENA_MAX, 1),
      (M_MMAP_MAX, 0),
      (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    )
  )


def keep_freed_memory_or_exit() -> bool:
  """``keep_freed_memory()`` for a command-line entry point: a bad ``SASS_JAX_MALLOC`` prints
  one line ``error: ...`` to stderr and exits with code 1 (SystemExit)."""
  try:
    return keep_freed_memory()
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
