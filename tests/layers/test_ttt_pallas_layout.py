"""Where the TTT kernels' output LayerNorm runs (`ttt_pallas.sequence_output(kernel_layout=)`):
XLA:GPU searches tilings over every axis of a normalization's shape while fusing it, so the
layout changes how long a step takes to build for a GPU (docs/gpu_census.md), not its values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from ttt_jax.layers import ttt_pallas

from .test_ttt import rel_err, tree_rel_err
from .test_ttt_pallas import inputs, sequence_fn


def _row_reduction_ranks(fn, *args) -> list[int]:
  """The operand rank of every sum over the last axis (a normalization's statistics) among the
  program's own equations (kernel bodies and custom rules' inner programs not included)."""
  return [e.invars[0].aval.ndim for e in jax.make_jaxpr(fn)(*args).eqns
          if e.primitive.name == "reduce_sum" and e.invars[0].aval.ndim - 1 in e.params["axes"]]


@pytest.mark.parametrize("kind,rank", [("linear", 5), ("mlp", 4)])
def test_kernel_output_normalized_in_the_layout_each_kernel_builds_fastest(kind, rank):
  """TTT-MLP's z is normalized as its kernel wrote it, [B, H, T, d]; TTT-Linear's in
  mini-batches [n, B, H, b, d] (`sequence_output(kernel_layout=...)`: XLA:GPU's tiling search
  while fusing a normalization, docs/gpu_census.md)."""
  args = inputs(kind, n=2)
  assert _row_reduction_ranks(sequence_fn(kind, "pallas"), *args) == [rank, rank]


def test_kernel_output_layouts_give_the_same_values_and_grads():
  _, ln, xq, *_ = inputs("mlp", n=2)
  z = jax.random.normal(jax.random.key(5), ttt_pallas.to_sequence(xq).shape)
  probe = jax.random.normal(jax.random.key(6), xq.shape)
  out = functools.partial(ttt_pallas.sequence_output, z, ln, xq)
  grad = jax.grad(lambda z, ln, xq, layout: jnp.vdot(
      ttt_pallas.sequence_output(z, ln, xq, layout), probe), argnums=(0, 1, 2))
  for layout, rank in ((False, 5), (True, 4)):  # the backward keeps each layout
    assert set(_row_reduction_ranks(functools.partial(grad, layout=layout), z, ln, xq)) == {rank}
  assert rel_err(out(True), out(False)) < 1e-6
  assert tree_rel_err(grad(z, ln, xq, True), grad(z, ln, xq, False)) < 1e-6
