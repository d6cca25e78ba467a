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
  StepLogger,
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


def test_throughput_is_timed_from_the_end_of_the_first_step_not_over_its_compile(monkeypatch):
  """The first step of a start (or resume, here at step 4) compiles: the first logged rate
  covers the steps after it, not its compile; time before a pause (evaluation) is not counted."""
  from ttt_jax.train import metrics as M  # noqa: PLC0415
  from ttt_jax.train.trainer import tokens_per_step  # noqa: PLC0415

  config = _config(steps=20)
  config.train.log_every = 2
  logger = StepLogger(config, n_params=1000, start=4, log=lambda s: None)
  logger.open(None, 4, lambda s: None)
  now = [0.0]
  monkeypatch.setattr(M.time, "perf_counter", lambda: now[0])
  logger.pause_clock(4)
  now[0] = 30.0  # step 5 ends after 30 s of compiling
  logger.record(5, None, True)
  for step in (6, 7, 8):  # 0.5 s each; 6 and 8 logged
    now[0] += 0.5
    logger.record(step, {"loss": 1.0} if step % 2 == 0 else None, True)
  now[0] += 100.0  # evaluation, then the clock restarts
  logger.pause_clock(8)
  for step in (9, 10):
    now[0] += 0.5
    logger.record(step, {"loss": 1.0} if step % 2 == 0 else None, True)
  rates = [h["tokens_per_s"] for h in logger.history]
  assert rates == pytest.approx([tokens_per_step(config) / 0.5] * 3)
