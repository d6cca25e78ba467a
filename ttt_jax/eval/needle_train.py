"""Fine-tuning a copy of a run on the needle task format (`scripts/needle.py --train_task STEPS`).

Why: a tiny model trained for minutes on a CPU has never seen a question answered from its
context, so every cell of the needle grid reads 0 and the grid says nothing about how retrieval
depends on context length, depth and the model kind. A few hundred steps on prompts of the same
format make retrieval exist at all; the grid then measures how far it reaches.

What: rows of `seq_len` + 1 tokens (default: the run's training length), each a needle prompt
with its answer at the end (needle.training_batch): names and numbers from the TRAIN partition
(disjoint from every evaluated needle), haystacks from the run's own training split, depths
uniform in [0, 1]. The loss is on the answer tokens only (`loss_mask`); an E2E inner loop still
reads every token (`inner_loss_mask`), as it does at evaluation. The steps are the Trainer's own
jitted train step (optimizer and schedule from the run's `train` config, gradient accumulation,
sharding, the non-finite guard) fed with these batches in place of its data pipeline.

The copy is a normal workdir: a checkpoint at step STEPS with the full config (seq_len, steps,
warmup, lr as fine-tuned), `metrics.jsonl` and TensorBoard events; it is saved every
`save_every(STEPS)` steps, so the same command resumes an interrupted fine-tune (and reuses a
finished one); load_run, scripts/evaluate.py
and scripts/needle.py read it like any run. The masked loss on a fixed probe batch (same format,
rows never trained on) is reported before and after.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ttt_jax.config import ConfigError
from ttt_jax.eval import needle as N
from ttt_jax.runs import checkpoint as ckpt
from ttt_jax.runs.load import Run, load_run
from ttt_jax.runs.workdir import WorkdirLock
from ttt_jax.train.metrics import MetricWriter
from ttt_jax.train.trainer import Trainer


def fine_tune_config(run: Run, steps: int, *, seq_len: int | None = None,
                     batch_size: int | None = None,
                     lr: float | None = None) -> ml_collections.ConfigDict:
  """The run's config with the fine-tuning length, batch, steps and learning rate (warmup at
  most a tenth of the steps; the run's schedule decays over the STEPS)."""
  config = ml_collections.ConfigDict(run.config.to_dict())
  tr = config.train
  config.data.seq_len = seq_len or config.data.seq_len
  config.data.batch_size = batch_size or config.data.batch_size
  tr.steps, tr.warmup_steps = steps, min(tr.warmup_steps, steps // 10)
  tr.eval_every = steps
  if lr is not None:
    tr.lr = lr
  return config


def task_flags(steps: int, seq_len: int | None, batch_size: int | None,
               lr: float | None) -> str:
  """The fine-tuning flags as typed: '--train_task 300 --ft_seq_len 250'."""
  given = (("--train_task", steps), ("--ft_seq_len", seq_len), ("--ft_batch_size", batch_size),
           ("--ft_lr", lr))
  return " ".join(f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}"
                  for flag, v in given if v is not None)


def saved_fine_tune(checkpoints: ckpt.RunCheckpoints, workdir: str,
                    record: dict) -> tuple[int, dict]:
  """(latest step, its saved progress) of the fine-tune `record` describes in `checkpoints`
  ((0, {}): none there); one line naming --ft_workdir when the folder holds another run or
  another fine-tune."""
  step = checkpoints.latest_step()
  if step is None:
    return 0, {}
  tuned = checkpoints.saved_data_state(step).get("needle_ft", {})
  saved = tuned.get("record")
  if saved == record:
    return step, tuned
  what = ("a run that is not a needle fine-tune" if saved is None else
          "another fine-tune (" + ", ".join(f"{k} {saved.get(k)!r} (now {v!r})"
                                            for k, v in record.items() if saved.get(k) != v) + ")")
  raise ConfigError(f"--ft_workdir {workdir} already holds {what}; evaluate it with --workdir "
                    f"{workdir}, or delete it / choose another --ft_workdir to fine-tune again")


