"""One run per workdir: a second process refuses naming the holder, a dead holder's lock is
taken over with a notice, the lock goes away with the run (also after an exception)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.runs import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLD = ("import sys, time\n"
        "from ttt_jax.runs.workdir import WorkdirLock\n"
        "with WorkdirLock(sys.argv[1]):\n"
        "  print('locked', flush=True)\n"
        "  time.sleep(120)\n")


def hold_lock(workdir) -> subprocess.Popen:
  """A process that holds the workdir lock until killed (returns once it holds it)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
  return proc


def test_second_run_refuses_naming_the_holder(tmp_path):
  holder = hold_lock(tmp_path)
  try:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
         "configs/pretrain.py:model=swa,ctx=64", "--workdir", str(tmp_path),
         "--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.intermediate_size=64",
         "--config.data.batch_size=2", "--config.train.steps=2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}, " \
         "started 20" in lines[-1], lines[-1]
  assert os.listdir(tmp_path) == [wd.LOCK_FILE]  # the refused run wrote nothing


@pytest.mark.parametrize("reap", [True, False], ids=["dead", "zombie"])
def test_lock_of_killed_process_is_taken_over_with_notice(tmp_path, reap):
  holder = hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  if reap:
    holder.wait()
  else:  # killed but not yet reaped by its parent: still has a pid, no longer runs
    end = time.time() + 30
    while wd._proc_stat(holder.pid)[0] != "Z":
      assert time.time() < end
      time.sleep(0.01)
  logs = []
  try:
    with wd.WorkdirLock(tmp_path, echo=logs.append) as lock:
      with open(lock.path) as f:
        assert json.load(f)["pid"] == os.getpid()
  finally:
    holder.wait()
  assert len(logs) == 1 and f"left by pid {holder.pid} on host" in logs[0], logs
  assert "no longer running" in logs[0]
  assert not os.path.exists(os.path.join(tmp_path, wd.LOCK_FILE))


def test_lock_from_another_host_is_reported_not_taken(tmp_path):
  path = os.path.join(tmp_path, wd.LOCK_FILE)
  with open(path, "w") as f:
    json.dump({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}, f)
  with pytest.raises(wd.WorkdirBusy, match=r"another host \(pid 1 on host elsewhere.*delete"):
    wd.WorkdirLock(tmp_path).acquire()
  assert os.path.exists(path)


def test_lock_is_released_on_exception_and_new_workdir_removed(tmp_path):
  target = tmp_path / "new"
  with pytest.raises(RuntimeError, match="boom"), wd.WorkdirLock(target):
    assert os.path.exists(os.path.join(target, wd.LOCK_FILE))
    raise RuntimeError("boom")
  assert not os.path.exists(target)  # created by the run, left empty: removed
  with wd.WorkdirLock(tmp_path):  # an existing workdir stays
    pass
  assert os.path.isdir(tmp_path) and not os.listdir(tmp_path)


def test_claim_checks_config_and_data_before_creating_the_workdir(tmp_path):
  c = build_config("model=swa,ctx=64")
  c.data.source = str(tmp_path / "no_such_folder")
  with pytest.raises(ConfigError, match="data.source"), wd.claim(c, str(tmp_path / "w")):
    pass
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("pid", ["abc", 0, -1, None], ids=["text", "zero", "negative", "null"])
def test_a_damaged_holder_record_is_taken_over_with_notice(tmp_path, pid):
  """A record whose pid is no process id (it ended in a ValueError traceback; pid 0 or -1 named
  a process group, which os.kill found 'alive') is taken over: no process holds the flock."""
  path = tmp_path / wd.LOCK_FILE
  path.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
  logs = []
  with wd.WorkdirLock(str(tmp_path), echo=logs.append) as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()
  if pid is None:  # no pid recorded at all: nothing to report
    assert logs == []
  else:
    assert len(logs) == 1 and f"whose record of its process id ({pid!r}) is damaged" in logs[0]


@pytest.mark.parametrize("pid", [0, 1])
def test_every_process_hears_when_process_0_cannot_claim_the_workdir(tmp_path, monkeypatch, pid):
  """In a job of two processes, process 0 failing to lock the workdir for any reason (here: it
  is a file) still reaches the broadcast, so process 1 stops in one line instead of waiting in
  it forever; process 0 raises its own reason."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  sent = []

  def broadcast(x):
    sent.append(int(x))
    return sent[0] if pid == 0 else 0  # process 0 failed: the others receive its 0

  monkeypatch.setattr(wd, "run_batch_blocks", lambda config: (pid, 2))  # rows per process
  monkeypatch.setattr(wd.jax, "process_index", lambda: pid)
  monkeypatch.setattr(wd.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  match = "is a file, not a directory" if pid == 0 else "process 0 could not claim the workdir"
  with pytest.raises(ConfigError, match=match), wd.claim(build_config("model=transformer"),
                                                         str(path)):
    pass
  assert sent == [0 if pid == 0 else 1]
