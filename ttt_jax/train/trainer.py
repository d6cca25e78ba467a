"""Train state, the jitted (pjit-style) train/eval steps, and the training loop.

Functional core: the model is built once, split into `graphdef` + parameters (a pure dict of
arrays); every step is a pure function that merges them back (`nnx.merge`) inside `jax.jit`,
with explicit in/out shardings over the ('data', 'fsdp', 'tensor') mesh.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from ttt_jax.config import validate
from ttt_jax.data import pipeline
from ttt_jax.models import build_model
from ttt_jax.train import sharding as shd
from ttt_jax.train.optim import lr_schedule, make_optimizer
from ttt_jax.train.workdir import exclusive_workdir


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of completed optimizer updates
  params: Any  # pure dict of arrays
  opt_state: Any
  rng: jax.Array  # uint32 key data


@dataclasses.dataclass
class Trainer:
  """Everything compiled for one config on one mesh."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_params: Any  # pure dict of ShapeDtypeStruct
  optimizer: optax.GradientTransformation
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  rules: shd.Rules = shd.LOGICAL_RULES  # logical axis -> mesh axes (mesh.rules)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    pipeline.sync_vocab(config)  # model.vocab_size follows the data tokenizer
    validate(config)
    mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
    graphdef, abstract = abstract_model(config.model, config.seed)
    optimizer = make_optimizer(config.train)
    rules = shd.rules_from_config(config)
    p_shard = shd.param_shardings(abstract, mesh, rules)
    abstract_params = abstract.to_pure_dict()
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    repl = shd.replicated(mesh)
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: repl)
    state_shardings = TrainState(step=repl, params=p_shard, opt_state=opt_shard, rng=repl)
    return cls(config, mesh, graphdef, abstract_params, optimizer, state_shardings,
               shd.batch_sharding(mesh, rules), rules)

  # -- pure functions --------------------------------------------------------------------------
  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def loss_fn(self, params, batch, step):
    with shd.activation_sharding(self.mesh, self.rules):  # active while jit traces this
      return self.model(params).compute_loss(batch, step)

  def _init(self, seed) -> TrainState:
    _, state = nnx.split(build_model(self.config.model, self.config.seed))
    params = state.to_pure_dict()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  def _train_step(self, state: TrainState, batch):
    accum = self.config.train.grad_accum
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, state.step)
    else:
      # Strided split: microbatch j = rows j, j+accum, j+2*accum, ... Each device holds whole
      # groups of `accum` consecutive rows, so every microbatch stays sharded over the batch
      # axes. (A contiguous split would put microbatch j on 1/accum of the devices: an
      # all-gather of the batch per step and accum-fold redundant compute on every device.)
      with shd.activation_sharding(self.mesh, self.rules):
        micro = jax.tree.map(
            lambda x: shd.constrain(x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1),
                                    (None, "batch")), batch)

      def body(carry, mb):
        with shd.activation_sharding(self.mesh, self.rules):
          mb = jax.tree.map(lambda x: shd.constrain(x, ("batch",)), mb)
        (loss, metrics), grads = grad_fn(state.params, mb, state.step)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), state.step)))
      (loss, metrics), grads = zeros
      (loss, metrics, grads), _ = jax.lax.scan(body, (loss, metrics, grads), micro)
      loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   lr=lr_schedule(self.config.train)(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def _eval_step(self, params, batch, step):
    loss, metrics = self.loss_fn(params, batch, step)
    return dict(metrics, loss=loss)

  # -- compiled entry points ----------------------------------------------------------------------
  def init_state(self, seed: int | None = None) -> TrainState:
    seed = self.config.seed if seed is None else seed
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings)(seed)

  @property
  def train_step(self):
    if not hasattr(self, "_train_step_jit"):
      self._train_step_jit = jax.jit(
          self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
          out_shardings=(self.state_shardings, None), donate_argnums=0)
    return self._train_step_jit

  @property
  def eval_step(self):
    if not hasattr(self, "_eval_step_jit"):
      self._eval_step_jit = jax.jit(
          self._eval_step,
          in_shardings=(self.state_shardings.params, self.batch_sharding, None))
    return self._eval_step_jit

  def device_batch(self, local_batch: dict) -> dict:
    """Host batch (this process's rows) -> global jax.Arrays sharded over data x fsdp."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def local_batch_size(self) -> int:
    bs = self.config.data.batch_size
    if bs % jax.process_count():
      raise ValueError(f"data.batch_size={bs} must be divisible by the process count "
                       f"{jax.process_count()}")
    return bs // jax.process_count()

  def dataset(self, split: str, shuffle: bool | None = None):
    dc = self.config.data
    return pipeline.windows_dataset(
        dc, split, seed=self.config.seed, shuffle=dc.shuffle if shuffle is None else shuffle,
        batch_size=self.local_batch_size(), process_index=jax.process_index(),
        process_count=jax.process_count())

  def evaluate(self, params, step: int, num_batches: int) -> dict[str, float]:
    """Mean validation metrics (+ perplexity) over the first `num_batches` (unshuffled)
    validation windows at the training context (ttt_jax.eval.perplexity.validation_metrics)."""
    from ttt_jax.eval.perplexity import validation_metrics  # noqa: PLC0415

    ds = self.dataset("validation", shuffle=False)
    batches = (self.device_batch(ds[i]) for i in range(num_batches))
    return validation_metrics(lambda b: self.eval_step(params, b, jnp.int32(step)), batches)


def abstract_model(model_cfg: ml_collections.ConfigDict, seed: int = 0):
  """(graphdef, abstract nnx.State of parameters) without allocating any weights."""
  model = nnx.eval_shape(lambda: build_model(model_cfg, seed))
  graphdef, state = nnx.split(model)
  return graphdef, state


def count_params(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.data.batch_size * config.data.seq_len


class Throughput:
  """Tokens/s between calls, excluding the first (compiling) interval."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self._t = None
    self._step = None

  def update(self, step: int) -> float | None:
    now = time.perf_counter()
    rate = None
    if self._t is not None and step > self._step:
      rate = (step - self._step) * self.tokens_per_step / (now - self._t)
    self._t, self._step = now, step
    return rate


