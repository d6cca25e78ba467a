"""A run never trains on after a non-finite loss/gradient; metrics stay strict JSON; every step is
logged once after a rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt_jax.config import build_config
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.train.loop import NonFiniteError, train_and_evaluate
from ttt_jax.train.metrics import METRICS_FILE, MetricWriter, truncate_metrics
from ttt_jax.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(steps=8):
  c = build_config("model=swa,scale=tiny,ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.window = 1, 32, 2, 64, 32
  c.data.batch_size = 2
  c.train.steps, c.train.warmup_steps = steps, 2
  c.train.log_every, c.train.eval_every, c.train.eval_batches = 1, 100, 1
  c.checkpoint.every_steps, c.checkpoint.keep = 2, 10
  return c


def strict_records(workdir) -> list[dict]:
  """metrics.jsonl parsed by a strict reader (bare NaN/Infinity rejected)."""
  def reject(name):
    raise ValueError(f"non-standard JSON constant {name}")

  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line, parse_constant=reject) for line in f]


def poison_steps(monkeypatch, bad: set[int]):
  """The loss is NaN at the (0-based) optimizer steps in `bad`, real elsewhere."""
  real = Trainer.loss_fn

  def loss_fn(self, params, batch, step):
    loss, metrics = real(self, params, batch, step)
    is_bad = jnp.isin(step, jnp.asarray(sorted(bad), jnp.int32))
    loss = jnp.where(is_bad, jnp.nan, loss)
    return loss, dict(metrics, loss=loss)

  monkeypatch.setattr(Trainer, "loss_fn", loss_fn)


def test_huge_lr_stops_the_run_with_one_line_and_keeps_finite_checkpoints(tmp_path):
  """The reported probe: lr=1e9 goes non-finite within a few steps. The run exits != 0 with one
  line naming the step and data position; the checkpoints on disk are finite; JSON is strict."""
  workdir = tmp_path / "run"
  flags = ["--config.train.lr=1e9", "--config.train.warmup_steps=1", "--config.train.steps=20",
           "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=3",
           "--config.model.d_model=32", "--config.model.num_layers=1",
           "--config.model.num_heads=2", "--config.data.batch_size=2",
           "--config.train.log_every=1"]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config",
       os.path.join(ROOT, "configs", "pretrain.py") + ":model=transformer,ctx=64",
       "--workdir", str(workdir), *flags],
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT,
      timeout=300)
  assert proc.returncode != 0
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert "Traceback" not in proc.stderr
  bad_step = int(last.split(" at step ")[1].split()[0])
  assert "non-finite" in last and "data position" in last and "train.skip_nonfinite" in last
  assert bad_step < 20
  records = strict_records(workdir)
  assert [r["step"] for r in records] == list(range(1, bad_step + 1))
  assert records[-1]["loss"] is None or records[-1]["grad_norm"] is None
  steps = ckpt.RunCheckpoints(str(workdir / "checkpoints"), read_only=True).steps()
  assert steps and max(steps) == bad_step - 1  # nothing saved at or after the bad step
  trainer = Trainer.create(_probe_config())
  run = ckpt.RunCheckpoints(str(workdir / "checkpoints"), read_only=True)
  state, _, _ = run.restore(max(steps), trainer)
  run.close()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _probe_config():
  c = build_config("model=transformer,ctx=64")
  c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 1, 2
  c.data.batch_size = 2
  c.train.lr, c.train.warmup_steps, c.train.steps = 1e9, 1, 20
  return c


def test_skip_nonfinite_skips_then_stops(tmp_path, monkeypatch):
  """train.skip_nonfinite=2: two bad batches are skipped (their update is not applied, the run
  goes on); the third stops the run, naming it; the checkpoints on disk precede it."""
  poison_steps(monkeypatch, {2, 4, 6})  # the updates completing steps 3, 5, 7
  c = tiny_config(steps=8)
  c.train.skip_nonfinite = 2
  lines = []
  with pytest.raises(NonFiniteError, match=r"at step 7 \(batch at data position"):
    train_and_evaluate(c, str(tmp_path), echo=lines.append)
  warnings = [s for s in lines if s.startswith("warning: non-finite")]
  assert len(warnings) == 2 and "step 3" in warnings[0] and "step 5" in warnings[1]
  records = strict_records(tmp_path)
  assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 8))
  assert [r["finite"] for r in records] == [1, 1, 0, 1, 0, 1, 0]
  assert ckpt.RunCheckpoints(str(tmp_path / "checkpoints"), read_only=True).steps() == [2, 4, 6]


def optimizer_counts(opt_state) -> list[int]:
  """Every `count` of the optimizer state (the schedule's and Adam's)."""
  return [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]


def test_a_skipped_step_leaves_params_and_moments_unchanged_and_counts_it(monkeypatch):
  poison_steps(monkeypatch, {1})
  c = tiny_config()
  trainer = Trainer.create(c)
  state = trainer.init_state()
  batch = {"tokens": np.random.default_rng(0).integers(0, 259, (2, 65)).astype(np.int32)}
  state, m0 = trainer.train_step(state, trainer.device_batch(batch))
  before = jax.device_get((state.params, optax.tree_utils.tree_set(state.opt_state, count=0)))
  state, m1 = trainer.train_step(state, trainer.device_batch(batch))
  assert optimizer_counts(state.opt_state) and set(optimizer_counts(state.opt_state)) == {2}
  after = jax.device_get((state.params, optax.tree_utils.tree_set(state.opt_state, count=0)))
  assert float(m0["finite"]) == 1 and float(m1["finite"]) == 0 and int(state.step) == 2
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(a, b)
  state, m2 = trainer.train_step(state, trainer.device_batch(batch))
  assert float(m2["finite"]) == 1
  now = jax.tree.leaves(jax.device_get(state.params))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[0]), now, strict=True))


def test_an_update_that_overflows_is_dropped_though_loss_and_gradients_are_finite(monkeypatch):
  """The guard also checks the update itself: with decoupled weight decay, lr * weight_decay >> 1
  turns finite gradients and finite (large) parameters into an infinite update, which must not
  reach the state either. (Dropping this check would save XLA a pass over the optimizer state:
  191 of the transformer step's 967 kernel launches on an H200, `make gpu-census`.)"""
  def loss_fn(self, params, batch, step):  # finite loss, small finite gradients
    loss = 1e-30 * sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(params))
    return loss, {"loss": loss}

  monkeypatch.setattr(Trainer, "loss_fn", loss_fn)
  c = tiny_config()
  c.train.lr, c.train.warmup_steps, c.train.weight_decay = 1e9, 0, 0.1
  trainer = Trainer.create(c)
  state = trainer.init_state()
  big = jax.tree.map(lambda x: jnp.full_like(x, 1e31), state.params)  # finite, decayed: 1e39
  state = state.replace(params=big)
  batch = {"tokens": np.random.default_rng().integers(0, 259, (2, 65)).astype(np.int32)}
  before = jax.device_get(state.params)
  state, m = trainer.train_step(state, trainer.device_batch(batch))
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert float(m["finite"]) == 0 and int(state.step) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_rollback_logs_every_step_once(tmp_path):
  """checkpoint.step=N rolls back: the records past N are dropped, then logged again once."""
  c = tiny_config(steps=8)
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  c.checkpoint.step = 4
  lines = []
  train_and_evaluate(c, str(tmp_path), echo=lines.append)
  assert any("dropped" in s and "past step 4" in s for s in lines)
  train = [r["step"] for r in strict_records(tmp_path) if r["split"] == "train"]
  assert train == list(range(1, 9))


