"""Attention of a few queries against a full-attention KV cache, reading only its filled slots.

A full-attention cache (layers/attention.py) has the capacity of the longest context and fills
its slots left to right, so while decoding most of it is empty: a dense masked softmax over
every slot reads the whole cache for each token. `filled_attention` instead runs an online
softmax over key blocks of `block` slots, in a loop whose trip count is the number of blocks
holding keys (a run-time value), so a decode step reads O(filled) keys and values, in the same
compiled program at every length. The result equals the dense masked softmax (to fp rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
