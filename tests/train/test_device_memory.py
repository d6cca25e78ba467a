"""A train step that does not fit its devices' memory stops the run in one line that says what
each device holds and which settings shrink the step; the checkpoints before it are kept."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from ttt_jax.config import build_config
from ttt_jax.runs.checkpoint import complete_steps
from ttt_jax.train.devicememory import explain, explained, is_out_of_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB."

# a real train.py whose third train step fails as XLA fails an allocation on a GPU
THIRD_STEP_OOM = f"""
import sys, jax
from ttt_jax.train import trainer
calls = []
real = trainer.Trainer.train_step.fget
def train_step(self):
  step = real(self)
  def run(*args):
    calls.append(1)
    if len(calls) == 3:
      raise jax.errors.JaxRuntimeError({OOM!r} + "\\n  buffer list ...")
    return step(*args)
  return run
trainer.Trainer.train_step = property(train_step)
sys.argv[0] = "train.py"
from ttt_jax.cli import train_main
train_main()
"""
FLAGS = ["--config.model.d_model=32", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.intermediate_size=64",
         "--config.data.batch_size=2", "--config.train.steps=6",
         "--config.checkpoint.every_steps=2", "--config.train.log_every=1"]


def test_an_out_of_memory_step_stops_the_run_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-c", THIRD_STEP_OOM, "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=swa,ctx=64",
       "--workdir", str(tmp_path), *FLAGS], capture_output=True, text=True, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines[-1] == (  # the line docs/scaling.md shows
      f"train.py: error: train step 3 ran out of device memory ({OOM}); each device holds 2 "
      "sequences of 64 tokens at a time (data.batch_size=2 over 1 devices, train.grad_accum=1); "
      "to fit, set train.grad_accum=2 (microbatches of half as many sequences), or "
      "model.remat=full, or more devices in mesh.fsdp; docs/scaling.md gives each preset's "
      "memory per GPU"), lines[-1]
  assert complete_steps(str(tmp_path / "checkpoints")) == [2]  # the one before it is kept


def test_the_line_names_the_settings_that_apply():
  """E2E meta-learning without groups is also pointed at `model.e2e.remat_group` (where auto
  makes groups); a step already under full remat is not pointed at it; the devices hold the
  microbatch; more microbatches only where each device would still hold whole sequences."""
  c = build_config("model=e2e,scale=tiny")  # 2048 tokens in chunks of 128: groups of 4
  c.data.batch_size, c.train.grad_accum = 16, 2
  err = jax.errors.JaxRuntimeError(OOM)
  line = str(explain(err, c, rows_per_device=4, step=7))
  assert "train step 7 ran out of device memory" in line and "\n" not in line
  assert "each device holds 2 sequences of 2048 tokens" in line
  assert "over 4 devices" in line and "train.grad_accum=4" in line
  assert "model.e2e.remat_group=-1" in line
  assert "train.grad_accum" not in str(explain(err, c, rows_per_device=2, step=7)).split("set")[1]
  c.model.e2e.remat_group, c.model.remat = -1, "full"
  line = str(explain(err, c, rows_per_device=4, step=7))
  assert "remat_group" not in line and "model.remat=full" not in line
  c.model.e2e.remat_group, c.data.seq_len = 0, 512  # 4 chunks: auto makes no groups
  assert "remat_group" not in str(explain(err, c, rows_per_device=4, step=7))
  c = build_config("model=transformer,scale=tiny")
  c.model.remat = "none"
  line = str(explain(err, c, rows_per_device=1, step=1))
  assert "model.remat=full" in line and "remat_group" not in line


def test_only_out_of_memory_errors_are_explained():
  c = build_config("model=transformer,scale=tiny")
  assert is_out_of_memory(jax.errors.JaxRuntimeError(OOM))
  assert not is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: a kernel failed"))
  assert is_out_of_memory(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm"))
  assert not is_out_of_memory(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: received message larger than max (5000000 vs. 4194304)"))
  assert not is_out_of_memory(MemoryError("host memory"))
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    with explained(c, 1, 1):
      raise jax.errors.JaxRuntimeError("INTERNAL: a kernel failed")
  with pytest.raises(RuntimeError, match="train step 5 ran out of device memory") as info:
    with explained(c, 1, 5):
      raise jax.errors.JaxRuntimeError(OOM)
  assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)  # XLA's full report kept


def test_every_script_says_an_out_of_memory_error_in_one_line(capsys):
  """`cli.user_errors`, around every script's work: XLA's out-of-memory error becomes one line
  with the script's hint (evaluate.py: its batch and chunk options); other XLA errors keep
  their tracebacks."""
  from ttt_jax.cli import user_errors  # noqa: PLC0415

  with pytest.raises(SystemExit) as info:
    with user_errors(memory_hint="fewer documents per streamed batch (--batch_size) fit in less"):
      raise jax.errors.JaxRuntimeError(OOM + "\n  buffer list ...")
  assert info.value.code == 1
  line = capsys.readouterr().err.strip()
  assert line.endswith(f"error: ran out of device memory ({OOM}); fewer documents per streamed "
                       "batch (--batch_size) fit in less"), line
  with pytest.raises(SystemExit):
    with user_errors():
      raise jax.errors.JaxRuntimeError(OOM)
  assert "smaller batches or chunks fit in less (see --help)" in capsys.readouterr().err
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    with user_errors():
      raise jax.errors.JaxRuntimeError("INTERNAL: a kernel failed")
