"""optax optimizer and learning-rate schedule from the `train` config section."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ttt_jax.layers import mixers


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


# Weight decay is decided by a parameter's role, read from the last key of its path (the
# attribute name the layer gives it; the same name means the same role across the project).
# Decayed, the weight matrices:
DECAYED_NAMES = frozenset({
    "kernel",  # every nnx.Linear projection and the depthwise causal conv kernels (a linear
               # map over time, per channel)
    "w1", "w2", "w3",  # SwiGLU matrices (prime MLPs included)
    "head",  # the untied output projection
})
# and the weight matrices the model's sequence mixer names (`MixerSpec.decayed` of `model.mixer`:
# attention and TTT projections `kernel`; TTT-Linear's initial inner W `w`, TTT-MLP's W1, W2 `w1`,
# `w2`). Only the model's own mixer counts: a name another registered mixer decays keeps its
# role in this model. Everything else is not decayed: the token embedding `embedding` (also the
# output head when tied), norm scales and biases (`scale`; TTT `ln_scale/ln_bias/post_scale/
# post_bias`), biases (`bias`, TTT `b/b1/b2`) and the learnable inner-LR parameters (`lr_w`,
# `lr_b`, `tau`). A new weight matrix must add its name here or in its mixer's registration
# (tests/train/test_optim.py classifies every leaf).


def decayed_names(mixer: str) -> frozenset[str]:
  """DECAYED_NAMES and the weight-matrix names of the sequence mixer `mixer` (`model.mixer`)."""
  return DECAYED_NAMES | mixers.mixer_spec(mixer).decayed


def _leaf_name(path) -> str:
  key = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def decay_mask(params, mixer: str):
  """True for the leaves weight decay applies to: the weight matrices of a model whose sequence
  mixer is `mixer` (`decayed_names(mixer)`).

  Decided by role (path name), never by shape: norm scales, biases and the inner-LR parameters
  stay undecayed however they are shaped ([H, 1, d] per-head TTT norms and biases; [L, D] norm
  scales stacked by `model.scan_layers`). The token embedding is not decayed: it is a lookup
  table whose row for a token gets a gradient only when that token occurs, so decay would
  shrink the rows of rare tokens towards zero between occurrences; with tied embeddings the
  table is also the output head and stays undecayed. An untied output head is decayed.
  """
  names = decayed_names(mixer)
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in names, params)


def global_norm(tree, rows: bool = True) -> jax.Array:
  """sqrt of the sum of the squares of every element of `tree`, in fp32 (optax.tree.norm).

  `rows`: each leaf is summed to one value per index of its first axis, and the values of all
  leaves are summed at once behind an optimization barrier, which keeps XLA from splitting the
  total back into a scalar reduction per leaf. On a GPU that is one reduction launch per leaf
  and one for all, where a scalar sum per leaf takes two launches for most leaves (a partial
  and a final reduction; counts in docs/gpu_census.md). The rows of a leaf split over devices
  would each be gathered before the total, so for those `rows=False` adds up a scalar sum per
  leaf, as optax does, and XLA combines the leaves' all-reduces into a few.
  """
  leaves = [jnp.square(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  if not rows:
    return jnp.sqrt(sum(jnp.sum(x) for x in leaves))
  parts = [jnp.sum(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x.reshape(-1)
           for x in leaves]
  return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts))))


def clip_by_global_norm(max_norm: float, rows: bool = True) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (updates scaled by max_norm / norm when their norm exceeds
  max_norm; the same empty state) with the norm of `global_norm(updates, rows)`."""

  def update(updates, state, params=None):
    del params
    norm = global_norm(updates, rows)
    within = norm < max_norm
    return jax.tree.map(
        lambda t: jax.lax.select(within, t, (t / norm.astype(t.dtype)) * max_norm),
        updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(tr: ml_collections.ConfigDict, mixer: str, rows: bool = True,
                   mask=None) -> optax.GradientTransformation:
  """AdamW (after global-norm clipping) from the `train` section, for a model whose sequence
  mixer is `mixer` (`model.mixer`: weight decay reaches its weight matrices); `rows`: how the
  clipping's `global_norm` sums (False where parameters are split over devices); `mask`: weight
  decay's leaves (`LeafGroups.mask`) instead of `decay_mask`'s."""
  chain = []
  if tr.grad_clip > 0:
    chain.append(clip_by_global_norm(tr.grad_clip, rows))
  mask = functools.partial(decay_mask, mixer=mixer) if mask is None else mask
  chain.append(optax.adamw(lr_schedule(tr), b1=tr.b1, b2=tr.b2, weight_decay=tr.weight_decay,
                           mask=mask))
  return optax.chain(*chain)


class LeafGroups:
  """A parameter tree's leaves of at most `max_size` elements gathered into one flat vector per
  (dtype, weight decay), so that the optimizer's elementwise work on them runs in a few kernels
  instead of a few per leaf (`train.group_leaves`). `group` turns a tree shaped like the
  parameters into a list, [each larger leaf, ..., each group's flat vector, ...]; `ungroup`
  turns it back: a leaf cut from the vector costs XLA no kernel where it is large, one where it
  is small (counts in docs/gpu_census.md)."""

  def __init__(self, params, decayed, max_size: int):
    leaves, self.treedef = jax.tree.flatten(params)
    self.shapes = [x.shape for x in leaves]
    flags = self.treedef.flatten_up_to(decayed)
    groups: dict = {}
    self.large = []
    for i, (x, flag) in enumerate(zip(leaves, flags, strict=True)):
      if x.size <= max_size:
        groups.setdefault((jnp.dtype(x.dtype).name, bool(flag)), []).append(i)
      else:
        self.large.append(i)
    self.groups = list(groups.values())
    # weight decay of each entry of the grouped list
    self.mask = [bool(flags[i]) for i in self.large] + [bool(flags[g[0]]) for g in self.groups]

  def group(self, tree) -> list:
    leaves = self.treedef.flatten_up_to(tree)
    return [leaves[i] for i in self.large] + [
        jnp.concatenate([leaves[i].reshape(-1) for i in idx]) for idx in self.groups]

  def ungroup(self, grouped: list):
    leaves = [None] * len(self.shapes)
    for i, x in zip(self.large, grouped[:len(self.large)], strict=True):
      leaves[i] = x
    for idx, flat in zip(self.groups, grouped[len(self.large):], strict=True):
      start = 0
      for i in idx:
        size = math.prod(self.shapes[i])
        leaves[i] = flat[start:start + size].reshape(self.shapes[i])
        start += size
    return jax.tree.unflatten(self.treedef, leaves)

  def group_state(self, opt_state):
    """`group` applied to every part of an optimizer state shaped like the parameters."""
    return self._map(opt_state, self.treedef, self.group)

  def ungroup_state(self, opt_state):
    """`ungroup` applied to every part of an optimizer state shaped like the grouped list."""
    grouped = jax.tree.structure([0] * (len(self.large) + len(self.groups)))
    return self._map(opt_state, grouped, self.ungroup)

  @staticmethod
  def _map(opt_state, treedef, fn):
    shaped = lambda x: jax.tree.structure(x) == treedef  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if shaped(x) else x, opt_state, is_leaf=shaped)
