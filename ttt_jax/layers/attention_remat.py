"""Attention that keeps no score matrix for any order of derivative (TTT-E2E's inner loop).

TTT-E2E meta-learning differentiates its suffix blocks' attention twice: the inner gradient is
a first derivative, the outer gradient differentiates that. Plain softmax attention keeps its
[Tq, Tk] probabilities for the backward pass, and the backward of the backward keeps the
backward's own [Tq, Tk] intermediates as well; at the `125m` preset (chunks of 1024 queries
against an 8K window) they are most of a meta step's memory when each chunk's attention is one
dense call (docs/gpu_census.md).

`remat_blocked_attention` splits the queries into blocks, each attending only the
`window + rows - 1` keys it can see (ordered inputs, as `attention.causal_blocked_attention`
reads them), and runs each block through a
`jax.custom_vjp` whose forward and backward are both `jax.checkpoint`ed: a derivative of any
order keeps the block's inputs (q, k, v, output cotangent) and recomputes its scores when it
needs them, so at most one block's scores exist at a time in any pass. The backward of a block
is JAX's own derivative of the same dense softmax, so the values and derivatives of every order
are those of `dense_attention` (tests/layers/test_attention_remat.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt_jax.layers.attention_kernels import library_attention

# `dense` for the xla impl: `jax.nn.dot_product_attention(implementation='xla')` with the mask
xla_dense = functools.partial(library_attention, impl="xla", one_shot=False)


def _sliced(q, k, v, q_pos, k_pos, start, span, window, dense, dtype):
  """`dense` attention of q against keys [start, start + span) of k, v, taken in `dtype`."""
  ks, vs = (jax.lax.dynamic_slice_in_dim(x, start, span, axis=1).astype(dtype) for x in (k, v))
  return dense(q, ks, vs, q_pos, jax.lax.dynamic_slice_in_dim(k_pos, start, span), window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def block_attention(q, k, v, q_pos, k_pos, start, span, window, dense, dtype):
  """`dense(q, k, v, q_pos, k_pos, window)` (a masked softmax over every key it is given) of
  the queries q against keys [start, start + span) of k, v (in `dtype`), with forward and
  backward recomputed wherever a derivative needs them. Taking the whole k, v (not the slice)
  makes a loop of blocks keep no per-block copy of its keys for the backward."""
  return _sliced(q, k, v, q_pos, k_pos, start, span, window, dense, dtype)


# `block_attention` runs inside `remat_blocked_attention`'s scan, whose loop already keeps XLA
# from merging a recomputation with the computation it repeats: no CSE barriers needed
_remat = functools.partial(jax.checkpoint, prevent_cse=False)


def _block_fwd(q, k, v, q_pos, k_pos, start, span, window, dense, dtype):
  out = _remat(_sliced, static_argnums=(6, 7, 8, 9))(q, k, v, q_pos, k_pos, start, span, window,
                                                     dense, dtype)
  return out, (q, k, v, q_pos, k_pos, start)


def _block_bwd(span, window, dense, dtype, res, dout):
  q, k, v, q_pos, k_pos, start = res

  def grads(q, k, v, q_pos, k_pos, start, dout):
    f = lambda q, k, v: _sliced(q, k, v, q_pos, k_pos, start, span, window, dense,  # noqa: E731
                                dtype)
    return jax.vjp(f, q, k, v)[1](dout)

  dq, dk, dv = _remat(grads)(q, k, v, q_pos, k_pos, start, dout)
  return dq, dk, dv, None, None, None


block_attention.defvjp(_block_fwd, _block_bwd)


def key_span(tk: int, q_block: int, window: int | None) -> int:
  """Keys each query block of `remat_blocked_attention` reads, of `tk`: every key a block of
  `q_block` queries can see."""
  return tk if window is None else min(tk, window + q_block - 1)


def remat_blocked_attention(q, k, v, q_pos, k_pos, window: int | None, *, q_block: int,
                            dense) -> jax.Array:
  """Masked softmax attention in query blocks of `q_block` rows, one after another
  (`lax.scan`), each over the `key_span` keys ending at its last query, through
  `block_attention` with `dense` (e.g. `attention.dense_attention`). q [B,Tq,H,d],
  k/v [B,Tk,Hkv,d]; Tq a multiple of `q_block`. Exact for ordered inputs
  (`attention.ordered_layout`: the queries are the last Tq keys, the real keys one run of
  positions), which the caller checks (`attention.nan_unless_ordered`). Keys and values enter
  the loop in float32, so the blocks' shares of their cotangents add up in float32 and are
  rounded to their dtype once."""
  b, tq, h, d = q.shape
  tk, dtype = k.shape[1], k.dtype
  span = key_span(tk, q_block, window)
  k, v = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (k, v))
  n = tq // q_block
  qs = q.reshape(b, n, q_block, h, d).swapaxes(0, 1)
  q_pos = q_pos.astype(jnp.int32)
  k_pos = k_pos.astype(jnp.int32)

  def one(_, xs):
    i, qi = xs
    end = tk - tq + (i + 1) * q_block  # one past the block's last query, as a key index
    start = jnp.clip(end - span, 0, tk - span)
    qpi = jax.lax.dynamic_slice_in_dim(q_pos, i * q_block, q_block)
    return None, block_attention(qi, k, v, qpi, k_pos, start, span, window, dense, dtype)

  _, out = jax.lax.scan(one, None, (jnp.arange(n), qs))
  return out.swapaxes(0, 1).reshape(b, tq, h, v.shape[-1])
