"""Entries of JAX's persistent compilation cache that are whole or absent, never cut short.

JAX (0.10 and 0.11) writes a cache entry in place, under its final name. A process killed
while it writes one (a preempted job, a SIGKILL) leaves a truncated file there. Every later
process then fails to read it (a warning, then a full compile) and never replaces it, since
the cache's writer skips a key whose file exists: each relaunch pays that compile again.
`harden()` changes two things for this process, in a local cache directory whose size JAX does
not bound (`jax_compilation_cache_max_size` unset: the default; elsewhere JAX's own code runs):

- an entry is written to a hidden file beside its final name, flushed to disk, then renamed
  onto that name, so that a reader sees either nothing or the whole entry;
- when JAX fails to load an entry whose data cannot be decompressed (cut short by a writer
  without this change, or damaged), the entry is deleted, so that the program compiled in its
  place is stored and the next process reads it. An entry that is whole stays whatever else
  failed (device memory, a driver). Under `jax_compilation_cache_check_contents` (a debugging
  setting: JAX then compiles every program once and compares it with its entry) a damaged
  entry is only reported, as before.

Hidden files left by a writer that was killed are deleted once they are an hour old (a
younger one may belong to a writer still at work in another process).
"""

from __future__ import annotations

import os
import threading
import time

from absl import logging

try:  # JAX's cache internals (0.10, 0.11); without them harden() leaves JAX's own behaviour
  from jax._src import compilation_cache as _jax_cache
  from jax._src import lru_cache as _lru
  _JAX_PUT = _lru.LRUCache.put
  _JAX_GET = _jax_cache.get_executable_and_time
  _ENTRY_SUFFIX = _lru._CACHE_SUFFIX
  _DECOMPRESS = _jax_cache.decompress_executable
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
      f.flush()
      os.fsync(f.fileno())  # on disk before it has the name (a power loss, not only a kill)
    os.replace(partial, final)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def _handled_dir(cache) -> str | None:
  """The directory of a JAX `LRUCache` whose entries this module writes and deletes (local,
  size not bounded); None for the others, which keep JAX's own locking and size accounting."""
  return None if cache.eviction_enabled else _local_dir(cache.path)


def _put(self, key: str, value: bytes) -> None:
  directory = _handled_dir(self)
  if directory is None:
    return _JAX_PUT(self, key, value)
  if not key:
    raise ValueError("key cannot be empty")
  final = os.path.join(directory, f"{key}{_ENTRY_SUFFIX}")
  if not os.path.exists(final):
    _write_whole(final, value)


def _drop_if_damaged(cache_key: str) -> None:
  """Deletes the entry of `cache_key` in the cache JAX opened if its data cannot be
  decompressed (cut short or damaged); an entry that is whole stays, whatever else failed (e.g.
  device memory)."""
  cache = getattr(_jax_cache, "_cache", None)
  cache = getattr(cache, "_base_cache", cache)  # under jax_compilation_cache_check_contents
  directory = None if cache is None else _handled_dir(cache)
  if directory is None:
    return
  entry = os.path.join(directory, f"{cache_key}{_ENTRY_SUFFIX}")
  try:
    with open(entry, "rb") as f:
      data = f.read()
  except OSError:
    return
  try:
    _DECOMPRESS(data)
    return
  except Exception:  # noqa: BLE001 (zlib.error, zstd's ZstdError, ...: the data is damaged)
    pass
  try:
    os.remove(entry)
  except OSError:
    return
  logging.warning("compilation cache: deleted %s, whose data is cut short or damaged; the "
                  "program is compiled again and stored anew", entry)


def _get(cache_key: str, *args, **kwargs):
  try:
    return _JAX_GET(cache_key, *args, **kwargs)
  except Exception:
    _drop_if_damaged(cache_key)
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
  local = _local_dir(directory) if directory else None
  if local:
    remove_stale_partials(local)
  return True
