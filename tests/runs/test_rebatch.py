"""Resuming a run with another data.batch_size: the saved data position (grain counts batches) is
counted again in the new size, so the run continues after the windows it read (runs/resume.py)."""

from __future__ import annotations

import os

from ttt_jax.config import build_config
from ttt_jax.runs.checkpoint import CKPT_DIR, RunCheckpoints
from ttt_jax.train.loop import train_and_evaluate


def test_a_resume_with_a_larger_batch_continues_after_the_windows_read(tmp_path):
  c = build_config("model=swa,scale=tiny,ctx=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.model.intermediate_size, c.model.window = 64, 16
  c.data.batch_size, c.data.prefetch = 4, 0
  c.train.steps, c.train.warmup_steps, c.train.eval_every = 3, 1, 1000
  c.checkpoint.every_steps = 1
  workdir = str(tmp_path / "run")
  train_and_evaluate(c, workdir, echo=lambda s: None)
  c.data.batch_size, c.train.steps = 8, 4
  lines = []
  train_and_evaluate(c, workdir, echo=lines.append)
  assert ("data.batch_size changed from 4 to 8: the data continues after the 12 windows read so "
          "far (4 skipped, to start a whole batch)") in lines, lines
  checkpoints = RunCheckpoints(os.path.join(workdir, CKPT_DIR), read_only=True)
  assert checkpoints.saved_data_state(3)["next_index"] == 3  # 3 batches of 4
  assert checkpoints.saved_data_state(4)["next_index"] == 3  # from ceil(12 / 8) = 2, one step
