"""Ctrl-C (SIGINT) stops a training run like SIGTERM: it saves a checkpoint at the step reached
and exits with one line (status 130, no KeyboardInterrupt traceback); the same command resumes.
In-process callers (the demo, the reproduction) get the KeyboardInterrupt once it is saved."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from ttt_jax.runs.checkpoint import complete_steps
from ttt_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.intermediate_size=64",
         "--config.data.batch_size=2", "--config.train.log_every=1",
         "--config.train.eval_every=100000", "--config.checkpoint.every_steps=100000"]


def train(workdir, steps, cache) -> subprocess.Popen:
  """scripts/train.py with train.compilation_cache=`cache`, storing every program (the
  environment's overrides of the directory, JAX's and the package's, are taken away)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for name in ("JAX_COMPILATION_CACHE_DIR", "TTT_JAX_COMPILATION_CACHE"):
    env.pop(name, None)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  flags = [*FLAGS, f"--config.train.compilation_cache={cache}"]
  # SIGINT at its default: a shell's background job would start with it ignored
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=swa,ctx=64", "--workdir",
       str(workdir), f"--config.train.steps={steps}", *flags],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def train_steps_cached(cache) -> set[str]:
  return {e for e in os.listdir(cache) if "train_step" in e} if os.path.isdir(cache) else set()


def test_ctrl_c_saves_the_step_reached_and_the_same_command_resumes(tmp_path):
  """Ctrl-C saves the step reached; the same command resumes. Both runs keep their compiled
  programs in the directory train.compilation_cache names: each stores its train step there
  (the relaunch runs to another step count, so its schedule, and with it the program, differ;
  tests/train/test_compilation_cache.py reads programs back)."""
  cache, tmp_path = tmp_path / "xla", tmp_path / "run"
  proc = train(tmp_path, 100000, cache)
  end = time.time() + 300
  while not read_metrics(str(tmp_path)):  # training, past compilation
    assert proc.poll() is None and time.time() < end
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
  step = int(re.search(r"interrupted \(Ctrl-C\): saved checkpoint at step (\d+)\n", out)[1])
  last = [line for line in out.splitlines() if line.strip()][-1]
  assert last == ("train.py: error: interrupted (Ctrl-C); rerun the same command to resume from "
                  "the run's last complete checkpoint")
  assert complete_steps(str(tmp_path / "checkpoints")) == [step]
  stored = train_steps_cached(cache)
  assert stored, os.listdir(cache) if os.path.isdir(cache) else f"no {cache}"
  again = train(tmp_path, step + 2, cache)
  out, _ = again.communicate(timeout=300)
  assert again.returncode == 0 and f"resumed from step {step} (" in out, out[-3000:]
  assert len(train_steps_cached(cache) - stored) == 1
