"""The mixer's fast paths against the plain references they replace: the sequence-level dual
form (layers/ttt_dual.py) against `ttt_inner.scan_minibatches` of the per-mini-batch dual step
(values, final weights, gradients w.r.t. every input; remat groups, unrolling, streaming's
`complete` mask), and the causal convs against the sum of shifted products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.benchmarks import revisions
from ttt_jax.config import build_config
from ttt_jax.layers import mixers, ttt, ttt_dual, ttt_inner, ttt_variants
from ttt_jax.layers.ttt import CausalConv, causal_conv, causal_convs
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


def shifted_sum(xp, w, bias):
  t = xp.shape[1] - w.shape[0] + 1
  return sum(xp[:, j:j + t] * w[j] for j in range(w.shape[0])) + bias


def test_causal_conv_gradients_equal_autodiff_of_the_sum():
  rng = np.random.default_rng(6)
  xp, w, bias = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                 for s in ((2, 13, 5), (4, 5), (5,)))
  probe = jnp.asarray(rng.standard_normal((2, 10, 5)), jnp.float32)

  grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a)) * probe), argnums=(0, 1, 2))(
      xp, w, bias) for f in (shifted_sum, causal_conv)]
  assert tree_rel_err(grads[1], grads[0]) <= 1e-6


@pytest.mark.parametrize("convs", [1, 2, 3])
def test_causal_convs_of_one_input_equal_separate_sums_values_and_gradients(convs):
  """Convs sharing an input (TTT's Q and K convs; the Mamba backbone's pre-conv alone): values
  and the gradients w.r.t. the input and every kernel and bias equal autodiff of the separate
  sums of shifted products."""
  rng = np.random.default_rng(10 + convs)
  xp = jnp.asarray(rng.standard_normal((3, 17, 6)), jnp.float32)
  kernels = tuple((jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
                   jnp.asarray(rng.standard_normal(6), jnp.float32)) for _ in range(convs))
  probes = [jnp.asarray(rng.standard_normal((3, 14, 6)), jnp.float32) for _ in range(convs)]

  def loss(fn, xp, kernels):
    return sum(jnp.sum(jnp.sin(y) * p) for y, p in zip(fn(xp, kernels), probes, strict=True))

  plain = lambda xp, kernels: tuple(shifted_sum(xp, w, b) for w, b in kernels)  # noqa: E731
  ys, ref = causal_convs(xp, kernels), plain(xp, kernels)
  assert len(ys) == convs and tree_rel_err(ys, ref) <= 1e-6
  grads, want = (jax.grad(lambda *a, f=f: loss(f, *a), argnums=(0, 1))(xp, kernels)
                 for f in (causal_convs, plain))
  assert jax.tree.structure(grads) == jax.tree.structure(want)
  assert tree_rel_err(grads, want) <= 1e-6


def test_causal_convs_gradients_in_bf16_keep_dtypes_and_sum_in_fp32():
  """bf16 convs (the compute dtype): cotangents come back in each input's dtype, and the weight
  and bias cotangents (sums over every token) are summed in fp32 before the cast: within bf16's
  rounding of the fp32 result at 4K tokens, the reduction's input fp32."""
  rng = np.random.default_rng(21)
  xp32 = jnp.asarray(rng.standard_normal((2, 2051, 8)), jnp.float32)
  k32 = tuple((jnp.asarray(rng.standard_normal((4, 8)), jnp.float32),
               jnp.asarray(rng.standard_normal(8), jnp.float32)) for _ in range(2))
  g32 = tuple(jnp.asarray(rng.standard_normal((2, 2048, 8)), jnp.float32) for _ in range(2))
  bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731
  _, vjp = jax.vjp(causal_convs, bf(xp32), bf(k32))
  dxp, dk = vjp(bf(g32))
  assert dxp.dtype == jnp.bfloat16 and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(dk))
  # reference: the same bf16 inputs, differentiated in fp32
  _, vjp32 = jax.vjp(causal_convs, *jax.tree.map(lambda a: a.astype(jnp.float32),
                                                  (bf(xp32), bf(k32))))
  _, dk_ref = vjp32(jax.tree.map(lambda a: a.astype(jnp.float32), bf(g32)))
  for got, want in zip(jax.tree.leaves(dk), jax.tree.leaves(dk_ref), strict=True):
    assert rel_err(got.astype(jnp.float32), want) <= 8e-3
  # the products are summed in fp32 (a bf16 sum of 4K tokens would pass the bound above too)
  jaxpr = jax.make_jaxpr(vjp)(bf(g32))
  sums = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "reduce_sum"]
  assert [e.invars[0].aval.dtype for e in sums] == [jnp.float32]
  # mixed dtypes: every cotangent in its own input's dtype
  _, vjp = jax.vjp(causal_convs, bf(xp32), ((k32[0][0], bf(k32[0][1])),))
  dxp, ((dw, db),) = vjp((g32[0],))
  assert (dxp.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)


def test_causal_convs_refuse_kernels_of_different_widths():
  xp = jnp.ones((1, 9, 3))
  with pytest.raises(ValueError, match=r"one width expected, got widths \[2, 4\]"):
    causal_convs(xp, ((jnp.ones((4, 3)), jnp.ones(3)), (jnp.ones((2, 3)), jnp.ones(3))))
  with pytest.raises(ValueError, match="got widths none"):
    causal_convs(xp, ())


def test_causal_convs_backward_takes_one_reduction_for_every_weight_and_bias():
  """The weight and bias cotangents of all the convs are one reduction over (batch, time) of
  the per-token products laid side by side along the channels (XLA:GPU otherwise launches a
  two-stage reduction per tap and conv, `make gpu-census`)."""
  xp = jnp.ones((2, 11, 4))
  kernels = tuple((jnp.ones((4, 4)), jnp.ones(4)) for _ in range(2))
  _, vjp = jax.vjp(causal_convs, xp, kernels)
  jaxpr = jax.make_jaxpr(vjp)(tuple(jnp.ones((2, 8, 4)) for _ in range(2)))
  reductions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name.startswith("reduce")]
  assert [(e.primitive.name, e.params["axes"]) for e in reductions] == [("reduce_sum", (0, 1))]
  assert reductions[0].invars[0].aval.shape == (2, 8, (2 * 4 + 2) * 4)


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
