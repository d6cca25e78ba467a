"""One run per workdir: start-up checks, then an exclusive lock for the length of the run.

`claim(config, workdir)` first checks everything that can be checked without writing: the
data config, resolved once into the run's `Dataset` (source, tokenizer, both splits:
`Dataset.check_splits`), the config (`ttt_jax.config.validate`) and `checkpoint.load_from`.
Only then does it create the workdir and take its lock file `<workdir>/run.lock` (JSON: pid,
host, start time of the holder). A second run on the same workdir stops with `WorkdirBusy`
naming the holder. A lock left by a process of this host that is no longer running (killed,
crashed) is taken over with a notice; one from another host is only reported, since its
liveness cannot be checked from here. The lock is an `flock` on the file, which the kernel
drops when its process dies, plus the holder's identity inside it. On multi-process runs
process 0 alone takes it and tells the others whether it got it. `exclusive_workdir` applies
all this around a training function and hands it the `Dataset`, after process 0 has kept a copy
of the run's tokenizer in `<workdir>/tokenizer/` (data/saved_tokenizer.py), so that the trained
run opens read-only without its data folder.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import os
import socket
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ttt_jax.batch_blocks import run_batch_blocks
from ttt_jax.config import ConfigError, validate
from ttt_jax.data.dataset import Dataset
from ttt_jax.runs.checkpoint import CKPT_DIR, check_load_from, kept_after_disk_full
from ttt_jax.runs.diskspace import DiskFull, block_bytes, is_disk_full, reported_as_disk_full

LOCK_FILE = "run.lock"
TOKENIZER_DIR = "tokenizer"  # the run's copy of its tokenizer
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir; the message names it (pid, host, start time)."""


def check_run(config: ml_collections.ConfigDict, data: Dataset | None = None) -> Dataset:
  """Everything a training run can check before it writes anything (raises ConfigError).

  Returns the run's data (`data`, or `config.data` resolved here), its splits checked.
  """
  data = Dataset.from_config(config.data) if data is None else data
  data.sync_vocab(config)  # model.vocab_size follows the data tokenizer
  validate(config)
  # the processes that read distinct windows (`batch_blocks`: those holding distinct rows)
  data.check_splits(config.data.seq_len, config.data.batch_size, run_batch_blocks(config)[1])
  check_load_from(config)
  return data


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state letter, start time in clock ticks since boot) of a process, None without /proc."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None
  return fields[0], int(fields[19])


