"""Causal multi-head attention: full or sliding-window, RoPE, optional qk-norm, KV state.

Mixer contract (shared by every sequence mixer in this package):
  `mixer(x [B,T,D], positions [T] int32, state) -> (y [B,T,D], new_state)`
  `mixer.init_state(batch_size, capacity) -> state`
`state=None` processes a fresh sequence in one shot and returns `None` as the new state.

The KV state is a fixed-capacity window of the most recent keys/values (keys cached after
qk-norm and before RoPE, with their absolute positions; empty slots hold position -1). New keys
are shifted in at the end, so the same code serves sliding-window attention (capacity = window)
and full attention (capacity = the longest context to be streamed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.common import linear
from ttt_jax.layers.norms import RMSNorm
from ttt_jax.layers.rope import apply_rope

NEG_INF = -1e30


class KVCache(NamedTuple):
  k: jax.Array  # [B, C, H, d] after qk-norm, before RoPE
  v: jax.Array  # [B, C, H, d]
  pos: jax.Array  # [C] int32 absolute positions, -1 = empty


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
  """[Tq, Tk] bool: key visible to query (causal, inside the window, not an empty slot)."""
  qp, kp = q_pos[:, None], k_pos[None, :]
  mask = (kp <= qp) & (kp >= 0)
  if window is not None:
    mask &= (qp - kp) < window
  return mask


def dot_product_attention(q, k, v, q_pos, k_pos, window: int | None) -> jax.Array:
  """Softmax attention with a position-derived mask. q [B,Tq,H,d], k/v [B,Tk,H,d]."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  mask = attention_mask(q_pos, k_pos, window)
  logits = jnp.where(mask[None, None], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
  """Multi-head causal self-attention. `window=None` is full attention."""

  def __init__(self, d_model: int, num_heads: int, *, window: int | None, rope_theta: float,
               qk_norm: bool, norm_eps: float, std: float, out_std: float, compute_dtype,
               param_dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.window = window
    self.rope_theta = rope_theta
    self.compute_dtype = compute_dtype
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.wq = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wk = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wv = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wo = linear(d_model, d_model, ("heads", "embed"), std=out_std, **kw)
    if qk_norm:
      self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, axis_name=None, param_dtype=param_dtype)
      self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, axis_name=None, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def init_state(self, batch_size: int, capacity: int | None = None) -> KVCache:
    """Empty KV state. Capacity defaults to the window (required for full attention)."""
    capacity = capacity if self.window is None else self.window
    if capacity is None:
      raise ValueError("full attention needs an explicit KV capacity (the longest context)")
    shape = (batch_size, capacity, self.num_heads, self.head_dim)
    return KVCache(k=jnp.zeros(shape, self.compute_dtype), v=jnp.zeros(shape, self.compute_dtype),
                   pos=jnp.full((capacity,), -1, jnp.int32))

  def _split_heads(self, x):
    return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array, state: KVCache | None = None):
    x = x.astype(self.compute_dtype)
    q = self._split_heads(self.wq(x))
    k = self._split_heads(self.wk(x))
    v = self._split_heads(self.wv(x))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if state is None:
      k_all, v_all, k_pos = k, v, positions
      new_state = None
    else:
      k_all = jnp.concatenate([state.k, k.astype(state.k.dtype)], axis=1)
      v_all = jnp.concatenate([state.v, v.astype(state.v.dtype)], axis=1)
      k_pos = jnp.concatenate([state.pos, positions.astype(jnp.int32)])
      cap = state.pos.shape[0]
      new_state = KVCache(k=k_all[:, -cap:], v=v_all[:, -cap:], pos=k_pos[-cap:])
    q = apply_rope(q, positions, self.rope_theta)
    k_all = apply_rope(k_all, k_pos, self.rope_theta)
    out = dot_product_attention(q, k_all, v_all, positions, k_pos, self.window)
    out = out.reshape(*out.shape[:-2], -1)
    return self.wo(out), new_state
