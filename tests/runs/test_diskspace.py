"""A full disk (faults injected: a patched free-space reading, writes that fail with ENOSPC) stops
a run with one line naming the workdir and the bytes needed, keeps the last checkpoint, cuts no
record short, and a rerun on the full disk fails the same way (no OSError from the lock)."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys

import pytest

from ttt_jax.runs import diskspace
from ttt_jax.runs.checkpoint import complete_steps
from ttt_jax.runs.diskspace import DiskFull
from ttt_jax.runs.workdir import LOCK_FILE, WorkdirLock
from ttt_jax.train.events import read_events
from ttt_jax.train.metrics import METRICS_FILE, MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fd_path(fd: int) -> str:
  try:
    return os.readlink(f"/proc/self/fd/{fd}")
  except OSError:
    return ""


def fail_writes_to(monkeypatch, suffix: str, half: bool = True):
  """os.write to a file whose name ends with `suffix` writes half the bytes, then ENOSPC."""
  real = os.write

  def write(fd, data):
    if fd_path(fd).endswith(suffix):
      if half and len(data) > 1:
        real(fd, bytes(data[:len(data) // 2]))
      raise ENOSPC
    return real(fd, data)

  monkeypatch.setattr(os, "write", write)


def test_a_record_cut_by_a_full_disk_is_taken_back_whole(tmp_path, monkeypatch):
  w = MetricWriter(str(tmp_path), echo=lambda s: None)
  w.write(1, {"loss": 1.0})
  before = (tmp_path / METRICS_FILE).read_bytes()
  with monkeypatch.context() as m:
    fail_writes_to(m, METRICS_FILE)
    with pytest.raises(DiskFull) as e:
      w.write(2, {"loss": 2.0})
  msg = str(e.value)
  assert msg.startswith(f"workdir {tmp_path}: no space left on its device for a record of "
                        f"{tmp_path / METRICS_FILE} (needs about "), msg
  assert " bytes, " in msg and " free)" in msg and "\n" not in msg
  assert (tmp_path / METRICS_FILE).read_bytes() == before  # half a line taken back off
  with monkeypatch.context() as m:  # the TensorBoard event file the same way
    fail_writes_to(m, os.path.basename(w._tb.path))
    with pytest.raises(DiskFull, match="a record of .*events.out.tfevents"):
      w.write(3, {"loss": 3.0})
  w.write(4, {"loss": 4.0})
  events = w._tb.path
  w.close()
  lines = (tmp_path / METRICS_FILE).read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 3, 4]  # 3: its event did not fit
  steps = [e.step for e in read_events(events) if e.summary.value]
  assert steps == [1, 4]


def test_a_full_disk_at_the_lock_is_no_oserror(tmp_path, monkeypatch):
  """The holder's record does not fit: the flock alone holds the workdir (the run's start-up
  check then names the space a checkpoint needs); the lock file cannot be created: DiskFull."""
  with monkeypatch.context() as m:
    fail_writes_to(m, LOCK_FILE, half=False)
    with WorkdirLock(str(tmp_path)) as lock:
      assert os.path.getsize(lock.path) == 0
  assert not os.path.exists(tmp_path / LOCK_FILE)
  real_open = os.open

  def no_new_file(path, flags, *args):
    if str(path).endswith(LOCK_FILE):
      raise ENOSPC
    return real_open(path, flags, *args)

  monkeypatch.setattr(os, "open", no_new_file)
  with pytest.raises(DiskFull, match=rf"^workdir {tmp_path}: no space left on its device for "
                     r"its lock file .*run.lock \(needs about \d+ bytes, "):
    WorkdirLock(str(tmp_path)).acquire()


def test_disk_full_inside_orbax_is_one_line_and_its_logs_are_dropped(tmp_path):
  orbax_error = ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at '
                           'local file "/w/checkpoints/6.orbax-checkpoint-tmp/": Failed to write '
                           "2314240 bytes to file 9: No space left on device [os_error_code='28']"
                           "\nmore lines")
  with pytest.raises(DiskFull) as e, diskspace.reported_as_disk_full(
      str(tmp_path), lambda: "the last checkpoint, step 4, is kept"):
    raise RuntimeError("wrapped") from orbax_error
  msg = str(e.value)
  assert msg.startswith(f"workdir {tmp_path}: no space left on its device for what it was "
                        "writing (RESOURCE_EXHAUSTED: Error writing"), msg
  assert msg.endswith("; the last checkpoint, step 4, is kept") and "\n" not in msg
  with pytest.raises(KeyError), diskspace.reported_as_disk_full(str(tmp_path), str):
    raise KeyError("other errors pass")
  record = logging.LogRecord("absl", logging.ERROR, "future.py", 1, "raised an exception: %s",
                             (orbax_error,), (ValueError, orbax_error, None))
  assert not diskspace._DiskFullLogs().filter(record)
  assert diskspace._is_leftover_noise(RuntimeError("Event loop is closed"))
  assert not diskspace._is_leftover_noise(RuntimeError("anything else"))


FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.intermediate_size=64",
         "--config.data.batch_size=2", "--config.train.steps=6",
         "--config.checkpoint.every_steps=2", "--config.train.log_every=1"]
# The device is full once a first checkpoint is on disk (1000 bytes free from then on), or
# always with FULL=1: a real train.py, only the free-space reading is injected.
FULL_DISK = """
import os, sys
from ttt_jax.runs import checkpoint, diskspace
workdir = sys.argv[sys.argv.index("--workdir") + 1]
full = os.environ.get("FULL") == "1"
diskspace.free_bytes = lambda path: 1000 if full or checkpoint.complete_steps(
    os.path.join(workdir, "checkpoints")) else 10**12
sys.argv[0] = "train.py"
from ttt_jax.cli import train_main
train_main()
"""


def train(workdir, code=None, **env):
  args = ["-c", code] if code else [os.path.join(ROOT, "scripts", "train.py")]
  return subprocess.run(
      [sys.executable, *args, "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=swa,ctx=64",
       "--workdir", str(workdir), *FLAGS], capture_output=True, text=True, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", **env), timeout=300)


def test_a_checkpoint_that_does_not_fit_stops_the_run_in_one_line(tmp_path):
  out = train(tmp_path, FULL_DISK)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  ckpts = tmp_path / "checkpoints"
  assert lines[-1].startswith(f"train.py: error: workdir {tmp_path}: no space left on its "
                              "device for checkpoint step 4 (needs about "), lines[-1]
  assert f"1000 bytes free); the last checkpoint, step 2 ({ckpts / '2'}), is kept" in lines[-1]
  assert os.listdir(ckpts) == ["2"] and complete_steps(str(ckpts)) == [2]
  records = (tmp_path / METRICS_FILE).read_bytes()
  assert [json.loads(line)["step"] for line in records.splitlines()] == [1, 2, 3, 4]
  # The same command on the still full disk: the same line, before any training.
  again = train(tmp_path, FULL_DISK, FULL="1")
  last = [line for line in again.stderr.splitlines() if line.strip()][-1]
  assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
  assert "no space left on its device for a checkpoint of this run (needs about" in last
  assert f"the last checkpoint, step 2 ({ckpts / '2'}), is kept" in last
  assert (tmp_path / METRICS_FILE).read_bytes() == records
  # Space again: the run resumes from the kept checkpoint and finishes.
  done = train(tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resumed from step 2" in done.stdout + done.stderr
  assert complete_steps(str(ckpts))[-1] == 6