@exclusive_workdir  # config + data checked before the workdir is touched; one run per workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None,
                       *, echo=print) -> dict[str, Any]:
  """Trains to `config.train.steps` updates, resuming from `workdir`'s latest checkpoint.

  Saves a checkpoint every `checkpoint.every_steps`, at the end, and on SIGTERM (then returns
  with `preempted=True`). Returns the final state, train history, validation metrics.
  """
  from tqdm.auto import tqdm  # noqa: PLC0415

  from ttt_jax.train import checkpoint as ckpt  # noqa: PLC0415
  from ttt_jax.train.metrics import MetricWriter  # noqa: PLC0415

  def log(s: str) -> None:
    if jax.process_index() == 0:
      tqdm.write(s) if echo is print else echo(s)

  trainer = Trainer.create(config)
  tr, every = config.train, config.checkpoint.every_steps
  n_params = count_params(trainer.abstract_params)
  log(f"model {config.model.kind} (mixer {config.model.mixer}): {n_params / 1e6:.2f}M params, "
      f"mesh {dict(trainer.mesh.shape)}, seq_len {config.data.seq_len}, "
      f"batch {config.data.batch_size}")
  run = ckpt.start_run(config, workdir, trainer, echo=log)
  state, start, checkpoints = run.state, run.step, run.checkpoints
  writer = MetricWriter(workdir, echo=log)
  it = pipeline.make_iterator(trainer.dataset("train"), config.data.prefetch)
  if run.data_state:
    it.set_state(run.data_state)
  history: list[dict[str, float]] = []
  speed = Throughput(tokens_per_step(config))
  speed.update(start)
  last_val: dict[str, float] = {}
  preempted = False
  bar = tqdm(total=tr.steps, initial=start, desc="train", unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  try:
    with ckpt.PreemptionWatch() as watch:
      for step in range(start, tr.steps):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(it)))
        done = step + 1
        if done % tr.log_every == 0 or done == tr.steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          rate = speed.update(done)
          if rate is not None:
            metrics["tokens_per_s"] = rate
          history.append({"step": done, **metrics})
          writer.write(done, metrics, "train")
          bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if checkpoints is not None and ((every and done % every == 0) or done == tr.steps):
          checkpoints.save(done, state, it.get_state(), config)
        if watch.reached(done):
          if checkpoints is not None:
            checkpoints.save(done, state, it.get_state(), config, wait=True)
          log(f"preempted (SIGTERM): saved checkpoint at step {done}; exiting")
          preempted = True
          break
        if done % tr.eval_every == 0 or done == tr.steps:
          last_val = trainer.evaluate(state.params, done, tr.eval_batches)
          writer.write(done, last_val, "validation")
          speed.update(done)  # do not count eval time as training time
        bar.update(1)
    if start >= tr.steps and not preempted:
      log(f"run already complete at step {start} (train.steps={tr.steps})")
      last_val = trainer.evaluate(state.params, start, tr.eval_batches)
  finally:
    bar.close()
    writer.close()
    if checkpoints is not None:
      checkpoints.close()  # waits for an async save in flight
  return {"state": state, "history": history, "val": last_val, "trainer": trainer,
          "start_step": start, "preempted": preempted}