def fine_tune(run: Run, steps: int, workdir: str, *, seq_len: int | None = None,
              batch_size: int | None = None, lr: float | None = None, seed: int = 0,
              progress: bool = True, echo: Callable[[str], None] = print) -> tuple[Run, dict]:
  """Trains a copy of `run` on the task for `steps` steps into `workdir` (module docstring),
  saving every `save_every(steps)` steps. An unfinished fine-tune with the same arguments there
  is resumed, a finished one reused. Returns the fine-tuned run (as load_run opens it) and a
  report with the probe loss before and after."""
  config = fine_tune_config(run, steps, seq_len=seq_len, batch_size=batch_size, lr=lr)
  try:
    trainer = Trainer.create(config, data=run.data)  # validates: e.g. seq_len vs mini-batches
    rows = trainer.local_batch_size()  # this process's rows of data.batch_size
  except (ConfigError, ValueError) as e:
    raise ConfigError(f"{task_flags(steps, seq_len, batch_size, lr)}: {e}") from None
  # the draws of this process's block of rows (processes holding the same rows draw alike)
  tok, length, pid = run.data.tokenizer, config.data.seq_len, trainer.data_shard()[0]
  record = {"from_workdir": os.path.realpath(run.workdir), "from_step": run.step, "steps": steps,
            "seq_len": length, "batch_size": config.data.batch_size, "lr": config.train.lr,
            "seed": seed}
  hay = N.haystack_tokens(run.data.stream("train"), tok)
  probe = N.training_batch(hay, tok, length, rows, np.random.default_rng([seed, 2, pid]))
  probe = trainer.device_batch(probe)
  log = tqdm.write if echo is print else echo
  with WorkdirLock(workdir, echo=log):
    checkpoints = ckpt.RunCheckpoints(os.path.join(workdir, ckpt.CKPT_DIR), keep=1)
    try:
      start, tuned = saved_fine_tune(checkpoints, workdir, record)
      if start:
        log(f"{'reusing' if start == steps else 'resuming'} the needle fine-tune in {workdir} "
            f"at step {start} of {steps}")
      if 0 < start < steps:
        state = checkpoints.restore(start, trainer)[0]
      elif not start:
        state = trainer.init_state()
        params = jax.tree.map(jnp.copy, run.params)  # the train step donates its state
        state = state.replace(params=jax.device_put(params, trainer.state_shardings.params))
        before = float(trainer.eval_step(state.params, probe)["loss"])
        tuned = {"record": record, "probe_loss_before": before, "losses": [], "skipped": 0}
        log(f"fine-tuning {run.workdir} (step {run.step}) on the needle task: {steps} steps of "
            f"{config.data.batch_size} x {length} tokens, lr {config.train.lr:g}; probe loss "
            f"{before:.4f}")
      if start < steps:
        tuned = train_steps(trainer, state, checkpoints, config, tuned, start, hay, probe,
                           progress)
    finally:
      checkpoints.close()
  before, after = tuned["probe_loss_before"], tuned["probe_loss_after"]
  log(f"fine-tuned: probe loss {before:.4f} -> {after:.4f} (answer tokens only); wrote "
      f"{workdir}")
  report = {"from_workdir": run.workdir, "from_step": run.step, "workdir": workdir,
            "steps": steps, "seq_len": length, "batch_size": config.data.batch_size,
            "lr": config.train.lr, "seed": seed, "probe_loss_before": before,
            "probe_loss_after": after, "logged_train_losses": tuned["losses"],
            "skipped_nonfinite": tuned["skipped"], "resumed_at": start}
  return load_run(workdir), report


def save_every(steps: int) -> int:
  return max(1, min(100, steps // 4))


def train_steps(trainer: Trainer, state, checkpoints: ckpt.RunCheckpoints,
                config: ml_collections.ConfigDict, tuned: dict, start: int, hay: np.ndarray,
                probe: dict, progress: bool) -> dict:
  """Steps `start`..STEPS, saved every `save_every` steps with `tuned` (the record, the probe
  loss before, the logged losses) as the checkpoint's data state; `tuned` with the probe loss
  after."""
  tok, length, rows = trainer.data.tokenizer, config.data.seq_len, trainer.local_batch_size()
  steps, seed, pid = config.train.steps, tuned["record"]["seed"], trainer.data_shard()[0]
  workdir = os.path.dirname(checkpoints.directory)
  writer = MetricWriter(workdir, echo=lambda s: None)
  every, save = max(1, steps // 20), save_every(steps)
  bar = tqdm(range(start, steps), desc="needle fine-tune", unit="step", disable=not progress,
             dynamic_ncols=True, initial=start, total=steps)
  finite = []  # per-step flags, read on the host only when a log line or a save needs them
  try:
    for step in bar:
      batch = N.training_batch(hay, tok, length, rows,
                               np.random.default_rng([seed, 1, step, pid]))
      state, metrics = trainer.train_step(state, trainer.device_batch(batch))
      finite.append(metrics["finite"])
      if (step + 1) % every == 0 or (step + 1) % save == 0 or step + 1 == steps:
        tuned["skipped"] += sum(not bool(f) for f in jax.device_get(finite))  # dropped by the guard
        finite.clear()
      if (step + 1) % every == 0 or step + 1 == steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        tuned["losses"].append(metrics["loss"])
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        writer.write(step + 1, metrics, "train")
      if step + 1 == steps:
        after = float(trainer.eval_step(state.params, probe)["loss"])
        writer.write(steps, {"loss_before": tuned["probe_loss_before"], "loss": after},
                     "needle_probe")
        tuned["probe_loss_after"] = after
      if (step + 1) % save == 0 or step + 1 == steps:
        checkpoints.save(step + 1, state, {"needle_ft": tuned}, config, wait=True)
  finally:
    bar.close()
    writer.close()
  return tuned
