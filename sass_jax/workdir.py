"""One run at a time per workdir, and file-system failures as one clear line.

:func:`lock` takes an exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` for the life of the process
(every CLI mode that writes to the workdir takes it; in a multi-process run only process 0 does).
The lock file holds the owner's pid. A second run on the same workdir fails at once with
``WorkdirError: WORKDIR is in use by pid N``. The kernel releases a ``flock`` when its process
ends, however it ends, so a crashed run never leaves a stale lock; the file itself stays,
except in a workdir the run created and wrote nothing else to (removed at exit).

:func:`os_error_message` turns a disk-full, file-too-large, read-only or permission error
(``errno`` ENOSPC, EFBIG, EDQUOT, EROFS, EACCES, EPERM) found anywhere in an exception's
``__cause__`` / ``__context__`` chain -- or in the text of a wrapped tensorstore / orbax error --
into one sentence naming the path and the cause.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import re
import sys
import threading
import traceback
from pathlib import Path

LOCK_FILE = ".lock"
# errno -> the cause, as a user reads it.
CAUSES = {
  errno.ENOSPC: "no space left on device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EFBIG: "file too large (the file-size limit or the file system's maximum was reached)",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}
# The same causes as C libraries spell them inside wrapped messages (tensorstore, absl status).
_TEXT = [
  (re.compile(p, re.I), e)
  for p, e in (
    (r"no space left on device|\bENOSPC\b|os_error_code='?28\b|errno 28\b", errno.ENOSPC),
    (r"disk quota exceeded|\bEDQUOT\b", errno.EDQUOT),
    (r"file too large|\bEFBIG\b|os_error_code='?27\b|errno 27\b", errno.EFBIG),
    (r"read-only file system|\bEROFS\b|os_error_code='?30\b|errno 30\b", errno.EROFS),
    (r"permission denied|\bEACCES\b|os_error_code='?13\b|errno 13\b", errno.EACCES),
  )
]
_PATHS_IN_TEXT = (
  re.compile(r'Failed writing: "([^"]+)"'),
  re.compile(r"(?:file|path|directory)\s*[\"'`]?(/[^\s\"'`,;\]]+)", re.I),
)
_ORBAX_TMP = re.compile(r"\.orbax-checkpoint-tmp[^/\"']*")
_WRITE_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # '... while writing PATH'

_HELD: dict[str, int] = {}  # absolute workdir -> fd of its lock file, held until the process ends
_CREATED: list[Path] = []  # workdirs this process created (removed at exit if only .lock is in)


def remove_unused_workdirs() -> None:
  """At exit: a workdir this process created that holds nothing but its lock file (the run
  failed before writing anything, e.g. a missing data directory) is removed, lock and all."""
  for path in _CREATED:
    try:
      if [p.name for p in path.iterdir()] == [LOCK_FILE]:
        (path / LOCK_FILE).unlink()
        path.rmdir()
    except OSError:  # gone, not empty after all, or not ours to remove: leave it
      pass


class WorkdirError(OSError):
  """The workdir cannot be used: held by another run, not a directory, or not writable (the
  message is one line naming the path and the cause)."""


def lock(workdir: str | os.PathLike) -> Path:
  """Create ``workdir`` if needed, check it is a writable directory and take its lock.

  The lock (``WORKDIR/.lock``, holding this process's pid) is kept until the process ends;
  taking it again in the same process is a no-op. A workdir created here that holds only the
  lock file when the process exits (the run failed before writing anything) is removed then.
  Returns the lock file's path.

  Raises:
    WorkdirError: ``WORKDIR is in use by pid N`` when another process holds the lock;
      ``WORKDIR is not a directory`` when a file is in the way; ``cannot write to WORKDIR:
      <cause>`` when the directory cannot be created or written (read-only file system, no
      permission). Nothing is written in any of these cases.
  """
  given = os.fspath(workdir)
  path = Path(given)
  key = os.path.abspath(given)
  if key in _HELD:
    return path / LOCK_FILE
  if path.exists() and not path.is_dir():
    raise WorkdirError(
      f"--workdir {given} is not a directory (a file is in the way); give a "
      "new directory or remove the file"
    )
  created = not path.exists()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create the workdir {given}: {_cause(e)}") from None
  if created:
    if not _CREATED:
      atexit.register(remove_unused_workdirs)
    _CREATED.append(path)
  # access() sees a read-only file system and missing permissions before any work is done
  # (root passes the permission test, but not the read-only one).
  if not os.access(path, os.W_OK | os.X_OK):
    cause = CAUSES[errno.EROFS] if _read_only_fs(path) else CAUSES[errno.EACCES]
    raise WorkdirError(f"cannot write to the workdir {given}: {cause}")
  try:
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"cannot write to the workdir {given}: {_cause(e)}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      os.close(fd)
      raise WorkdirError(f"cannot lock the workdir {given}: {_cause(e)}") from None
    holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
    os.close(fd)
    raise WorkdirError(f"{given} is in use by pid {holder}") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  _HELD[key] = fd
  return path / LOCK_FILE


def release(workdir: str | os.PathLike) -> None:
  """Release this process's lock on ``workdir`` (if held); the lock file stays."""
  fd = _HELD.pop(os.path.abspath(os.fspath(workdir)), None)
  if fd is not None:
    os.close(fd)  # closing the only descriptor releases the flock


def _read_only_fs(path: Path) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def _cause(e: OSError) -> str:
  return CAUSES.get(e.errno, e.strerror or str(e))


def _chain(exc: BaseException):
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__


def _in_text(text: str):
  """(errno, path or None) of the first file-system cause named in ``text``, else None."""
  for pattern, code in _TEXT:
    if pattern.search(text):
      for p in _PATHS_IN_TEXT:
        if m := p.search(text):
          return code, m.group(1)
      return code, None
  return None


def os_error_message(exc: BaseException, workdir: str | os.PathLike | None = None) -> str | None:
  """One line for a file-system failure behind ``exc``, or None if there is none.

  Looks through ``exc`` and its ``__cause__`` / ``__context__`` chain for an ``OSError``
  whose errno is in :data:`CAUSES` (else for that cause in the text of a wrapped error, e.g.
  tensorstore's ``[os_error_code='28']``) and returns e.g. ``no space left on device while
  writing runs/x/checkpoints/finetune/20/state/...`` (or ``read-only file system: PATH``):
  the path of the error if it has one (an orbax temporary directory named as the step it
  was to become), else a path mentioned in its text, else ``workdir``. None for a
  :class:`WorkdirError`, whose message says it already.
  """
  if isinstance(exc, WorkdirError):
    return None  # already one line naming the workdir and the cause
  found = None
  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in CAUSES and not isinstance(e, WorkdirError):
      found = (e.errno, e.filename)
      break
  if found is None:
    for e in _chain(exc):
      if (found := _in_text(str(e))) is not None:
        break
  if found is None:
    return None
  return _sentence(*found, workdir)


def _sentence(code: int, where, workdir=None) -> str:
  where = os.fspath(where) if where else (os.fspath(workdir) if workdir is not None else None)
  if where:
    where = _ORBAX_TMP.sub("", where).rstrip("/") or where
  if not where:
    return CAUSES[code]
  return (
    f"{CAUSES[code]} while writing {where}" if code in _WRITE_CAUSES else f"{CAUSES[code]}: {where}"
  )


class _Echoes(logging.Filter):
  """Drops log records, thread exceptions and 'unraisable' reports that repeat a file-system
  failure (and the 'Event loop is closed' errors of callbacks that outlive it), keeping the
  first one's sentence in :attr:`seen`."""

  def __init__(self):
    super().__init__()
    self.seen: list[str] = []

  def _echo(self, text: str) -> bool:
    if (found := _in_text(text)) is not None:
      if not self.seen:
        self.seen.append(_sentence(*found))
      return True
    # A background orbax / tensorstore callback on a loop a failed step already closed: an
    # echo of that failure (which the CLI reports itself), never news for the user.
    return "Event loop is closed" in text

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == "sass_jax" or record.name.startswith("jax"):
      return True  # ours, and JAX's (a compilation-cache write that fails is harmless)
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-exception-caught
      return True  # the handler reports a malformed record itself
    if record.exc_info and record.exc_info[1] is not None:
      text += "\n" + "".join(traceback.format_exception_only(record.exc_info[1]))
    return not self._echo(text)


def quiet_os_error_echoes() -> _Echoes:
  """Silence the echoes of a file-system failure in other threads (orbax / tensorstore /
  asyncio log and print the same error once per array); the CLI reports it once itself.
  Returns the filter; its ``seen`` lists the failures silenced (first one's sentence)."""
  echoes = _Echoes()
  for h in logging.getLogger().handlers:
    h.addFilter(echoes)
  old_thread, old_unraisable, old_except = threading.excepthook, sys.unraisablehook, sys.excepthook

  def thread_hook(args):
    if not echoes._echo("".join(traceback.format_exception_only(args.exc_value))):
      old_thread(args)

  def unraisable_hook(u):
    if not echoes._echo("".join(traceback.format_exception_only(u.exc_value))):
      old_unraisable(u)

  def except_hook(tp, value, tb):
    if not echoes._echo("".join(traceback.format_exception_only(value))):
      old_except(tp, value, tb)

  threading.excepthook, sys.unraisablehook, sys.excepthook = (
    thread_hook,
    unraisable_hook,
    except_hook,
  )
  return echoes
