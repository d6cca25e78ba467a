"""SwiGLU MLP: y = W2 (silu(W1 x) * W3 x)."""

from __future__ import annotations

import jax
from flax import nnx

from ttt_jax.layers.common import normal_init


class InnerParam(nnx.Param):
  """A parameter that TTT-E2E keeps training at test time (the prime MLPs' weights).

  It is still an outer-loop parameter (its initial value is meta-learned); models/e2e.py
  splits the state by this type to run the inner loop.
  """


class SwiGLU(nnx.Module):

  def __init__(self, d_model: int, hidden: int, *, std: float, out_std: float, compute_dtype,
               param_dtype, rngs: nnx.Rngs, param_type: type[nnx.Param] = nnx.Param):
    self.compute_dtype = compute_dtype
    key = rngs.params
    self.w1 = param_type(normal_init(std, ("embed", "mlp"))(key(), (d_model, hidden), param_dtype))
    self.w3 = param_type(normal_init(std, ("embed", "mlp"))(key(), (d_model, hidden), param_dtype))
    self.w2 = param_type(
        normal_init(out_std, ("mlp", "embed"))(key(), (hidden, d_model), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    x = x.astype(dt)
    gate = jax.nn.silu(x @ self.w1[...].astype(dt))
    return (gate * (x @ self.w3[...].astype(dt))) @ self.w2[...].astype(dt)
