"""The training loop: `train_and_evaluate` runs a `Trainer`'s jitted steps from a run directory's
start (runs/resume.py) and hands each finished step to four small hooks, one job each:

  StepLogger      progress bar, throughput and MFU, train metrics (metrics.jsonl, TensorBoard)
  NonFiniteGuard  counts steps whose update was not applied; stops past train.skip_nonfinite
  Checkpointer    saves every checkpoint.every_steps, at the last step, on SIGTERM and Ctrl-C
  Evaluator       validation every train.eval_every, at the last step, and the step a resumed
                  run saved but stopped before evaluating
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ttt_jax.data import pipeline
from ttt_jax.data.dataset import Dataset
from ttt_jax.data.saved_tokenizer import save_tokenizer
from ttt_jax.models import count_params
from ttt_jax.runs.diskspace import check_space, close_all, tree_bytes
from ttt_jax.runs.resume import start_run
from ttt_jax.runs.workdir import TOKENIZER_DIR, exclusive_workdir
from ttt_jax.train.devicememory import explained
from ttt_jax.train.flops import peak_flops_per_device, train_flops_per_token
from ttt_jax.train.metrics import MetricWriter, Throughput
from ttt_jax.train.trainer import Trainer, tokens_per_step


class PreemptionWatch:
  """Notices SIGTERM or Ctrl-C (SIGINT) on one process, JAX's preemption sync point on several;
  `signal` names the one that came first. A second Ctrl-C stops at once (KeyboardInterrupt)."""

  def __init__(self):
    self.requested = False
    self.signal: str | None = None
    self._old = {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
          self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signal == "SIGINT":
      raise KeyboardInterrupt  # Ctrl-C again while the checkpoint is written: stop now
    self.requested = True
    self.signal = self.signal or signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service not enabled in jax.distributed
        return False
    return self.requested

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class NonFiniteError(RuntimeError):
  """Training met more non-finite losses/gradients than `train.skip_nonfinite` allows."""


class Dispatched(NamedTuple):
  """A step sent to the device whose metrics the host has not read yet."""
  step: int  # the step this update completes (1-based)
  metrics: dict  # device scalars, not yet fetched
  position: str  # the data iterator's state before this batch (where the batch came from)


class StepLogger:
  """Progress bar, throughput / MFU and the train records of every `train.log_every`-th step
  (and of every non-finite one)."""

  def __init__(self, config: ml_collections.ConfigDict, n_params: int, start: int, log):
    self.log_every, self.steps = config.train.log_every, config.train.steps
    self.speed = Throughput(tokens_per_step(config))
    self.flops_per_token = train_flops_per_token(config, n_params)
    self.peak, peak_source = peak_flops_per_device(config.model.compute_dtype)
    if self.peak:
      self.peak *= jax.device_count()
      log(f"MFU against {self.peak / 1e12:.3g} TFLOP/s peak ({jax.device_count()} x "
          f"{peak_source}), {self.flops_per_token / 1e6:.3g} MFLOP per token")
    self.history: list[dict[str, float]] = []
    self.writer: MetricWriter | None = None  # opened by `open`, once the run's start is checked
    self.timing = False  # the clock starts when the first step ends (that step compiles)
    self.bar = tqdm(total=self.steps, initial=start, desc="train", unit="step",
                    disable=jax.process_index() != 0, dynamic_ncols=True)

  def open(self, workdir: str | None, start: int, log) -> MetricWriter:
    self.writer = MetricWriter(workdir, echo=log, first_step=start)
    return self.writer

  def wants(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.steps

  def record(self, step: int, metrics: dict[str, float] | None, finite: bool) -> None:
    """Step `step` finished; `metrics` (host floats) when it is logged, else None."""
    if not self.timing:
      self.timing = True
      self.speed.update(step)
    elif metrics is not None and finite:
      self._add_rate(step, metrics)
    if metrics is not None:
      if finite:
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}",
                             **({"mfu": f"{metrics['mfu']:.1%}"} if "mfu" in metrics else {}))
      self.history.append({"step": step, **metrics})
      self.writer.write(step, metrics, "train")
    self.bar.update(1)

  def _add_rate(self, step: int, metrics: dict[str, float]) -> None:
    rate = self.speed.update(step)
    if rate is not None:
      metrics["tokens_per_s"] = rate
      if self.peak:
        metrics["mfu"] = self.flops_per_token * rate / self.peak

  def pause_clock(self, step: int) -> None:
    """Time from here on (evaluation) does not count as training time."""
    self.speed.update(step)

  def closers(self) -> tuple:
    return self.bar.close, None if self.writer is None else self.writer.close


class NonFiniteGuard:
  """A step whose loss or gradient is not finite was not applied (the train step keeps the old
  state); past `train.skip_nonfinite` such steps the run stops naming the step and the batch."""

  def __init__(self, allowed: int, checkpoints, log):
    self.allowed, self.checkpoints, self.log = allowed, checkpoints, log
    self.skipped = 0

  def skipped_step(self, d: Dispatched, metrics: dict[str, float]) -> None:
    self.skipped += 1
    what = (f"non-finite loss={metrics['loss']:.4g} / grad_norm={metrics['grad_norm']:.4g} at "
            f"step {d.step} (batch at data position {d.position}); its update was not applied")
    if self.skipped <= self.allowed:
      self.log(f"warning: {what}; skipped ({self.skipped} of train.skip_nonfinite="
               f"{self.allowed})")
      return
    last = None
    if self.checkpoints is not None:
      self.checkpoints.wait()  # a save in flight is on disk before the error names the last one
      last = self.checkpoints.latest_step()
    raise NonFiniteError(
        f"{what}; stopping after {self.skipped} such step(s) (train.skip_nonfinite="
        f"{self.allowed}); last checkpoint: {'none' if last is None else f'step {last}'}. "
        "Lower train.lr or raise train.warmup_steps, or allow skips with "
        "train.skip_nonfinite=N")


class Checkpointer:
  """Saves every `checkpoint.every_steps` and at the last step (asynchronously), and at once on
  a preemption; nothing when the run has no workdir."""

  def __init__(self, checkpoints, config: ml_collections.ConfigDict):
    self.checkpoints, self.config = checkpoints, config
    self.every, self.steps = config.checkpoint.every_steps, config.train.steps

  def due(self, step: int) -> bool:
    return self.checkpoints is not None and (
        (self.every and step % self.every == 0) or step == self.steps)

  def save(self, step: int, state, it, *, wait: bool = False) -> None:
    if self.checkpoints is not None:
      self.checkpoints.save(step, state, it.get_state(), self.config, wait=wait)

  def check_space(self, state) -> None:
    """The next save must fit on the disk: checked before the first step."""
    if self.checkpoints is not None:
      check_space(self.checkpoints.directory, tree_bytes((state.params, state.opt_state)),
                  "a checkpoint of this run")

  def closers(self) -> tuple:  # closing waits for an async save in flight
    return (None if self.checkpoints is None else self.checkpoints.close,)


class Evaluator:
  """Validation every `train.eval_every` steps and at the last step."""

  def __init__(self, trainer: Trainer, writer: MetricWriter):
    self.trainer, self.writer = trainer, writer
    tr = trainer.config.train
    self.every, self.steps, self.batches = tr.eval_every, tr.steps, tr.eval_batches
    self.last: dict[str, float] = {}

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step == self.steps

  def missed(self, start: int) -> bool:
    """A completed run reports its validation; a resumed run evaluates its first step when the
    run before it saved that step but stopped before its validation record was written."""
    return start >= self.steps or (start and start % self.every == 0
                                   and not self.writer.logged(start, "validation"))

  def run(self, params, step: int, *, unless_logged: bool = False) -> None:
    self.last = self.trainer.evaluate(params, step, self.batches)
    if not (unless_logged and self.writer.logged(step, "validation")):
      self.writer.write(step, self.last, "validation")


@exclusive_workdir  # config + data checked before the workdir is touched; one run per workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None,
                       *, echo=print, data: Dataset | None = None) -> dict[str, Any]:
  """Trains to `config.train.steps` updates, resuming from `workdir`'s latest checkpoint.

  Saves a checkpoint every `checkpoint.every_steps`, at the end, on SIGTERM (then returns with
  `preempted=True`) and on Ctrl-C (then raises KeyboardInterrupt). A step whose loss or gradient is
  not finite is not applied; past `train.skip_nonfinite` such steps the run stops with
  `NonFiniteError` naming the step and the batch's data position (the last checkpoint, all
  finite, stays). Steps run one ahead of the host: step n is dispatched before step n-1's
  metrics are read, so the progress bar counts finished steps without stalling the device.
  Returns the final state, train history, validation metrics. `data`: `config.data` resolved
  (`exclusive_workdir` passes the one its start-up check built).
  """

  def log(s: str) -> None:
    if jax.process_index() == 0:
      tqdm.write(s) if echo is print else echo(s)

  trainer = Trainer.create(config, data=data)
  config = trainer.config
  steps = config.train.steps
  n_params = count_params(trainer.abstract_params)
  log(f"model {config.model.kind} (mixer {config.model.mixer}): {n_params / 1e6:.2f}M params, "
      f"mesh {dict(trainer.mesh.shape)}, seq_len {config.data.seq_len}, "
      f"batch {config.data.batch_size}")
  run = start_run(config, workdir, trainer, echo=log)
  state, start = run.state, run.step
  checkpointer = Checkpointer(run.checkpoints, config)
  logger: StepLogger | None = None
  evaluator: Evaluator | None = None
  preempted = False

  # the sequences of a step's batch on each device (by the batch's sharding and mesh.rules)
  rows_per_device = trainer.batch_sharding.shard_shape(
      (config.data.batch_size, config.data.seq_len + 1))[0]

  def finish(d: Dispatched) -> None:
    """Waits for step d.step, reads its metrics when they are logged or not finite."""
    with explained(config, rows_per_device, d.step):  # a step's error may surface only here
      finite = bool(jax.device_get(d.metrics["finite"]))
    metrics = None
    if not finite or logger.wants(d.step):
      metrics = {k: float(v) for k, v in jax.device_get(d.metrics).items()}
    logger.record(d.step, metrics, finite)
    if not finite:
      guard.skipped_step(d, metrics)

  pending: Dispatched | None = None
  failing = True
  try:
    if workdir is not None and jax.process_index() == 0:  # the run's copy (runs/load.py)
      save_tokenizer(trainer.data.tokenizer, os.path.join(workdir, TOKENIZER_DIR))
    it = pipeline.make_iterator(trainer.dataset("train"), config.data.prefetch)
    if run.data_state:
      it.set_state(run.data_state)
    logger = StepLogger(config, n_params, start, log)
    guard = NonFiniteGuard(config.train.skip_nonfinite, run.checkpoints, log)
    if start < steps:
      checkpointer.check_space(state)
    evaluator = Evaluator(trainer, logger.open(workdir, start, log))
    if start >= steps:
      log(f"run already complete at step {start} (train.steps={steps})")
    if evaluator.missed(start):
      evaluator.run(state.params, start, unless_logged=True)
    with PreemptionWatch() as watch:  # the logger's clock starts when the first step ends
      for step in range(start, steps):
        position = json.dumps(it.get_state(), default=str, separators=(",", ":"))
        with explained(config, rows_per_device, step + 1):
          state, metrics = trainer.train_step(state, trainer.device_batch(next(it)))
        completed = step + 1
        if pending is not None:
          finish(pending)
        pending = Dispatched(completed, metrics, position)
        save, evaluate = checkpointer.due(completed), evaluator.due(completed)
        stop = watch.reached(completed)  # read once: a signal landing later waits a step
        if save or evaluate or stop:
          finish(pending)  # never save or evaluate past a step that has not been checked
          pending = None
        if save:
          checkpointer.save(completed, state, it)
        if stop:
          checkpointer.save(completed, state, it, wait=True)
          if watch.signal == "SIGINT":  # saved; then the caller stops as on any Ctrl-C
            log(f"interrupted (Ctrl-C): saved checkpoint at step {completed}")
            raise KeyboardInterrupt
          log(f"preempted (SIGTERM): saved checkpoint at step {completed}; exiting")
          preempted = True
          break
        if evaluate:
          evaluator.run(state.params, completed)
          logger.pause_clock(completed)  # do not count eval time as training time
      if pending is not None:
        finish(pending)
    failing = False
  finally:
    close_all(*(() if logger is None else logger.closers()), *checkpointer.closers(),
              failing=failing)
  return {"state": state, "history": logger.history, "val": evaluator.last, "trainer": trainer,
          "start_step": start, "preempted": preempted, "skipped_nonfinite": guard.skipped}
