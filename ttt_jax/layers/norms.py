"""RMSNorm (computed in fp32, cast back to the input dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.common import const_init


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
  """y = x / rms(x) * scale over the last axis."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
               param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(const_init(1.0, (axis_name,))(None, (dim,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)
