"""optax optimizer and learning-rate schedule from the `train` config section."""

from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(tr: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `train.lr`, then cosine/linear decay to `lr * min_lr_ratio` (or constant)."""
  warmup = max(int(tr.warmup_steps), 0)
  decay_steps = max(int(tr.steps) - warmup, 1)
  end = tr.lr * tr.min_lr_ratio
  if tr.schedule == "cosine":
    decay = optax.cosine_decay_schedule(tr.lr, decay_steps, alpha=tr.min_lr_ratio)
  elif tr.schedule == "linear":
    decay = optax.linear_schedule(tr.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(tr.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, tr.lr, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: no decay on norm scales, biases or other vectors."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(tr: ml_collections.ConfigDict) -> optax.GradientTransformation:
  chain = []
  if tr.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(tr.grad_clip))
  chain.append(optax.adamw(lr_schedule(tr), b1=tr.b1, b2=tr.b2, weight_decay=tr.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain)