def test_truncate_metrics_drops_later_records_and_moves_a_cut_line_aside(tmp_path):
  path = tmp_path / METRICS_FILE
  rows = [{"step": s, "split": "train", "loss": float(s)} for s in range(1, 6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "spl')
  logs = []
  assert truncate_metrics(str(tmp_path), 3, echo=logs.append) == 2
  assert [r["step"] for r in strict_records(tmp_path)] == [1, 2, 3]
  assert len(logs) == 1 and "line 6 is damaged" in logs[0], logs
  assert (tmp_path / f"{METRICS_FILE}.damaged.1").read_text() == '{"step": 6, "spl\n'
  assert truncate_metrics(str(tmp_path), 3) == 0


def test_a_fresh_start_keeps_an_earlier_runs_metrics(tmp_path):
  """Checkpoints deleted, same command again: the run starts at step 0 and the earlier run's
  metrics.jsonl is kept beside the new one (it used to be truncated to nothing)."""
  path = tmp_path / METRICS_FILE
  old = "".join(json.dumps({"step": s, "split": "train", "loss": 1.0}) + "\n" for s in (1, 2))
  path.write_text(old)
  logs = []
  w = MetricWriter(str(tmp_path), echo=logs.append, first_step=0)
  w.write(1, {"loss": 2.0})
  w.close()
  assert (tmp_path / f"{METRICS_FILE}.1").read_text() == old
  assert [r["loss"] for r in strict_records(tmp_path)] == [2.0]
  assert any(f"kept as {path}.1" in s for s in logs), logs


def test_metric_writer_writes_nonfinite_as_null(tmp_path):
  w = MetricWriter(str(tmp_path), echo=lambda s: None)
  w.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
  w.close()
  (rec,) = strict_records(tmp_path)
  assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] == 0.5


def test_schedule_applied_after_a_skip_is_the_logged_one(monkeypatch):
  """One clock: after a skipped step the optimizer's schedule (its count) is at state.step, so
  the lr it applies is lr_schedule(state.step), the one logged (it was one step behind)."""
  from ttt_jax.train.optim import lr_schedule  # noqa: PLC0415

  poison_steps(monkeypatch, {1})
  c = tiny_config()
  c.train.warmup_steps, c.train.weight_decay, c.train.grad_clip = 4, 0.0, 0.0
  trainer = Trainer.create(c)
  state = trainer.init_state()
  batch = {"tokens": np.random.default_rng(0).integers(0, 259, (2, 65)).astype(np.int32)}
  for _ in range(2):  # step 0 applied, step 1 skipped
    state, _ = trainer.train_step(state, trainer.device_batch(batch))
  counts = optimizer_counts(state.opt_state)
  assert set(counts) == {2} == {int(state.step)}
  state, m2 = trainer.train_step(state, trainer.device_batch(batch))
  assert float(m2["lr"]) == pytest.approx(float(lr_schedule(c.train)(2)))
  assert set(optimizer_counts(state.opt_state)) == {3}


@pytest.mark.extended
def test_a_repeated_rollback_flag_continues_instead_of_discarding_again(tmp_path):
  """A requeued job that still carries checkpoint.step=N (after the rollback to N trained on)
  resumes from its latest step; a different N rolls back again."""
  c = tiny_config(steps=8)
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)
  c.checkpoint.step = 4
  train_and_evaluate(c, str(tmp_path), echo=lambda s: None)  # the rollback, trains 5..8 again
  c.train.steps = 10
  lines = []
  out = train_and_evaluate(c, str(tmp_path), echo=lines.append)
  assert out["start_step"] == 8 and int(out["state"].step) == 10
  assert any("rolled back to step 4 by an earlier launch" in s for s in lines), lines
  assert not any("moved later checkpoints" in s for s in lines)
  train = [r["step"] for r in strict_records(tmp_path) if r["split"] == "train"]
  assert train == list(range(1, 11))
  c.checkpoint.step = 6  # checkpoints every 2 steps, keep 10: step 6 is on disk
  lines.clear()
  out = train_and_evaluate(c, str(tmp_path), echo=lines.append)
  assert out["start_step"] == 6 and int(out["state"].step) == 10
  assert any("resuming from step 6 as requested" in s for s in lines), lines
