"""The mixer's fast paths against the plain references they replace: the sequence-level dual
form (layers/ttt_dual.py) against `ttt_inner.scan_minibatches` of the per-mini-batch dual step
(values, final weights, gradients w.r.t. every input; remat groups, unrolling, streaming's
`complete` mask), and the causal conv against the sum of shifted products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.benchmarks import revisions
from ttt_jax.config import build_config
from ttt_jax.layers import mixers, ttt, ttt_dual, ttt_inner, ttt_variants
from ttt_jax.layers.ttt import CausalConv, causal_conv
from ttt_jax.models import lm

from .test_ttt import BASE_LR, random_inputs, rel_err, tree_rel_err


def to_minibatches(params, ln, views, gate, tau, kind, b):
  bsz, h, length, d = views[0].shape
  n = length // b
  to_mb = lambda a: jnp.moveaxis(a.reshape(bsz, h, n, b, *a.shape[3:]), 2, 0)  # noqa: E731
  eta = ttt_inner.token_lr(to_mb(gate), tau, BASE_LR[kind], d)
  return params, ln, *(to_mb(v) for v in views), eta


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("remat_group,with_mask", [(0, False), (2, False), (3, True)])
def test_dual_sequence_equals_scanned_dual_step(kind, remat_group, with_mask):
  b = 4
  params, ln, views, gate, tau = random_inputs(kind, 2, 2, 7 * b, 8, b, seed=11)
  args = to_minibatches(params, ln, views, gate, tau, kind, b)
  complete = jnp.arange(7) < 5 if with_mask else None  # the last two leave W unchanged
  probe = jnp.asarray(np.random.default_rng(2).standard_normal(args[2].shape), jnp.float32)

  def reference(params, ln, xq, xk, xv, eta):
    return ttt_inner.scan_minibatches(ttt_inner.inner_model(kind).step("dual"), params, ln,
                                      (xq, xk, xv, eta), remat_group, complete)

  def fast(params, ln, xq, xk, xv, eta):
    return ttt_dual.dual_sequence(kind, params, ln, xq, xk, xv, eta, remat_group, complete)

  res = {}
  for name, fn in (("reference", reference), ("fast", fast)):
    def objective(*a, fn=fn):
      final, z = fn(*a)
      value = jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))
      return value, (final, z)

    grad_fn = jax.value_and_grad(objective, argnums=tuple(range(6)), has_aux=True)
    res[name] = jax.jit(grad_fn)(*args)
  (_, (final_r, z_r)), g_r = res["reference"]
  (_, (final_f, z_f)), g_f = res["fast"]
  assert rel_err(z_f, z_r) <= 1e-6
  assert tree_rel_err(final_f, final_r) <= 1e-6
  assert tree_rel_err(g_f, g_r) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_augment_round_trip(kind):
  params = random_inputs(kind, 1, 2, 4, 8, 4, seed=0)[0]
  pairs = ttt_inner.inner_model(kind).layers
  back = ttt_dual.split_augmented(pairs, ttt_dual.augment(pairs, params))
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert tree_rel_err(back, params) == 0.0


def test_causal_conv_equals_sum_of_shifted_products():
  conv = CausalConv(6, 4, axis=None, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(3))
  rng = np.random.default_rng(4)
  conv.bias[...] = jnp.asarray(rng.standard_normal(6), jnp.float32)
  x = jnp.asarray(rng.standard_normal((2, 10, 6)), jnp.float32)
  w, bias = conv.kernel[...], conv.bias[...]
  xp = jnp.concatenate([jnp.zeros((2, 3, 6)), x], axis=1)
  ref = sum(xp[:, j:j + 10] * w[j] for j in range(4)) + bias
  y, _ = conv(x)
  assert rel_err(y, ref) <= 1e-6
  state = jnp.asarray(rng.standard_normal((2, 3, 6)), jnp.float32)  # streaming: history given
  xp = jnp.concatenate([state, x], axis=1)
  ref = sum(xp[:, j:j + 10] * w[j] for j in range(4)) + bias
  y, new_state = conv(x, state)
  assert rel_err(y, ref) <= 1e-6
  assert rel_err(new_state, x[:, -3:]) == 0.0


def test_causal_conv_gradients_equal_autodiff_of_the_sum():
  rng = np.random.default_rng(6)
  xp, w, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((2, 13, 5), (4, 5), (5,)))
  probe = jnp.asarray(rng.standard_normal((2, 10, 5)), jnp.float32)

  def plain(xp, w, bias):
    return sum(xp[:, j:j + 10] * w[j] for j in range(4)) + bias

  grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a)) * probe), argnums=(0, 1, 2))(
      xp, w, bias) for f in (plain, causal_conv)]
  assert tree_rel_err(grads[1], grads[0]) <= 1e-6


def test_revision_swap_restores_every_binding():
  """scripts/compare_speed.py times old code beside new through revisions.swapped: inside the
  block the mixer class the LM builds comes from the old source, after it everything is back."""
  before = (ttt_variants.TTTMixer, ttt.ttt_inner, ttt_variants.CausalConv)
  specs = dict(mixers.MIXERS)
  with revisions.swapped("HEAD", ["ttt_jax.layers.ttt_inner", "ttt_jax.layers.ttt"]) as old:
    assert ttt_variants.TTTMixer is old["ttt_jax.layers.ttt"].TTTMixer is not before[0]
    assert ttt_variants.CausalConv is not before[2]
    assert old["ttt_jax.layers.ttt"].ttt_inner is old["ttt_jax.layers.ttt_inner"]
    cfg = build_config("model=ttt_linear,scale=tiny,ctx=64").model
    cfg.d_model, cfg.num_heads = 32, 2
    assert type(lm.make_mixer(cfg, nnx.Rngs(0))) is old["ttt_jax.layers.ttt"].TTTMixer
  assert (ttt_variants.TTTMixer, ttt.ttt_inner, ttt_variants.CausalConv) == before
  assert mixers.MIXERS == specs
