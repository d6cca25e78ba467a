"""A run's records survive what happens to it: damaged lines of metrics.jsonl are named and moved
aside (never dropped or a traceback), every logged step is on disk for TensorBoard when a kill
comes, a validation cut off by a kill is done on resume, and a divergence names the newest
checkpoint on disk."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import pytest

from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.train.events import read_events
from ttt_jax.train.loop import NonFiniteError, train_and_evaluate
from ttt_jax.train.metrics import METRICS_FILE, MetricWriter, read_metrics
from ttt_jax.train.trainer import Trainer

from .test_nonfinite import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def record(step, split="train"):
  return json.dumps({"step": step, "split": split, "loss": float(step)}) + "\n"


def event_steps(workdir, prefix="train/") -> list[int]:
  """Steps with a `prefix` scalar in the workdir's event files (every file, in order)."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    out += [e.step for e in read_events(path)
            if any(v.tag.startswith(prefix) for v in e.summary.value)]
  return out


def test_damaged_lines_are_named_and_moved_aside_keeping_the_good_records(tmp_path):
  """A line of garbage in the middle and a binary tail: the good records stay, one warning
  names the file and the damaged line numbers, the damaged bytes are kept beside it. (It used
  to end in a UnicodeDecodeError traceback, or to call the garbage 'records past step N'.)"""
  path = tmp_path / METRICS_FILE
  garbage, binary = b'{"step": 3, "spl\x00\x00 garbage', b"\xff\xfe\x00\x01 bin\x80\x81"
  path.write_bytes(record(1).encode() + record(2).encode() + garbage + b"\n"
                   + record(3).encode() + record(4).encode() + binary + b"\n\x9c")
  logs = []
  MetricWriter(str(tmp_path), echo=logs.append, first_step=4).close()
  assert len(logs) == 1, logs
  assert logs[0].startswith(f"warning: {path}: lines 3, 6-7 are damaged"), logs
  assert f"moved the damaged lines to {path}.damaged.1" in logs[0]
  assert "past step" not in logs[0]
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
  assert (tmp_path / f"{METRICS_FILE}.damaged.1").read_bytes() == (
      garbage + b"\n" + binary + b"\n\x9c\n")


def test_records_past_the_step_and_damaged_lines_are_told_apart(tmp_path):
  (tmp_path / METRICS_FILE).write_text(record(1) + "not json\n" + record(2) + record(3))
  logs = []
  MetricWriter(str(tmp_path), echo=logs.append, first_step=2).close()
  assert any("line 2 is damaged" in s for s in logs), logs
  assert any(s.startswith("metrics.jsonl: dropped 1 records past step 2") for s in logs), logs
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]


def test_a_directory_where_metrics_jsonl_belongs_is_moved_aside(tmp_path):
  (tmp_path / METRICS_FILE).mkdir()
  (tmp_path / METRICS_FILE / "inside").write_text("kept")
  logs = []
  w = MetricWriter(str(tmp_path), echo=logs.append, first_step=3)
  w.write(4, {"loss": 1.0})
  w.close()
  assert len(logs) == 2 and "is a directory" in logs[0], logs
  assert (tmp_path / f"{METRICS_FILE}.1" / "inside").read_text() == "kept"
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [4]


KILLED_WRITER = """
import os, signal, sys
from ttt_jax.train.metrics import MetricWriter
w = MetricWriter(sys.argv[1], echo=lambda s: None, first_step=int(sys.argv[2]))
for step in range(int(sys.argv[2]) + 1, int(sys.argv[3]) + 1):
  w.write(step, {"loss": 1.0 / step})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_loses_no_logged_step_and_leaves_no_empty_event_file(tmp_path):
  """Every record and TensorBoard event is on disk when `write` returns: a writer killed
  right after logging keeps them all (tensorboardX's queue lost them and left 0-byte files)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for first, last in ((0, 10), (5, 12)):  # killed, then resumed from step 5 and killed again
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path), str(first),
                           str(last)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(1, 13))
  files = glob.glob(str(tmp_path / "tensorboard" / "*"))
  assert len(files) == 2 and all(os.path.getsize(f) > 0 for f in files)
  assert event_steps(tmp_path) == list(range(1, 11)) + list(range(6, 13))
  purge = [e for e in read_events(sorted(files)[-1]) if e.HasField("session_log")]
  assert [e.step for e in purge] == [6]  # TensorBoard drops the first file's steps 6..10


