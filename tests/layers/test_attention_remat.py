"""Rematerialised query-block attention (layers/attention_remat.py) == the dense masked softmax,
in values, gradients and gradients of gradients (TTT-E2E's meta-learning differentiates the
inner loop's attention twice), per sequence under `jax.vmap`, for every impl it serves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.layers import attention as A
from ttt_jax.layers import attention_remat as R
from ttt_jax.layers.attention_kernels import library_attention


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def window_inputs(window, chunk=64, empty=40, heads=4, kv_heads=4, seed=0):
  """A chunk of queries against [carried window ++ chunk] keys, the window's first `empty`
  slots never filled (position -1), as TTT-E2E's inner loop sees them early in a sequence."""
  keys = jax.random.split(jax.random.key(seed), 4)
  b, d, cap = 2, 8, window
  q = jax.random.normal(keys[0], (b, chunk, heads, d))
  k = jax.random.normal(keys[1], (b, cap + chunk, kv_heads, d))
  v = jax.random.normal(keys[2], (b, cap + chunk, kv_heads, d))
  start = 5 * chunk  # absolute position of the chunk's first token
  slots = jnp.arange(start - cap, start)
  k_pos = jnp.concatenate([jnp.where(jnp.arange(cap) < empty, -1, slots),
                           jnp.arange(start, start + chunk)]).astype(jnp.int32)
  q_pos = jnp.arange(start, start + chunk, dtype=jnp.int32)
  probe = jax.random.normal(keys[3], q.shape)
  return (q, k, v), q_pos, k_pos, probe


def dense(q_pos, k_pos, window):
  return lambda q, k, v: A.dense_attention(q, k, v, q_pos, k_pos, window)


DENSE = {"blockwise": A.dense_attention, "xla": R.xla_dense}


def blocked(q_pos, k_pos, window, q_block, impl):
  return lambda q, k, v: R.remat_blocked_attention(q, k, v, q_pos, k_pos, window,
                                                   q_block=q_block, dense=DENSE[impl])


def first_and_second_order(fn, probe):
  """(the attention, a loss's gradient, the gradient of a function of that gradient): the
  shape of meta-learning, where the outer loss depends on the inner gradient."""
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * probe)  # noqa: E731
  grad = jax.grad(loss, argnums=(0, 1, 2))

  def outer(q, k, v):
    gq, gk, gv = grad(q, k, v)
    return jnp.sum(gq * gq) + jnp.sum(gk * gv) + jnp.sum(jnp.cos(fn(q, k, v)))

  return jax.jit(fn), jax.jit(grad), jax.jit(jax.grad(outer, argnums=(0, 1, 2)))


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
@pytest.mark.parametrize("window,q_block,kv_heads", [(96, 16, 4), (96, 64, 2), (None, 32, 4)])
def test_values_gradients_and_second_order_equal_dense(impl, window, q_block, kv_heads):
  cap = 96
  args, q_pos, k_pos, probe = window_inputs(cap, kv_heads=kv_heads)
  ref = first_and_second_order(dense(q_pos, k_pos, window), probe)
  got = first_and_second_order(blocked(q_pos, k_pos, window, q_block, impl), probe)
  assert rel_err(got[0](*args), ref[0](*args)) < 1e-5
  for order in (1, 2):
    for a, r in zip(got[order](*args), ref[order](*args), strict=True):
      assert rel_err(a, r) < 2e-5, order


def test_per_sequence_under_vmap():
  """The inner loop runs attention per sequence under `jax.vmap` (positions shared)."""
  args, q_pos, k_pos, probe = window_inputs(96)
  per_seq = lambda fn: jax.vmap(  # noqa: E731
      lambda q, k, v, p: first_and_second_order(fn, p)[2](q, k, v))
  one = lambda a: a[:, None]  # noqa: E731
  ref = per_seq(dense(q_pos, k_pos, 96))(*map(one, args), one(probe))
  got = per_seq(blocked(q_pos, k_pos, 96, 16, "xla"))(*map(one, args), one(probe))
  for a, r in zip(got, ref, strict=True):
    assert rel_err(a, r) < 2e-5


def test_bf16_inputs_match_the_library_kernel():
  """bf16 values and gradients as one call of the library kernel gives them (keys seen by
  several blocks get their cotangent summed in float32, rounded once)."""
  args, q_pos, k_pos, probe = window_inputs(96)
  args = [a.astype(jnp.bfloat16) for a in args]
  ref = lambda q, k, v: library_attention(q, k, v, q_pos, k_pos, 96, impl="xla",  # noqa: E731
                                          one_shot=False)
  got = blocked(q_pos, k_pos, 96, 16, "xla")
  assert got(*args).dtype == jnp.bfloat16
  assert rel_err(got(*args), ref(*args)) < 1e-2
  grads = [first_and_second_order(fn, probe.astype(jnp.bfloat16))[1](*args) for fn in (got, ref)]
  for a, r in zip(*grads, strict=True):
    assert a.dtype == jnp.bfloat16
    assert rel_err(a, r) < 2e-2


def test_each_block_reads_only_the_keys_it_can_see():
  """A block of 16 queries in a window of 96 needs 96 + 16 - 1 keys, not all 160."""
  assert R.key_span(160, 16, 96) == 111
  assert R.key_span(160, 64, 96) == 159
  assert R.key_span(160, 16, None) == 160


@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_the_algorithm_takes_blocks_for_ordered_inputs_and_gives_nan_for_unordered(impl):
  """`AttentionAlgorithm.remat_block` routes a window cache's queries through the blocks (the
  same output as without); keys out of order give NaN, not wrong numbers."""
  args, q_pos, k_pos, _ = window_inputs(96)
  plain = A.AttentionAlgorithm(impl=impl)
  blocks = A.AttentionAlgorithm(impl=impl, remat_block=16)
  ref = A.dot_product_attention(*args, q_pos, k_pos, 96, ordered=True, algorithm=plain)
  got = A.dot_product_attention(*args, q_pos, k_pos, 96, ordered=True, algorithm=blocks)
  assert rel_err(got, ref) < 1e-5
  last = A.dot_product_attention(args[0][:, -1:], *args[1:], q_pos[-1:], k_pos, 96,
                                 ordered=True, algorithm=blocks)  # one query (decoding)
  assert rel_err(last, ref[:, -1:]) < 1e-5
  q, k, v = args  # one-shot inputs (keys = queries), windowed and causal
  for window in (24, None):
    ref = A.dense_attention(q, q, v[:, :64], q_pos, q_pos, window)
    got = A.dot_product_attention(q, q, v[:, :64], q_pos, q_pos, window, ordered=True,
                                  algorithm=blocks)
    assert rel_err(got, ref) < 1e-5
  out = A.dot_product_attention(*args, q_pos, k_pos[::-1], 96, ordered=True, algorithm=blocks)
  assert np.isnan(np.asarray(out)).all()


def test_no_pass_keeps_a_chunk_of_scores():
  """XLA's buffer assignment for the second-order gradient: the blocked form needs less than
  one [chunk, keys] score matrix per head, the dense form several."""
  args, q_pos, k_pos, probe = window_inputs(512, chunk=512, empty=0, heads=4)
  scores = 2 * 4 * 512 * (512 + 512) * 4  # one fp32 [B, H, chunk, keys] matrix

  def temp(fn):
    compiled = first_and_second_order(fn, probe)[2].lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp(dense(q_pos, k_pos, 512)) > 4 * scores  # 12.1x when written
  assert temp(blocked(q_pos, k_pos, 512, 32, "xla")) < scores  # 0.63x
