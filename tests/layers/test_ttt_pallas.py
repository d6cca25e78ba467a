"""The fused Pallas TTT mini-batch kernel (interpret mode on CPU) against the XLA dual form:
outputs, final inner weights and gradients w.r.t. every input, through remat groups; and the
mixer with model.ttt.impl=pallas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import ttt_inner, ttt_pallas
from ttt_jax.layers.ttt import TTTMixer

from .test_ttt import mixer_cfg, random_inputs, randomize, rel_err, tree_rel_err

BASE_LR = {"linear": 1.0, "mlp": 0.1}


def run(kind, step, params, ln, xq, xk, xv, gate, tau, b, remat_group):
  bsz, h, length, d = xq.shape
  n = length // b
  to_mb = lambda a: jnp.moveaxis(a.reshape(bsz, h, n, b, *a.shape[3:]), 2, 0)  # noqa: E731
  eta = ttt_inner.token_lr(to_mb(gate), tau, BASE_LR[kind], d)
  final, z = ttt_inner.scan_minibatches(step, params, ln, (to_mb(xq), to_mb(xk), to_mb(xv), eta),
                                        remat_group)
  return final, jnp.moveaxis(z, 0, 2).reshape(bsz, h, length, d)


@pytest.mark.parametrize("kind,remat_group", [("linear", 2), ("mlp", 0)])
def test_kernel_equals_dual_values_and_grads(kind, remat_group):
  b = 4
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 2, 2, 16, 8, b, seed=3)
  probe = jnp.asarray(np.random.default_rng(5).standard_normal(xq.shape), jnp.float32)
  steps = {"dual": ttt_inner.STEPS[(kind, "dual")],
           "pallas": ttt_pallas.pallas_step(kind, interpret=True)}
  res = {}
  for name, step in steps.items():
    def objective(*args, step=step):
      final, z = run(kind, step, *args, b=b, remat_group=remat_group)
      value = jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))
      return value, (final, z)

    grad_fn = jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True)
    res[name] = jax.jit(grad_fn)(params, ln, xq, xk, xv, gate, tau)
  (_, (final_d, z_d)), g_d = res["dual"]
  (_, (final_p, z_p)), g_p = res["pallas"]
  assert rel_err(z_p, z_d) <= 1e-5
  assert tree_rel_err(final_p, final_d) <= 1e-5
  assert tree_rel_err(g_p, g_d) <= 1e-5


def test_kernel_is_one_pallas_call_per_minibatch():
  params, ln, (xq, xk, xv), gate, tau = random_inputs("linear", 1, 2, 8, 8, 8, seed=1)
  eta = ttt_inner.token_lr(gate.reshape(1, 2, 8), tau, 1.0, 8)
  step = ttt_pallas.pallas_step("linear", interpret=True)
  jaxpr = jax.make_jaxpr(step)(params, ln, xq, xk, xv, eta)
  assert str(jaxpr).count("pallas_call") == 1


def test_mixer_with_pallas_impl_matches_dual():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 32)), jnp.float32)
  pos = jnp.arange(16, dtype=jnp.int32)
  outs = {}
  for impl in ("dual", "pallas"):
    m = randomize(TTTMixer(mixer_cfg(impl=impl, remat_group=2), compute_dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=nnx.Rngs(0)), std=0.1)
    graphdef, params = nnx.split(m)

    def loss(p, x, graphdef=graphdef):
      y, _ = nnx.merge(graphdef, p)(x, pos, None)
      return jnp.sum(jnp.sin(y)), y

    outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  (_, y_d), g_d = outs["dual"]
  (_, y_p), g_p = outs["pallas"]
  assert rel_err(y_p, y_d) <= 1e-5 and tree_rel_err(g_p, g_d) <= 1e-5
