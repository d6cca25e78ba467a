"""Train state and the jitted (pjit-style) train/eval steps; the loop is train/loop.py.

Functional core: the model is built once, split into `graphdef` + parameters (a pure dict of
arrays); every step is a pure function that merges them back (`nnx.merge`) inside `jax.jit`,
with explicit in/out shardings over the ('data', 'fsdp', 'tensor') mesh.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from tqdm.auto import tqdm

from ttt_jax.batch_blocks import batch_block
from ttt_jax.config import LOGICAL_RULES, ConfigError, Rules, validate
from ttt_jax.data.dataset import Dataset
from ttt_jax.models import abstract_model, build_model, gpu_rng_kernels
from ttt_jax.sharding import (
  activation_sharding,
  batch_sharding,
  constrain,
  make_mesh,
  param_shardings,
  replicated,
  rules_from_config,
  whole_on_each_device,
)
from ttt_jax.train.metrics import validation_metrics
from ttt_jax.train.optim import (
  LeafGroups,
  decay_mask,
  global_norm,
  lr_schedule,
  make_optimizer,
)


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32 scalar: number of completed optimizer updates
  params: Any  # pure dict of arrays
  opt_state: Any


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
  rules: Rules = LOGICAL_RULES  # logical axis -> mesh axes (mesh.rules)
  data: Dataset | None = None  # config.data resolved once (source, tokenizer, splits)

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
             data: Dataset | None = None):
    """`data`: the run's resolved `config.data` (built here when not given). The caller's
    `config` is left as given; `trainer.config` is the resolved copy (model.vocab_size follows
    the data tokenizer)."""
    data = Dataset.from_config(config.data) if data is None else data
    config = copy.deepcopy(config)
    data.sync_vocab(config)
    validate(config)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    graphdef, abstract = abstract_model(config.model, config.seed)
    rules = rules_from_config(config)
    p_shard = param_shardings(abstract, mesh, rules)
    optimizer = make_optimizer(config.train, config.model.mixer, whole_on_each_device(p_shard))
    abstract_params = nnx.to_pure_dict(abstract)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    repl = replicated(mesh)
    opt_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: repl)
    state_shardings = TrainState(step=repl, params=p_shard, opt_state=opt_shard)
    b_shard = batch_sharding(mesh, rules)
    check_batch_split(config.data.batch_size, b_shard, config.train.grad_accum)
    return cls(config, mesh, graphdef, abstract_params, optimizer, state_shardings, b_shard,
               rules, data)

  @property
  def norm_rows(self) -> bool:
    """How the step's global norms sum (`optim.global_norm`): per-leaf rows unless a parameter
    is split over devices (as the optimizer's clipping, built by `create`)."""
    return whole_on_each_device(self.state_shardings.params)

  @functools.cached_property
  def leaf_groups(self) -> tuple[LeafGroups, optax.GradientTransformation] | None:
    """`train.group_leaves`: the parameters' leaves of at most that many elements gathered
    (`LeafGroups`) and the optimizer over the grouped list, or None (off, or a parameter split
    over devices)."""
    size = self.config.train.group_leaves
    if size <= 0 or not self.norm_rows:
      return None
    mixer = self.config.model.mixer
    groups = LeafGroups(self.abstract_params, decay_mask(self.abstract_params, mixer), size)
    return groups, make_optimizer(self.config.train, mixer, True, mask=groups.mask)

  # -- pure functions --------------------------------------------------------------------------
  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def loss_fn(self, params, batch, step):
    with activation_sharding(self.mesh, self.rules):  # active while jit traces this
      return self.model(params).compute_loss(batch, step)

  def _init(self, seed) -> TrainState:
    _, state = nnx.split(build_model(self.config.model, seed))
    params = nnx.to_pure_dict(state)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  def _over_microbatches(self, fn, batch):
    """`fn(microbatch) -> (weighted, metrics)` over the train.grad_accum microbatches of `batch`
    (one call where it is 1): `weighted` (a tree: the loss, its gradient) weighted by each
    microbatch's scored tokens over their total, `metrics` plain means. Strided split:
    microbatch j = rows j, j+accum, j+2*accum, ... Each device holds whole groups of `accum`
    consecutive rows, so every microbatch stays sharded over the batch axes. (A contiguous split
    would put microbatch j on 1/accum of the devices: an all-gather of the batch per step and
    accum-fold redundant compute on every device.)"""
    accum = self.config.train.grad_accum
    if accum == 1:
      return fn(batch)
    with activation_sharding(self.mesh, self.rules):
      micro = jax.tree.map(
          lambda x: constrain(x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1),
                              (None, "batch")), batch)

    def body(carry, mb):
      with activation_sharding(self.mesh, self.rules):
        mb = jax.tree.map(lambda x: constrain(x, ("batch",)), mb)
      weighted, metrics = fn(mb)
      w = microbatch_weight(mb)
      t_weighted, t_metrics, t_w = carry
      return (jax.tree.map(lambda c, x: c + w * x, t_weighted, weighted),
              jax.tree.map(jnp.add, t_metrics, metrics), t_w + w), None

    weighted, metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: fn(jax.tree.map(lambda x: x[0], micro))))
    (weighted, metrics, weight), _ = jax.lax.scan(
        body, (weighted, metrics, jnp.zeros((), jnp.float32)), micro)
    return (jax.tree.map(lambda x: x / jnp.maximum(weight, 1.0), weighted),
            jax.tree.map(lambda x: x / accum, metrics))

  def _train_step(self, state: TrainState, batch):
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)

    def loss_and_grads(mb):
      (loss, metrics), grads = grad_fn(state.params, mb, state.step)
      return (loss, grads), metrics

    (loss, grads), metrics = self._over_microbatches(loss_and_grads, batch)
    with jax.named_scope("optimizer"):  # the update, its checks and the new state
      optimizer, old_params, old_opt = self.optimizer, state.params, state.opt_state
      if self.leaf_groups is not None:  # the same update on the grouped leaves
        groups, optimizer = self.leaf_groups
        grads, old_params = groups.group(grads), groups.group(old_params)
        old_opt = groups.group_state(old_opt)
      updates, opt_state = optimizer.update(grads, old_opt, old_params)
      params = optax.apply_updates(old_params, updates)
      grad_norm = global_norm(grads, self.norm_rows)
      # A non-finite loss, gradient or update never reaches the state: the update is dropped (the
      # batch still counts as a step) and `finite`=0 tells the loop, which stops or skips it
      # (train.skip_nonfinite). The state is donated, so this is the only place to keep it clean.
      finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                & jnp.isfinite(global_norm(updates, self.norm_rows)))
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
      metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                     lr=lr_schedule(self.config.train)(state.step),
                     finite=finite.astype(jnp.float32))
      step = state.step + 1
      params, opt_state = keep(params, old_params), keep(opt_state, old_opt)
      if self.leaf_groups is not None:
        params, opt_state = groups.ungroup(params), groups.ungroup_state(opt_state)
      new_state = state.replace(step=step, params=params,
                                opt_state=one_clock(opt_state, step))
    return new_state, metrics

  def _eval_step(self, params, batch):
    """The model as evaluate.py runs it: no outer step, so inner LRs at their full value (no
    warm-up multiplier; the train step's own metrics carry the warmed-up ones). In the train
    step's microbatches (train.grad_accum), so that validation fits where training does."""
    loss, metrics = self._over_microbatches(lambda mb: self.loss_fn(params, mb, None), batch)
    return dict(metrics, loss=loss)

  # -- compiled entry points ----------------------------------------------------------------------
  @property
  def init_rng_kernel(self) -> bool:
    """`train.init_rng_kernel` resolved: auto = on for a one-device mesh, or where the blocks are
    a list (`model.scan_layers=False`). Over several devices XLA cannot split the kernel's call,
    so each device draws every parameter whole and keeps its slice, however many devices share
    it. With the blocks a list the leaves are one layer's: 0.27-0.43 GB of such temporaries per
    GPU at 1b-3b over 8 H200s (byte vocabulary), while the inlined hash took the 1b transformer's
    initialisation 727 s to compile. Stacked blocks' leaves are whole stacks: 4.0-13.6 GB per
    GPU at 1b-3b (E2E, TTT-Linear), more than TTT-Linear's train step needs at one sequence per
    GPU, and their few inlined draws compile in 11-88 s (docs/gpu_census.md)."""
    setting = self.config.train.init_rng_kernel
    return setting == "on" or (setting == "auto" and (
        self.mesh.devices.size == 1 or not self.config.model.scan_layers))

  def init_state(self, seed: int | None = None) -> TrainState:
    """Step 0: parameters initialised from `seed` (default `config.seed`), fresh optimizer."""
    seed = self.config.seed if seed is None else seed
    return self.lower_init(seed).compile()()

  def lower_init(self, seed: int, platforms: tuple[str, ...] | None = None) -> jax.stages.Lowered:
    """The program `init_state(seed)` runs, lowered for `platforms` (default: this backend); its
    random draws through `gpu_rng_kernels` where `train.init_rng_kernel` says (a GPU compiles
    it in a fraction of the time)."""
    with jax.set_mesh(self.mesh), gpu_rng_kernels(self.init_rng_kernel):
      traced = jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings).trace(seed)
      return traced.lower(lowering_platforms=platforms)

  @property
  def pure_train_step(self):
    """The train step as a plain function (state, batch) -> (state, metrics), not jitted and
    bound to no mesh: for compiling it for other devices (benchmarks/lowering.py)."""
    return self._train_step

  @property
  def pure_eval_step(self):
    """The evaluation step as a plain function (params, batch) -> metrics (as
    `pure_train_step`)."""
    return self._eval_step

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
          in_shardings=(self.state_shardings.params, self.batch_sharding))
    return self._eval_step_jit

  def device_batch(self, local_batch: dict) -> dict:
    """Host batch (this process's rows, `data_shard`) -> global jax.Arrays split as the batch
    axes of the mesh say."""
    count = self.data_shard()[1]
    return {k: jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(v), (len(v) * count, *np.shape(v)[1:]))
            for k, v in local_batch.items()}

  def data_shard(self) -> tuple[int, int]:
    """(index, count): this process feeds block `index` of the batch's `count` blocks of rows,
    the rows its devices hold. Processes whose devices hold the same rows (the mesh axes that
    split the batch do not run across them) read the same windows."""
    return self._data_block

  @functools.cached_property
  def _data_block(self) -> tuple[int, int]:  # once per trainer, not per batch (`device_batch`)
    return batch_block(self.batch_sharding, self.config.data.batch_size)

  def local_batch_size(self) -> int:
    return self.config.data.batch_size // self.data_shard()[1]

  def dataset(self, split: str, shuffle: bool | None = None):
    dc = self.config.data
    index, count = self.data_shard()
    return self.data.windows(
        split, dc.seq_len, seed=self.config.seed,
        shuffle=dc.shuffle if shuffle is None else shuffle, batch_size=self.local_batch_size(),
        process_index=index, process_count=count)

  def evaluate(self, params, step: int, num_batches: int) -> dict[str, float]:
    """Mean validation metrics (+ perplexity) over the first `num_batches` (unshuffled)
    validation windows at the training context, with its own progress bar."""
    ds = self.dataset("validation", shuffle=False)
    batches = (self.device_batch(ds[i]) for i in tqdm(
        range(num_batches), desc=f"eval @ step {step}", unit="batch", leave=False,
        disable=jax.process_index() != 0 or num_batches < 2, dynamic_ncols=True))
    return validation_metrics(lambda b: self.eval_step(params, b), batches)


