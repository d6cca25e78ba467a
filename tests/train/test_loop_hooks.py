"""The training loop's hooks decide when to save, evaluate and log on their own (the loop itself is
tested end to end in test_train.py, test_run_records.py, test_nonfinite.py, test_interrupt.py)."""

from __future__ import annotations

import types

import pytest

from ttt_jax.config import ConfigError, build_config
from ttt_jax.train.loop import (
  Checkpointer,
  Dispatched,
  Evaluator,
  NonFiniteError,
  NonFiniteGuard,
  train_and_evaluate,
)


def _config(steps=10, every=4, eval_every=3):
  config = build_config("model=transformer,scale=tiny,ctx=64")
  config.train.steps, config.train.eval_every = steps, eval_every
  config.checkpoint.every_steps = every
  return config


def test_checkpointer_saves_every_n_steps_and_at_the_end_and_never_without_a_workdir():
  config = _config()
  on_disk = Checkpointer(object(), config)
  assert [s for s in range(1, 11) if on_disk.due(s)] == [4, 8, 10]
  config.checkpoint.every_steps = 0
  assert [s for s in range(1, 11) if Checkpointer(object(), config).due(s)] == [10]
  assert not any(Checkpointer(None, _config()).due(s) for s in range(1, 11))


def test_evaluator_runs_every_n_steps_at_the_end_and_a_resumed_step_left_unevaluated():
  logged = {6}
  writer = types.SimpleNamespace(logged=lambda step, split: step in logged)
  trainer = types.SimpleNamespace(config=_config())
  ev = Evaluator(trainer, writer)
  assert [s for s in range(1, 11) if ev.due(s)] == [3, 6, 9, 10]
  assert ev.missed(3) and not ev.missed(6)  # saved at 3 without a validation record; 6 has one
  assert not ev.missed(0) and not ev.missed(4) and ev.missed(10)  # a finished run reports


def test_guard_warns_up_to_the_allowed_skips_then_names_the_step_and_the_last_checkpoint():
  notes = []
  checkpoints = types.SimpleNamespace(wait=lambda: notes.append("waited"),
                                      latest_step=lambda: 4)
  guard = NonFiniteGuard(1, checkpoints, notes.append)
  metrics = {"loss": float("nan"), "grad_norm": float("inf")}
  guard.skipped_step(Dispatched(5, {}, '{"pos":5}'), metrics)
  assert guard.skipped == 1 and notes[-1].startswith("warning: non-finite loss=nan")
  with pytest.raises(NonFiniteError, match=r"step 6 .*pos.*6.*last checkpoint: step 4"):
    guard.skipped_step(Dispatched(6, {}, '{"pos":6}'), metrics)
  assert notes[-1] == "waited"  # a save in flight lands before the error names the last one


def test_a_fresh_start_failing_in_the_trainer_leaves_no_workdir(tmp_path):
  """The model cannot be built here (cuDNN attention on a CPU): the run fails in one line and
  the workdir it created is gone, with nothing written into it (no tokenizer copy either)."""
  config = _config()
  config.model.attention_impl = "cudnn"
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="attention_impl"):
    train_and_evaluate(config, str(workdir), echo=lambda s: None)
  assert not workdir.exists(), list(workdir.iterdir())
