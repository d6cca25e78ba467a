"""checkpoint.resume=False with checkpoint.overwrite=True over a run that a crash left with an
unfinished save: the leftover is removed before Orbax starts (it used to be deleted by a thread
of Orbax's that nothing waited for, racing the overwrite's own delete: a FileNotFoundError
traceback), the run starts over and exits without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import ttt_jax
from ttt_jax.config import build_config
from ttt_jax.runs import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {"model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2,
        "model.intermediate_size": 64, "data.batch_size": 2, "train.steps": 2,
        "train.warmup_steps": 1, "train.eval_batches": 1, "checkpoint.every_steps": 1}


def leave_unfinished_save(directory: str, step: int) -> str:
  """What a SIGKILL during a save leaves: a temporary step directory (here of many files)."""
  tmp = os.path.join(directory, f"{step}.orbax-checkpoint-tmp-1234")
  for d in range(40):
    os.makedirs(os.path.join(tmp, "params", f"d{d}"))
    for f in range(50):
      with open(os.path.join(tmp, "params", f"d{d}", str(f)), "wb") as fh:
        fh.write(b"x")
  return tmp


def test_a_writable_opening_has_removed_unfinished_saves(tmp_path):
  directory = str(tmp_path / ckpt.CKPT_DIR)
  tmp = leave_unfinished_save(directory, 7)
  ck = ckpt.RunCheckpoints(directory)
  try:
    assert not os.path.exists(tmp)  # gone before anything else happens in the directory
  finally:
    ck.close()


def test_overwrite_over_an_unfinished_save_starts_over_without_traceback(tmp_path):
  config = build_config("model=transformer,ctx=64")
  for k, v in TINY.items():
    section, key = k.rsplit(".", 1)
    config[section][key] = v
  workdir = str(tmp_path / "w")
  ttt_jax.train_and_evaluate(config, workdir, echo=lambda s: None)
  tmp = leave_unfinished_save(os.path.join(workdir, ckpt.CKPT_DIR), 3)
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=transformer,ctx=64",
       "--workdir", workdir, *flags, "--config.checkpoint.resume=False",
       "--config.checkpoint.overwrite=True"],
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2"))
  log = out.stdout + out.stderr
  assert out.returncode == 0 and "Traceback" not in log, log
  assert f"removing incomplete checkpoint {tmp}" in log
  assert "checkpoint.overwrite=True: deleted the previous run's checkpoints" in log
  assert ckpt.complete_steps(os.path.join(workdir, ckpt.CKPT_DIR)) == [1, 2]
  assert not os.path.exists(tmp)
