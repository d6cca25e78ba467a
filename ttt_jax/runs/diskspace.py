"""A full disk stops a run with one line, and never costs it a record or a checkpoint.

Every file a run appends to (metrics.jsonl, the TensorBoard event file) gets each record in one
`append_whole`: a write that fails half way (no space left) is cut back to the previous record,
so no line is ever left cut short. A checkpoint is only started when its size (the bytes of its
arrays) is free on the device (`check_space`); otherwise the run stops with `DiskFull` naming
the workdir, the bytes needed and free, and the last checkpoint, which stays as it is (Orbax
rotates old checkpoints away only after a new one is complete). A disk that fills from outside
during a save is reported the same way (`is_disk_full` finds it in Orbax's errors, whose own
logs of it are dropped: `_DiskFullLogs`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable

import jax
import numpy as np

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How Orbax / TensorStore word a failed write (their errors are ValueError / RuntimeError).
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]",
                  "os_error_code='28'")


class DiskFull(RuntimeError):
  """No space left in `directory` for `what` (`needed` bytes, None if unknown); the message is
  one line (`message`), `then` says what is kept and how to go on."""

  def __init__(self, directory: str, what: str, needed: int | None, then: str = ""):
    self.directory, self.what, self.needed = directory, what, needed
    super().__init__(message(directory, what, needed, then))


def fmt_bytes(n: int) -> str:
  """'11.4 MB'; sizes under 10 kB in bytes ('4096 bytes')."""
  if n < 10_000:
    return f"{n} bytes"
  unit, size = next((u, s) for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
                    if n >= s)
  return f"{n / size:.1f} {unit}"


def _existing(path: str) -> str:
  """`path` or its nearest existing parent."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def free_bytes(path: str) -> int:
  """Bytes free for this user on the device holding `path`."""
  return shutil.disk_usage(_existing(path)).free


def block_bytes(path: str) -> int:
  """The block size of the device holding `path` (what a new file needs at least)."""
  return os.statvfs(_existing(path)).f_frsize


def tree_bytes(tree) -> int:
  """Bytes of the arrays in a pytree (a checkpoint's size before compression)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def disk_full_cause(err: BaseException | None) -> BaseException | None:
  """The exception in `err`'s chain (itself, or one it was raised from) that is a write which
  found no space; None if there is none."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, DiskFull) or isinstance(err, OSError) and err.errno in _NO_SPACE:
      return err
    if any(t in str(err) for t in _NO_SPACE_TEXT):
      return err
    err = err.__cause__ or err.__context__
  return None


def is_disk_full(err: BaseException | None) -> bool:
  return disk_full_cause(err) is not None


def message(directory: str, what: str, needed: int | None, then: str = "") -> str:
  """'workdir W: no space left on its device for <what> (needs about N, F free)[; then]'."""
  need = f"needs about {fmt_bytes(needed)}, " if needed else ""
  return (f"workdir {directory}: no space left on its device for {what} ({need}"
          f"{fmt_bytes(free_bytes(directory))} free){'; ' + then if then else ''}")


def check_space(directory: str, needed: int, what: str) -> None:
  """DiskFull unless `needed` bytes are free on `directory`'s device (every process of a
  multi-process run raises when one of them lacks space)."""
  short = free_bytes(directory) < needed
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process only)
    short = bool(np.any(multihost_utils.process_allgather(np.int32(short))))
  if short:
    raise DiskFull(directory, what, needed)


def append_whole(fd: int, data: bytes, path: str, what: str = "") -> None:
  """Appends `data` to the file open as `fd` (O_APPEND) in full, or not at all: a write that
  fails part way is cut back off; no space left raises DiskFull naming `what` (default: a
  record of `path`)."""
  start = os.fstat(fd).st_size
  view = memoryview(data)
  try:
    while view:
      view = view[os.write(fd, view):]
  except OSError as e:
    try:
      os.ftruncate(fd, start)
    except OSError:
      pass
    if is_disk_full(e):
      raise DiskFull(os.path.dirname(path), what or f"a record of {path}", len(data)) from None
    raise


def close_all(*closers: Callable[[], object] | None, failing: bool) -> None:
  """Calls every closer. While the run is already `failing` (an exception on its way out),
  errors of the closers are dropped, so the first error is the one reported; otherwise the
  first closer's error is raised once all have run."""
  first = None
  for close in closers:
    if close is None:
      continue
    try:
      close()
    except Exception as e:  # noqa: BLE001 (raised below, or dropped behind the run's own error)
      first = first or e
  if first is not None and not failing:
    raise first


@contextlib.contextmanager
def reported_as_disk_full(workdir: str | None, kept: Callable[[], str]):
  """Turns a full disk met in the block into one `DiskFull` line naming `workdir`, what did not
  fit with its bytes, and `kept()` (what stays and how to go on). Other errors pass."""
  try:
    yield
  except Exception as e:
    cause = disk_full_cause(e)
    if workdir is None or cause is None:
      raise
    if isinstance(cause, DiskFull):
      what, needed = cause.what, cause.needed
    else:  # raised by a library, e.g. Orbax writing a checkpoint
      first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
      what, needed = f"what it was writing ({first})", None
    raise DiskFull(workdir, what, needed, kept()) from None


def _is_leftover_noise(err: BaseException | None) -> bool:
  """A full disk met inside Orbax: the TensorStore writes it abandons end in errors Python prints
  as unraisable, one traceback each: 'Event loop is closed' (a write finishing after Orbax
  closed its event loop) and, at exit, 'Python is likely shutting down'. Never actionable; the
  run reports the full disk itself in one line."""
  text = str(err)
  return is_disk_full(err) or (
      (isinstance(err, RuntimeError) and text == "Event loop is closed")
      or (isinstance(err, ImportError) and "Python is likely shutting down" in text))


def _drop_leftover_noise(previous):
  def hook(unraisable) -> None:
    if not _is_leftover_noise(unraisable.exc_value):
      previous(unraisable)

  return hook


class _DiskFullLogs(logging.Filter):
  """Drops Orbax's logged tracebacks of a write that found no space: the run reports it in one
  line (`DiskFull`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    err = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # noqa: BLE001 (a record whose arguments do not format)
      text = str(record.msg)
    return not (is_disk_full(err) or any(t in text for t in _NO_SPACE_TEXT))


_QUIET = _DiskFullLogs()


def quiet_disk_full_noise() -> None:
  """Installs, once, the filters that drop Orbax's tracebacks of a full disk (its `absl` and
  `asyncio` log records, the unraisable errors of its abandoned writes). Called by a training
  run, not on import: importing the package changes no process-wide hook."""
  for name in ("absl", "asyncio"):  # Orbax logs through absl; its abandoned writes, asyncio
    logger = logging.getLogger(name)
    if _QUIET not in logger.filters:
      logger.addFilter(_QUIET)
  if not getattr(sys.unraisablehook, "_ttt_jax_quiet", False):
    hook = _drop_leftover_noise(sys.unraisablehook)
    hook._ttt_jax_quiet = True  # noqa: SLF001
    sys.unraisablehook = hook
