"""Remat through time (model.ttt.remat_group): the same numbers as a plain scan, and the backward
pass keeps only the inner weights at group boundaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals

from ttt_jax.layers.common import KERNEL_OUTPUTS

from .test_ttt import make_mixer, random_inputs, rel_err, run_inner, tree_rel_err


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_remat_through_time_identical(kind):
  """remat_group 0 (plain scan) vs 4 over 6 mini-batches (a group of 4 + a tail of 2)."""
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 1, 2, 12, 8, 2, seed=13)
  res = []
  for k in (0, 4):
    def objective(*args, k=k):
      _, z = run_inner(kind, "dual", *args, b=2, remat_group=k)
      return jnp.sum(z * z), z

    grad_fn = jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True)
    res.append(jax.jit(grad_fn)(params, ln, xq, xk, xv, gate, tau))
  (_, z0), g0 = res[0]
  (_, z1), g1 = res[1]
  assert rel_err(z1, z0) <= 1e-6
  assert tree_rel_err(g1, g0) <= 1e-5


@pytest.mark.parametrize("mixer,impl", [("ttt_linear", "dual"), ("ttt_linear", "primal"),
                                        ("ttt_mlp", "dual"), ("ttt_mlp", "primal")])
def test_remat_through_time_saves_only_group_boundaries(mixer, impl):
  """What the backward pass keeps from the loop over mini-batches (JAX's saved residuals of the
  mixer's VJP that the scan produces; what jax.ad_checkpoint.print_saved_residuals
  lists): with model.ttt.remat_group k > 0 only the inner weights
  entering each group of k mini-batches, ceil(n / k) copies of W and nothing per mini-batch
  (k = 5 leaves a tail group of 2); with k = 0 a plain scan keeps W and the activations of every
  one of the n mini-batches. Fails if the knob does not reach the layer, the group is not
  checkpointed or its policy saves more."""
  b, n = 2, 12
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, n * b, 32)), jnp.float32)
  positions = jnp.arange(n * b, dtype=jnp.int32)
  for k in (0, 4, 5):
    m = make_mixer(mixer=mixer, impl=impl, b=b, remat_group=k)
    graphdef, params = nnx.split(m)
    w_size = sum(a.size for a in jax.tree.leaves(m.initial_params(x.shape[0])))
    residuals = saved_residuals(
        lambda p, g=graphdef: jnp.sum(jnp.sin(nnx.merge(g, p)(x, positions, None)[0])), params)
    # the groups' scan, and the tail group's weights (named for `model.remat=kernels`)
    from_loop = sum(a.size for a, origin in residuals
                    if origin.startswith(("output of scan", f"named '{KERNEL_OUTPUTS}'")))
    if k:
      assert from_loop == -(-n // k) * w_size, (k, from_loop / w_size)
    else:
      assert from_loop > n * w_size, from_loop / w_size
