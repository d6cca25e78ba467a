"""Rotary position embeddings (half-split convention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies theta^(-2i/d) for i in [0, d/2)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates x [..., T, H, d] by angle position * freq; positions [T] (or broadcastable)."""
  d = x.shape[-1]
  angles = positions.astype(jnp.float32)[:, None] * rope_frequencies(d, theta)[None, :]
  sin = jnp.sin(angles)[:, None, :]  # [T, 1, d/2]
  cos = jnp.cos(angles)[:, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
