"""Entries of JAX's persistent compilation cache that are whole or absent, never cut short.

JAX (0.10 and 0.11) writes a cache entry in place, under its final name. A process killed
while it writes one (a preempted job, a SIGKILL) leaves a truncated file there. Every later
process then fails to read it (a warning, then a full compile) and never replaces it, since
the cache's writer skips a key whose file exists: each relaunch pays that compile again.
`harden()` changes two things for this process:

- an entry is written to a hidden file beside its final name, then renamed onto it, so that a
  reader sees either nothing or the whole entry (local directories whose size JAX does not
  bound, i.e. `jax_compilation_cache_max_size` unset: the project's default; elsewhere JAX
  writes as before);
- an entry that cannot be loaded is deleted, so the program compiled in its place is stored
  again and the next process reads it.

Hidden files left by a writer that was killed are deleted once they are an hour old (a
younger one may belong to a writer still at work in another process).
"""

from __future__ import annotations

import os
import threading
import time

import jax
from absl import logging

try:  # JAX's cache internals (0.10, 0.11); without them harden() leaves JAX's own behaviour
  from jax._src import compilation_cache as _jax_cache
  from jax._src import lru_cache as _lru
  _JAX_PUT = _lru.LRUCache.put
  _JAX_GET = _jax_cache.get_executable_and_time
  _SUFFIXES = (_lru._CACHE_SUFFIX, _lru._ATIME_SUFFIX)
  _VERIFICATION_ERROR = _jax_cache.CacheVerificationError
except (ImportError, AttributeError):  # pragma: no cover (a JAX outside pyproject's range)
  _JAX_PUT = _JAX_GET = None

_PARTIAL = ".partial"  # suffix of an entry still being written (name: .<entry>.<pid>.<thread>)
STALE_AFTER_S = 3600.0


def _local_dir(path) -> str | None:
  path = str(path)
  if path.startswith("file://"):
    path = path[len("file://"):]
  return None if "://" in path else path


def _write_whole(final: str, value: bytes) -> None:
  """`value` at `final`, appearing at once (written beside it, then renamed onto it)."""
  head, name = os.path.split(final)
  partial = os.path.join(head, f".{name}.{os.getpid()}.{threading.get_ident()}{_PARTIAL}")
  try:
    with open(partial, "wb") as f:
      f.write(value)
    os.replace(partial, final)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _put(self, key: str, value: bytes) -> None:
  directory = _local_dir(self.path)
  if self.eviction_enabled or directory is None:
    return _JAX_PUT(self, key, value)  # JAX's own locking and size accounting
  if not key:
    raise ValueError("key cannot be empty")
  final = os.path.join(directory, f"{key}{_SUFFIXES[0]}")
  if not os.path.exists(final):
    _write_whole(final, value)


def _get(cache_key: str, *args, **kwargs):
  try:
    return _JAX_GET(cache_key, *args, **kwargs)
  except _VERIFICATION_ERROR:
    raise
  except Exception:
    directory = _local_dir(jax.config.jax_compilation_cache_dir or "")
    entry = os.path.join(directory, f"{cache_key}{_SUFFIXES[0]}") if directory else None
    if entry and os.path.exists(entry):
      for path in (entry, os.path.join(directory, f"{cache_key}{_SUFFIXES[1]}")):
        try:
          os.remove(path)
        except OSError:
          pass
      if not os.path.exists(entry):
        logging.warning("compilation cache: deleted the entry %s, which could not be loaded; "
                        "the program compiled in its place is stored", entry)
    raise  # JAX warns and compiles


def remove_stale_partials(directory: str, older_than_s: float = STALE_AFTER_S) -> int:
  """Deletes the hidden files of writes that never finished; returns how many."""
  now, removed = time.time(), 0
  try:
    names = os.listdir(directory)
  except OSError:
    return 0
  for name in names:
    if name.startswith(".") and name.endswith(_PARTIAL):
      path = os.path.join(directory, name)
      try:
        if now - os.path.getmtime(path) > older_than_s:
          os.remove(path)
          removed += 1
      except OSError:
        pass
  return removed


def harden(directory: str | None = None) -> bool:
  """Installs whole-or-absent writes and self-healing reads (idempotent; False where this JAX
  lacks the internals they replace); with `directory`, also deletes that directory's stale
  partial writes."""
  if _JAX_PUT is None:
    return False
  _lru.LRUCache.put = _put
  _jax_cache.get_executable_and_time = _get
  if directory and _local_dir(directory):
    remove_stale_partials(_local_dir(directory))
  return True

