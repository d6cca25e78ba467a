"""Attention of a few queries against a full-attention KV cache, reading only its filled slots.

A full-attention cache (layers/attention.py) has the capacity of the longest context and fills
its slots left to right, so while decoding most of it is empty: a dense masked softmax over
every slot reads the whole cache for each token. `filled_attention` instead runs an online
softmax over key blocks of `block` slots, in a loop whose trip count is the number of blocks
holding keys (a run-time value), so a decode step reads O(filled) keys and values, in the same
compiled program at every length. The result equals the dense masked softmax (to fp rounding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ttt_jax.layers.common import padded_dim, pltriton, triton

NEG_INF = -1e30


def online_softmax_step(carry, qg, kj, vj, mask, scale: float):
  """One key block of an online softmax. carry = (running max [B,Hkv,G,Tq], normaliser
  [B,Hkv,G,Tq], weighted value sum [B,Hkv,G,Tq,d]); qg [B,Tq,Hkv,G,d] grouped queries, kj/vj
  [B,K,Hkv,d] the block's keys/values, mask [Tq, K] the visible ones."""
  m, norm, acc = carry
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kj, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask, s, NEG_INF)
  m_new = jnp.maximum(m, s.max(-1))
  p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
  return m_new, norm * corr + p.sum(-1), acc * corr[..., None] + pv


def filled_attention(q, k, v, q_pos, k_pos, end, *, block: int) -> jax.Array:
  """Causal attention of q [B, Tq, H, d] (positions q_pos [Tq]) over the cache's first `end`
  slots (k/v [B, C, Hkv, d], positions k_pos [C], -1 = empty; C a multiple of `block`; Hkv
  divides H: grouped-query attention). Slots at or past `end` must be empty or invisible.
  The loop's trip count is known only at run time, so this is not reverse-differentiable: it
  serves streaming and decoding, where no gradient flows through a full-attention cache."""
  b, tq, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  qg = q.reshape(b, tq, hk, g, d)
  scale = d ** -0.5

  def body(j, carry):
    kj = jax.lax.dynamic_slice_in_dim(k, j * block, block, axis=1)
    vj = jax.lax.dynamic_slice_in_dim(v, j * block, block, axis=1)
    kp = jax.lax.dynamic_slice_in_dim(k_pos, j * block, block)
    mask = (kp[None, :] <= q_pos[:, None]) & (kp[None, :] >= 0)  # [Tq, block]
    return online_softmax_step(carry, qg, kj, vj, mask, scale)

  init = (jnp.full((b, hk, g, tq), NEG_INF, jnp.float32), jnp.zeros((b, hk, g, tq), jnp.float32),
          jnp.zeros((b, hk, g, tq, d), jnp.float32))
  n_blocks = (jnp.asarray(end, jnp.int32) + block - 1) // block
  _, norm, acc = jax.lax.fori_loop(0, n_blocks, body, init)
  out = acc / jnp.where(norm > 0, norm, 1.0)[..., None]  # [B, Hkv, G, Tq, d]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, d).astype(v.dtype)


# -- the same attention as one Triton kernel (GPU) -------------------------------------------------
# On a GPU the library kernels cannot take this shape well: cuDNN's causal mask is aligned at
# the top left (query i sees key i), so queries at the END of a cache can only be given a dense
# [Tq, C] boolean mask, and the kernel then reads all C slots, filled or not (a 128K prefill in
# chunks of 512 reads 256 x 128K slots per layer). `filled_attention_pallas` is a flash-attention
# forward written for this case: it reads only the blocks holding keys, splits them over several
# programs per (sequence, KV head, query block) so a decode step (one query) still fills the
# GPU (split-K, "flash decoding"), and merges the splits' partial softmaxes in XLA.
# Forward only: streaming and decoding take no gradient through a full-attention cache.

PALLAS_BLOCK_K = 64  # cache slots per key block (the kernel needs a capacity of at least one)
_TARGET_PROGRAMS = 256  # ~2 programs per SM of an H100/H200 (132 SMs)


