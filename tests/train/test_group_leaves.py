"""`train.group_leaves`: the optimizer updates the parameter leaves of at most that many elements
as flat groups (per dtype and weight decay), with the same numbers, the same state tree
(checkpoints unchanged), the same non-finite guard, fewer per-leaf operations in the step, and
only where every parameter is whole on each device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.data import pipeline
from ttt_jax.train import trainer as trainer_lib
from ttt_jax.train.optim import LeafGroups
from ttt_jax.train.trainer import Trainer

# `train.group_leaves` is opt-in
pytestmark = pytest.mark.extended

ALL = 1 << 30  # every leaf in a group


def tiny_config(group_leaves: int):
  """A one-block TTT-Linear: leaves from 8 elements (its inner LR gate bias) to 64 x 256."""
  c = build_config("model=ttt_linear,scale=tiny,ctx=32")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 1, 32, 2, 64
  m.ttt.mini_batch_size = 8
  c.data.batch_size = 2
  c.train.steps, c.train.warmup_steps, c.train.group_leaves = 10, 2, group_leaves
  return validate(c)


def random_tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  shapes = {"s": (), "v": (7,), "m": (5, 9), "h": (3, 1, 4), "big": (40, 30)}
  tree = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  tree["bf"] = jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16)
  return tree


def test_groups_round_trip_by_size_dtype_and_weight_decay():
  tree = random_tree(0)
  decayed = {"s": False, "v": True, "m": True, "h": False, "big": True, "bf": True}
  groups = LeafGroups(tree, decayed, max_size=100)
  grouped = groups.group(tree)
  # 'big' (1,200 elements) stays whole; then the groups in the order of their first leaf (keys
  # sorted): bf16 (bf), fp32 not decayed (h, s), fp32 decayed (m, v)
  assert [tuple(x.shape) for x in grouped] == [(40, 30), (24,), (12 + 1,), (45 + 7,)]
  assert [x.dtype for x in grouped] == [jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32]
  assert groups.mask == [True, True, False, True]
  back = groups.ungroup(grouped)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for key in tree:
    assert back[key].dtype == tree[key].dtype
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(tree[key]))
  # an optimizer state: every part shaped like the parameters grouped, nothing else; and back
  state = ({"count": jnp.ones(())}, (tree, jnp.zeros(3)), tree)
  mapped = groups.group_state(state)
  assert isinstance(mapped[1][0], list) and isinstance(mapped[2], list)
  assert mapped[0]["count"].shape == () and mapped[1][1].shape == (3,)
  again = groups.ungroup_state(mapped)
  assert jax.tree.structure(again) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("size", [ALL, 64])
def test_grouped_steps_equal_per_leaf_steps(train_steps, size):
  """Three AdamW steps (warm-up, clipping, weight decay on the matrices): the same parameters,
  moments and metrics as leaf by leaf, in the same state tree; only the global norms sum in
  another order."""
  hist0, state0 = train_steps(tiny_config(0), 3)
  hist, state = train_steps(tiny_config(size), 3)
  groups, _ = Trainer.create(tiny_config(size)).leaf_groups
  assert groups.groups and (bool(groups.large) == (size == 64))
  assert jax.tree.structure(state) == jax.tree.structure(state0)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30)
  for m, m0 in zip(hist, hist0, strict=True):
    assert m.keys() == m0.keys()
    assert all(abs(m[k] - m0[k]) <= 1e-5 * max(abs(m0[k]), 1e-30) for k in m)
  assert hist0[-1]["loss"] != hist0[0]["loss"]  # the steps did move the parameters


def test_grouping_takes_adams_per_leaf_work_out_of_the_step():
  """Adam's square root runs once per updated array: per leaf without groups, per group (and
  large leaf) with them; the global norms' own square roots are the same in both."""
  def sqrt_count(trainer):
    state = jax.eval_shape(lambda: trainer._init(trainer.config.seed))
    batch = {"tokens": jax.ShapeDtypeStruct((2, 33), jnp.int32)}
    return jax.jit(trainer.pure_train_step).lower(state, batch).as_text().count("stablehlo.sqrt")

  plain, grouped = Trainer.create(tiny_config(0)), Trainer.create(tiny_config(64))
  assert plain.leaf_groups is None
  groups, _ = grouped.leaf_groups
  n_leaves = len(jax.tree.leaves(plain.abstract_params))
  arrays = len(groups.large) + len(groups.groups)
  assert arrays < n_leaves
  assert sqrt_count(plain) - n_leaves == sqrt_count(grouped) - arrays


def test_a_non_finite_step_leaves_the_grouped_state_as_it_was(monkeypatch):
  trainer = Trainer.create(tiny_config(ALL))
  state = trainer.init_state()
  batch = trainer.device_batch(next(pipeline.make_iterator(trainer.dataset("train"), prefetch=0)))
  # NaN in the loss and so in every gradient (test_nonfinite.poison_steps makes the loss NaN
  # only, with zero gradients): the grouped vectors carry NaN, and none may reach the state
  real = Trainer.loss_fn
  monkeypatch.setattr(Trainer, "loss_fn", lambda self, *a: jax.tree.map(
      lambda x: x * jnp.nan, real(self, *a)))
  before = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
  new, metrics = trainer.train_step(state, batch)  # donates `state`
  assert float(metrics["finite"]) == 0.0 and int(new.step) == 1
  after = jax.tree.leaves((new.params, new.opt_state))
  for a, b in zip(after, before, strict=True):
    if a.dtype != jnp.int32:  # the step counts follow the train step (trainer.one_clock)
      np.testing.assert_array_equal(np.asarray(a), b)


def test_off_where_a_parameter_is_split_over_devices(monkeypatch):
  monkeypatch.setattr(trainer_lib, "whole_on_each_device", lambda shardings: False)
  assert Trainer.create(tiny_config(ALL)).leaf_groups is None


def test_a_negative_size_is_refused():
  with pytest.raises(ConfigError, match="train.group_leaves"):
    tiny_config(-1)