def _alive(pid: int, ticks: int | None) -> bool:
  """Whether process `pid` of this host still runs (a zombie or a reused pid does not count)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # it exists, under another user
  stat = _proc_stat(pid)
  if stat is None:
    return True
  state, start = stat
  return state not in ("Z", "X") and (ticks is None or start == ticks)


def _recorded_pid(holder: dict) -> int | None:
  """The holder's process id; None when the record has none or a damaged one ("abc", 0, -1)."""
  pid = holder.get("pid")
  return pid if type(pid) is int and pid > 0 else None


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')}")


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `<workdir>/run.lock` (see the module docstring)."""

  def __init__(self, workdir: str, *, echo=print):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.echo = echo
    self._fd: int | None = None
    self._created_dir = False

  def _open_locked(self) -> int:
    """An fd of the lock file with our flock on it; WorkdirBusy while another process has it."""
    dying_until = time.monotonic() + 10
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno in _NO_FLOCK:  # a filesystem without locks: the recorded holder decides
          return fd
        if not isinstance(e, BlockingIOError):
          os.close(fd)
          raise
        holder = self._read(fd, wait=True)
        os.close(fd)
        pid = _recorded_pid(holder)
        if (pid and holder.get("host") == socket.gethostname()
            and time.monotonic() < dying_until and not _alive(pid, holder.get("start_ticks"))):
          time.sleep(0.1)  # a killed holder whose threads still exit: its flock goes soon
          continue
        raise WorkdirBusy(f"workdir {self.workdir} is in use by another run ("
                          f"{_describe(holder) if holder else 'holder unknown'}; lock "
                          f"{self.path}); wait for it to finish or choose another --workdir"
                          ) from None
      try:  # the holder before us may have removed the file between our open and our flock
        if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
          return fd
      except FileNotFoundError:
        pass
      os.close(fd)

  @staticmethod
  def _read(fd: int, wait: bool = False) -> dict:
    """The holder recorded in the file ({} if none). `wait`: its holder may still be writing."""
    for _ in range(20 if wait else 1):
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 1 << 16).decode("utf-8", "replace")
      try:
        holder = json.loads(text) if text.strip() else {}
        if isinstance(holder, dict) and (holder or not wait):
          return holder
      except ValueError:
        pass
      time.sleep(0.05)
    return {}

  def acquire(self) -> None:
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise ConfigError(f"--workdir {self.workdir} is a file, not a directory")
    self._created_dir = not os.path.isdir(self.workdir)
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = self._open_locked()
    except OSError as e:
      if is_disk_full(e):
        raise DiskFull(self.workdir, f"its lock file {self.path}", block_bytes(self.workdir)
                       ) from None
      raise ConfigError(f"--workdir {self.workdir}: cannot write a run there "
                        f"({e.strerror or type(e).__name__})") from None
    try:
      previous = self._read(fd)
      host = socket.gethostname()
      if previous.get("pid") is not None:
        pid = _recorded_pid(previous)
        if previous.get("host") != host:
          raise WorkdirBusy(
              f"workdir {self.workdir} is locked by a run on another host ({_describe(previous)}"
              f"; lock {self.path}); if that run is no longer running, delete {self.path}")
        if pid is not None and _alive(pid, previous.get("start_ticks")):
          raise WorkdirBusy(f"workdir {self.workdir} is in use by another run ("
                            f"{_describe(previous)}; lock {self.path}); wait for it to finish "
                            "or choose another --workdir")
        gone = ("which is no longer running" if pid is not None else
                f"whose record of its process id ({previous['pid']!r}) is damaged")
        self.echo(f"notice: took over the lock {self.path} left by {_describe(previous)}, {gone}")
      stat = _proc_stat(os.getpid())
      me = {"pid": os.getpid(), "host": host,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "start_ticks": stat[1] if stat else None}
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      try:
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
      except OSError as e:  # a full disk: the flock alone holds the workdir; the run's own
        if not is_disk_full(e):  # start-up check then names the space a checkpoint needs
          raise
        os.ftruncate(fd, 0)
    except BaseException:
      os.close(fd)
      raise
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)
    os.close(self._fd)  # drops the flock
    self._fd = None
    if self._created_dir:  # a run that stopped before writing anything leaves no workdir
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def claim(config: ml_collections.ConfigDict, workdir: str | None, *, echo=print,
          data: Dataset | None = None):
  """Start-up checks, then the workdir lock (process 0 only) until the block ends; yields the
  run's `Dataset` (`check_run`)."""
  if workdir is not None and not str(workdir).strip():
    raise ConfigError(f"--workdir {workdir!r} is empty; name the run's directory")
  data = check_run(config, data)
  if workdir is None:
    yield data
    return
  lock = WorkdirLock(workdir, echo=echo)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except Exception as e:  # noqa: BLE001  (busy, not writable, disk full: the others must hear)
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None if jax.process_index() == 0
                                                        else 1))
    if not int(ok) and error is None:
      error = ConfigError(f"process 0 could not claim the workdir {os.path.abspath(workdir)} "
                          "(its message says why)")
  if error is not None:
    raise error
  try:
    yield data
  finally:
    lock.release()


def exclusive_workdir(train_fn):
  """Decorates `train_fn(config, workdir, ..., echo=print, data=None)`: runs it inside `claim`
  and passes it the checked `Dataset` as `data` (a caller's own `data` is checked and passed)."""

  @functools.wraps(train_fn)
  def wrapper(config, workdir, *args, echo=print, data=None, **kwargs):
    def kept() -> str:
      return kept_after_disk_full(os.path.join(workdir, CKPT_DIR))

    with (claim(config, workdir, echo=echo, data=data) as checked,
          reported_as_disk_full(workdir, kept)):  # a full disk: one line, what is kept
      return train_fn(config, workdir, *args, echo=echo, data=checked, **kwargs)

  return wrapper
