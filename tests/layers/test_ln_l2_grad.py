"""The written-out backward pass of ttt_inner.ln_l2_grad against autodiff of its formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.layers import ttt_inner


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def plain(z, target, scale, bias):
  """The formula alone: JAX differentiates it op by op."""
  return ttt_inner.ln_l2_grad_parts(z, target, scale, bias, ttt_inner.LN_EPS)[0]


def plain_by_autodiff(z, target, scale, bias):
  """The same value as d/dz of the loss itself (what the formula claims to be)."""
  def loss(z):
    return 0.5 * jnp.sum(jnp.square(ttt_inner.layer_norm(z, scale, bias) - target))
  return jax.grad(loss)(z)


@pytest.fixture(scope="module")
def inputs():
  ks = jax.random.split(jax.random.key(7), 5)
  shape = (2, 4, 16, 64)  # [B, H, b, d] of one mini-batch; scale/bias per head [H, 1, d]
  z = 2.0 * jax.random.normal(ks[0], shape) + 0.5
  target = jax.random.normal(ks[1], shape)
  scale = 1.0 + 0.3 * jax.random.normal(ks[2], (4, 1, 64))
  bias = 0.2 * jax.random.normal(ks[3], (4, 1, 64))
  cot = jax.random.normal(ks[4], shape)
  return z, target, scale, bias, cot


def test_value_is_the_gradient_of_the_ln_l2_loss(inputs):
  z, target, scale, bias, _ = inputs
  assert rel_err(ttt_inner.ln_l2_grad(z, target, scale, bias),
                 plain_by_autodiff(z, target, scale, bias)) < 1e-5


@pytest.mark.parametrize("jit", [False, True])
def test_backward_matches_autodiff_for_every_input(inputs, jit):
  """Cotangents of z, target and the broadcast scale/bias [H, 1, d] (summed back to shape)."""
  z, target, scale, bias, cot = inputs

  def vjp(fn):
    return jax.vjp(fn, z, target, scale, bias)[1](cot)

  ours = (jax.jit(vjp, static_argnums=0) if jit else vjp)(ttt_inner.ln_l2_grad)
  ref = vjp(plain)
  for name, a, b in zip(("z", "target", "scale", "bias"), ours, ref, strict=True):
    assert a.shape == b.shape, name
    assert rel_err(a, b) < 1e-5, name


def test_second_order_and_vmap_match_autodiff(inputs):
  """The backward is itself differentiable (the TTT layer's outer gradient differentiates the
  inner gradient's use) and batches under vmap."""
  z, target, scale, bias, cot = inputs

  def outer(fn):
    def f(z):
      g = jax.vjp(fn, z, target, scale, bias)[1](cot)[0]
      return jnp.sum(jnp.sin(g))
    return jax.grad(f)(z)

  assert rel_err(outer(ttt_inner.ln_l2_grad), outer(plain)) < 1e-5
  per_seq = jax.vmap(lambda z, t, u: jax.vjp(ttt_inner.ln_l2_grad, z, t, scale, bias)[1](u))
  ref = jax.vmap(lambda z, t, u: jax.vjp(plain, z, t, scale, bias)[1](u))
  for a, b in zip(per_seq(z, target, cot), ref(z, target, cot), strict=True):
    assert rel_err(a, b) < 1e-5