def test_empty_event_files_of_killed_writers_are_removed(tmp_path):
  (tmp_path / "tensorboard").mkdir()
  empty = tmp_path / "tensorboard" / "events.out.tfevents.1.host"
  empty.write_bytes(b"")
  MetricWriter(str(tmp_path), echo=lambda s: None).close()
  assert not empty.exists() and len(os.listdir(tmp_path / "tensorboard")) == 1


def test_a_validation_cut_off_after_its_checkpoint_is_done_on_resume(tmp_path, monkeypatch):
  """The run saved step 4 and stopped while evaluating it (a kill): the resumed run writes the
  validation record of step 4 before it trains on."""
  c = tiny_config(steps=4)
  c.train.eval_every, c.checkpoint.every_steps = 4, 4
  real = Trainer.evaluate

  def killed(self, params, step, num_batches):
    raise KeyboardInterrupt  # stands for the kill: the checkpoint of step 4 is committed

  monkeypatch.setattr(Trainer, "evaluate", killed)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  assert ckpt.complete_steps(str(tmp_path / "checkpoints")) == [4]
  assert read_metrics(str(tmp_path), "validation") == []
  monkeypatch.setattr(Trainer, "evaluate", real)
  c.train.steps = 6
  out = train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  assert out["start_step"] == 4
  assert [r["step"] for r in read_metrics(str(tmp_path), "validation")] == [4, 6]
  assert event_steps(tmp_path, "validation/") == [4, 6]
  # resumed again at a step whose validation is logged: not evaluated twice
  c.train.steps = 8
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  assert [r["step"] for r in read_metrics(str(tmp_path), "validation")] == [4, 6, 8]


def test_divergence_names_the_checkpoint_still_being_written(tmp_path, monkeypatch):
  """Step 7 diverges while the save of step 6 is still in flight (slowed down here): the error
  names step 6, which is on disk when the run exits (it named step 4)."""
  real_save, real_wait = ckpt.RunCheckpoints.save, ckpt.RunCheckpoints.wait
  in_flight: list[threading.Thread] = []

  def slow_save(self, step, *args, **kwargs):
    """Step 6 is written, then hidden until `wait` (or 1 s) as if still being written."""
    saved = real_save(self, step, *args, **kwargs)
    if step == 6:
      real_wait(self)
      path = self.step_path(step)
      os.rename(path, path + ".writing")
      t = threading.Thread(target=lambda: (time.sleep(1.0), os.rename(path + ".writing", path)))
      t.start()
      in_flight.append(t)
    return saved

  def wait(self):
    while in_flight:
      in_flight.pop().join()
    real_wait(self)

  monkeypatch.setattr(ckpt.RunCheckpoints, "save", slow_save)
  monkeypatch.setattr(ckpt.RunCheckpoints, "wait", wait)
  monkeypatch.setattr(ckpt.RunCheckpoints, "close", lambda self: (wait(self),
                                                                  self._mngr.close()))
  real_loss = Trainer.loss_fn

  def loss_fn(self, params, batch, step):
    loss, metrics = real_loss(self, params, batch, step)
    loss = jnp.where(step == 6, jnp.nan, loss)  # the update completing step 7
    return loss, dict(metrics, loss=loss)

  monkeypatch.setattr(Trainer, "loss_fn", loss_fn)
  with pytest.raises(NonFiniteError, match=r"at step 7 .*last checkpoint: step 6\."):
    train_and_evaluate(tiny_config(), str(tmp_path), echo=lambda s: None)
  assert ckpt.complete_steps(str(tmp_path / "checkpoints")) == [2, 4, 6]
