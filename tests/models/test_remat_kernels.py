"""`model.remat=kernels`: full recomputation of each block in the backward pass, except the
outputs of the sequential TTT forward kernels (TTT-Linear's, TTT-MLP's), which are kept, and,
in the dual and primal forms, the inner weights entering each remat-through-time group and the
group's outputs. The same loss and gradients as `full` and `none`; in the train step a GPU
compiles, the forward kernel runs once per layer instead of twice (and the backward kernel once
either way); the dual form's inner loop does the work it does without block remat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.benchmarks import hlo_text, lowering
from ttt_jax.config import build_config, validate
from ttt_jax.layers import ttt_pallas
from ttt_jax.models import build_model

pytestmark = pytest.mark.extended  # `model.remat=kernels` is opt-in


def forward_and_backward_kernels(exported, kernel: str) -> tuple[int, int]:
  text = exported.mlir_module()
  return tuple(text.count(f'name = "_{kernel}_{way}_kernel"') for way in ("fwd", "bwd"))


@pytest.mark.parametrize("inner,kernel,where", [
    ("linear", "linear", "kernel"), ("linear", "chain", "xla"), ("mlp", "mlp", "kernel")])
def test_the_forward_kernel_is_not_run_again_in_the_backward_pass(inner, kernel, where):
  """(Under `full`, the lowering SIZE's remat, it runs twice: tests/test_gpu_lowering.py.)
  TTT-Linear with its output made by XLA (`Tuning.linear_output`) too."""
  layers = lowering.SIZE.num_layers
  with ttt_pallas.tuning(linear_output=where):
    exported = lowering.lower_train_step(f"ttt_{inner}",
                                         {"remat": "kernels", "ttt.impl": "pallas"})
  assert forward_and_backward_kernels(exported, kernel) == (layers, layers)


def loss_and_grads(remat: str, impl: str = "pallas", mixer: str = "ttt_linear"):
  c = build_config(f"model={mixer},ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 2, 64, 4, 128  # head dim 16
  m.ttt.impl, m.remat, m.init_std = impl, remat, 0.1
  validate(c)
  graphdef, params = nnx.split(build_model(m, seed=1))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 65)), jnp.int32)

  def loss(p):
    return nnx.merge(graphdef, p).compute_loss({"tokens": tokens})[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("remat,mixer,impl", [
    ("full", "ttt_linear", "pallas"), ("none", "ttt_linear", "pallas"),
    ("full", "ttt_mlp", "pallas"), ("full", "ttt_mlp", "dual"), ("none", "ttt_linear", "dual")])
def test_same_loss_and_gradients_as_the_other_policies(remat, mixer, impl):
  want_loss, want = loss_and_grads(remat, impl, mixer)
  got_loss, got = loss_and_grads("kernels", impl, mixer)
  assert abs(float(got_loss) - float(want_loss)) <= 1e-6 * abs(float(want_loss))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    scale = float(jnp.max(jnp.abs(w)))
    assert float(jnp.max(jnp.abs(g - w))) <= 1e-5 * scale + 1e-12
  # and the kernel path under it is the dual form's computation
  dual_loss, _ = loss_and_grads("kernels", impl="dual", mixer=mixer)
  assert abs(float(got_loss) - float(dual_loss)) <= 1e-5 * abs(float(dual_loss))


def test_the_dual_forms_inner_loop_is_not_run_again():
  """TTT-MLP's dual form (its GPU default; every TTT layer's on a TPU), one layer, remat through
  time: under `kernels` the block's recomputation keeps the weights entering each group and the
  group outputs, so the inner loop (the `ttt_inner` scope) does the matmul work it does without
  block remat (`none`); `full` runs its forward once more. XLA:CPU's compiled train step, loop
  trips counted). 240 tokens: 15 mini-batches of 16, groups of 4 and a tail group of 3."""
  size = dataclasses.replace(lowering.SIZE, num_layers=1, seq_len=240)
  inner = {}
  for remat in ("kernels", "none", "full"):
    fn, args = lowering.train_step_program("ttt_mlp", {"remat": remat, "ttt.impl": "dual"}, size)
    text = jax.jit(fn).lower(*args).compile().as_text()
    inner[remat] = hlo_text.census(text)["flops_by_scope"]["ttt_inner"]
  assert inner["kernels"] <= 1.01 * inner["none"], inner
  assert inner["full"] >= 1.2 * inner["kernels"], inner