def check_batch_split(batch_size: int, sharding: jax.sharding.NamedSharding,
                      grad_accum: int = 1) -> None:
  """A ConfigError naming the key unless the devices the batch is split over (the mesh axes
  mesh.rules give `batch`) divide data.batch_size and train.grad_accum divides each device's
  rows (else the devices cannot split a microbatch evenly: some of it is computed on several)."""
  axes = sharding.spec[0] if sharding.spec else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  shape = sharding.mesh.shape
  ways = math.prod(shape[a] for a in axes)
  split = " x ".join(f"mesh.{a}={shape[a]}" for a in axes if shape[a] > 1)
  if batch_size % ways:
    raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the {ways} devices the "
                      f"batch is split over ({split}, by mesh.rules)")
  rows = batch_size // ways
  if ways > 1 and rows % grad_accum:
    raise ConfigError(f"train.grad_accum={grad_accum} must divide the {rows} sequences each "
                      f"device holds (data.batch_size={batch_size} over {ways} devices, {split}): "
                      "else a microbatch does not split evenly and is computed on several "
                      "devices at once")


def one_clock(opt_state, step: jax.Array):
  """The optimizer's step counts (the LR schedule's and Adam's bias correction) set to the train
  step: a skipped non-finite step keeps the moments but still counts, so the schedule applied,
  the logged lr and the inner-LR warm-ups (which follow `state.step`) read one clock."""
  return optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))


def microbatch_weight(batch: dict) -> jax.Array:
  """What a microbatch's mean loss is weighted by when accumulated: its loss-mask total (the
  losses are token-weighted means under `loss_mask`, models/lm.py:token_nll), else 1. Summing
  weight x mean and dividing by the summed weights once gives the full batch's mean exactly
  for 0/1 masks, also when the microbatches hold different numbers of scored tokens (a
  fractional mask whose microbatch total is below 1 is weighted slightly off: token_nll divides
  by max(total, 1))."""
  mask = batch.get("loss_mask")
  return jnp.float32(1.0) if mask is None else jnp.sum(mask.astype(jnp.float32))


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.data.batch_size * config.data.seq_len
