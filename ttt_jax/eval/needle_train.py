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
warmup, lr as fine-tuned), `metrics.jsonl` and TensorBoard events; load_run, scripts/evaluate.py
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
from ttt_jax.train import checkpoint as ckpt
from ttt_jax.train.metrics import MetricWriter
from ttt_jax.train.runs import Run, load_run
from ttt_jax.train.trainer import Trainer
from ttt_jax.train.workdir import WorkdirLock


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


def fine_tune(run: Run, steps: int, workdir: str, *, seq_len: int | None = None,
              batch_size: int | None = None, lr: float | None = None, seed: int = 0,
              progress: bool = True, echo: Callable[[str], None] = print) -> tuple[Run, dict]:
  """Trains a copy of `run` on the task for `steps` steps into `workdir` (module docstring).
  Returns the fine-tuned run (as load_run opens it) and a report with the probe loss before and
  after."""
  if os.path.isdir(os.path.join(workdir, ckpt.CKPT_DIR)):
    raise ConfigError(f"--ft_workdir {workdir} already holds a run; evaluate it with --workdir "
                      f"{workdir}, or delete it / choose another --ft_workdir to fine-tune again")
  config = fine_tune_config(run, steps, seq_len=seq_len, batch_size=batch_size, lr=lr)
  trainer = Trainer.create(config, data=run.data)  # validates: e.g. seq_len vs mini-batches
  tok, length, rows = run.data.tokenizer, config.data.seq_len, config.data.batch_size
  hay = N.haystack_tokens(run.data.stream("train"), tok)
  probe = N.training_batch(hay, tok, length, rows, np.random.default_rng([seed, 2]))
  probe = trainer.device_batch(probe)
  log = tqdm.write if echo is print else echo
  with WorkdirLock(workdir, echo=log):
    state = trainer.init_state()
    state = state.replace(params=jax.device_put(run.params, trainer.state_shardings.params))
    before = float(trainer.eval_step(state.params, probe, jnp.int32(0))["loss"])
    log(f"fine-tuning {run.workdir} (step {run.step}) on the needle task: {steps} steps of "
        f"{rows} x {length} tokens, lr {config.train.lr:g}; probe loss {before:.4f}")
    writer = MetricWriter(workdir, echo=lambda s: None)
    every, skipped, losses = max(1, steps // 20), 0, []
    bar = tqdm(range(steps), desc="needle fine-tune", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
      for step in bar:
        batch = N.training_batch(hay, tok, length, rows, np.random.default_rng([seed, 1, step]))
        state, metrics = trainer.train_step(state, trainer.device_batch(batch))
        skipped += not bool(jax.device_get(metrics["finite"]))  # an update the guard dropped
        if (step + 1) % every == 0 or step + 1 == steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          losses.append(metrics["loss"])
          bar.set_postfix(loss=f"{metrics['loss']:.3f}")
          writer.write(step + 1, metrics, "train")
      after = float(trainer.eval_step(state.params, probe, jnp.int32(steps))["loss"])
      writer.write(steps, {"loss_before": before, "loss": after}, "needle_probe")
      checkpoints = ckpt.RunCheckpoints(os.path.join(workdir, ckpt.CKPT_DIR), keep=1)
      try:
        checkpoints.save(steps, state, {}, config, wait=True)
      finally:
        checkpoints.close()
    finally:
      bar.close()
      writer.close()
  log(f"fine-tuned: probe loss {before:.4f} -> {after:.4f} (answer tokens only); wrote "
      f"{workdir}")
  report = {"from_workdir": run.workdir, "from_step": run.step, "workdir": workdir,
            "steps": steps, "seq_len": length, "batch_size": rows, "lr": config.train.lr,
            "seed": seed, "probe_loss_before": before, "probe_loss_after": after,
            "logged_train_losses": losses, "skipped_nonfinite": skipped}
  return load_run(workdir), report