def _filled_kernel(end_ref, qpos_ref, q_ref, k_ref, v_ref, kpos_ref, acc_ref, m_ref, l_ref, *,
                   splits: int, block_k: int, scale: float, width: int):
  """One (sequence x KV head, query block, split) program: the split's share of the key blocks
  that hold keys, as an online softmax. Writes the unnormalised sum, running max and normaliser.
  Where the capacity C is not a multiple of the block, the last block is read from C - block_k
  (in bounds) and its slots already read before are masked out. The cache's head dim `width`
  is read into blocks of the queries' padded width (`common.padded_dim`), the columns past it
  masked to zero, which adds nothing to the scores and makes zero output columns."""
  c = kpos_ref.shape[0]
  ragged = c % block_k != 0
  used = (end_ref[0] + block_k - 1) // block_k
  per = (used + splits - 1) // splits
  lo = pl.program_id(2) * per
  hi = jnp.minimum(lo + per, used)
  q, qp = q_ref[...], qpos_ref[...]
  padded = q.shape[-1]

  def read(ref, cols):
    if width == padded:
      return ref[cols, :]
    inside = jax.lax.broadcasted_iota(jnp.int32, (1, padded), 1) < width
    return pltriton.load(ref.at[cols, :], mask=inside, other=0.0)

  def body(j, carry):
    acc, m, norm = carry
    first = j * block_k
    start = jnp.minimum(first, c - block_k) if ragged else pl.multiple_of(first, block_k)
    cols = pl.ds(start, block_k)
    kp = kpos_ref[cols]
    s = jax.lax.dot_general(q, read(k_ref, cols), (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    if ragged:  # slots before `first` belong to the previous block
      kp = jnp.where(start + jnp.arange(block_k) >= first, kp, -1)
    visible = (kp[None, :] <= qp[:, None]) & (kp[None, :] >= 0)
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, NEG_INF), axis=1))
    p = jnp.where(visible, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    v = read(v_ref, cols)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return acc * corr[:, None] + pv, m_new, norm * corr + jnp.sum(p, axis=1)

  rows, d = acc_ref.shape
  init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, norm = jax.lax.fori_loop(lo, hi, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = norm


def filled_attention_pallas(q, k, v, q_pos, k_pos, end, *, interpret: bool = False,
                            block_q: int = 64, block_k: int = PALLAS_BLOCK_K, num_warps: int = 4,
                            num_stages: int = 2) -> jax.Array:
  """`filled_attention` as one Triton kernel. Same arguments and result; C >= `block_k`; a head
  dim that is not a Triton block dimension runs padded (`common.padded_dim`: the queries in XLA,
  the cache in the kernel's masked reads). The G = H / Hkv query heads that share a
  KV head and the Tq queries form the rows of one KV head's query blocks, of at most `block_q`
  rows (fewer rows: the next power of two >= 16). Tiles and launch parameters are untuned
  defaults (`make gpu-check`'s cache_attention task times alternatives)."""
  b, tq, h, d = q.shape
  c, hk = k.shape[1], k.shape[2]
  g = h // hk
  if c < block_k:
    raise ValueError(f"filled_attention_pallas: the capacity {c} must be >= {block_k}")
  dp = padded_dim(d)
  rows = tq * g
  block_q = min(block_q, padded_dim(rows))
  n_q = -(-rows // block_q)
  padded = n_q * block_q
  base = b * hk * n_q
  splits = max(1, min(-(-c // block_k), -(-_TARGET_PROGRAMS // base)))
  # rows of KV head j: (query t, head j*G + i) -> t*G + i; padding rows see no key (position -1)
  qr = q.reshape(b, tq, hk, g, d).transpose(0, 2, 1, 3, 4).reshape(b * hk, rows, d)
  qr = jnp.pad(qr, ((0, 0), (0, padded - rows), (0, dp - d)))
  row_pos = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), g), (0, padded - rows),
                    constant_values=-1)
  # an overflowing stream (end > C: KVCacheOverflow is raised beside this call) reads no block
  # past the cache
  end = jnp.reshape(jnp.minimum(jnp.asarray(end, jnp.int32), c), (1,))
  kv_spec = pl.BlockSpec((None, c, None, dp), lambda i, qi, s: (i // hk, 0, i % hk, 0))
  kernel = functools.partial(_filled_kernel, splits=splits, block_k=block_k, scale=d ** -0.5,
                             width=d)
  acc, m, norm = pl.pallas_call(
      kernel,
      grid=(b * hk, n_q, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, qi, s: (0,)),
                pl.BlockSpec((block_q,), lambda i, qi, s: (qi,)),
                pl.BlockSpec((None, block_q, dp), lambda i, qi, s: (i, qi, 0)),
                kv_spec, kv_spec,
                pl.BlockSpec((c,), lambda i, qi, s: (0,))],
      out_specs=[pl.BlockSpec((None, None, block_q, dp), lambda i, qi, s: (i, s, qi, 0)),
                 pl.BlockSpec((None, None, block_q), lambda i, qi, s: (i, s, qi)),
                 pl.BlockSpec((None, None, block_q), lambda i, qi, s: (i, s, qi))],
      out_shape=[jax.ShapeDtypeStruct((b * hk, splits, padded, dp), jnp.float32),
                 jax.ShapeDtypeStruct((b * hk, splits, padded), jnp.float32),
                 jax.ShapeDtypeStruct((b * hk, splits, padded), jnp.float32)],
      compiler_params=triton("model.cache_attention_impl").CompilerParams(
          num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="filled_attention")(end, row_pos, qr, k, v,
                                                    k_pos.astype(jnp.int32))
  # merge the splits' partial softmaxes (a split with no visible key has norm 0)
  top = jnp.max(m, axis=1, keepdims=True)
  w = jnp.exp(m - top)
  norm = jnp.sum(norm * w, axis=1)
  acc = jnp.sum(acc * w[..., None], axis=1)
  out = acc / jnp.where(norm > 0, norm, 1.0)[..., None]  # [B*Hkv, padded, dp]
  out = out[:, :rows, :d].reshape(b, hk, tq, g, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, tq, h, d).astype(v.dtype)


class KVCacheOverflow(ValueError):
  """More positions were streamed into a full-attention KV cache than it can hold."""


def _raise_overflow(filled, new, capacity) -> None:
  raise KVCacheOverflow(
      f"full-attention KV cache overflow: capacity {int(capacity)} positions, {int(filled)} "
      f"filled, {int(new)} more given; create the cache with a larger capacity "
      "(model.init_cache(batch, capacity) >= the longest context to be streamed)")


def check_capacity(filled: jax.Array, new: int, capacity: int) -> None:
  """Raises `KVCacheOverflow` (at run time, also under jit) if `new` keys do not fit."""
  jax.lax.cond(filled + new > capacity,
               lambda: jax.debug.callback(_raise_overflow, filled, new, capacity),
               lambda: None)
