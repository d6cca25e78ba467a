"""Small helpers shared by the layers: dtypes and logically-partitioned initializers."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype(name: str):
  return DTYPES[name]


def normal_init(std: float, axes: tuple[str | None, ...]):
  """A N(0, std²) initializer tagged with logical axis names (see ttt_jax/sharding.py)."""
  return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def const_init(value: float, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.constant(value), axes)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, std: float,
           compute_dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  """A bias-free (by default) projection whose kernel carries logical axis names."""
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias, dtype=compute_dtype, param_dtype=param_dtype,
      kernel_init=normal_init(std, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs)
