"""Small helpers shared by the layers: dtypes, logically-partitioned initializers and the
platform programs are built for."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

try:  # Pallas' Triton backend, which JAX deprecates since 0.11 and means to remove
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # a JAX without it: `auto` takes XLA's paths, `pallas` is refused
  pltriton = None
if not hasattr(pltriton, "CompilerParams"):  # nor a module left behind without its API
  pltriton = None

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `jax.checkpoint` name of the outputs of sequential kernels that a remat policy may keep instead
# of running the kernel again in the backward pass (`model.remat=kernels`; the TTT kernels of
# layers/ttt_pallas_linear.py and ttt_pallas_mlp.py, and ttt_inner.scan_minibatches' groups)
KERNEL_OUTPUTS = "kernel_outputs"


def dtype(name: str):
  return DTYPES[name]


_BUILD_PLATFORM: list[str] = []  # innermost `building_for` last


def target_platform() -> str:
  """The backend ('cpu', 'gpu', 'tpu') whose kernels the layers choose: JAX's default backend,
  unless code runs inside `building_for` (lowering for another platform, e.g. CUDA on a CPU)."""
  return _BUILD_PLATFORM[-1] if _BUILD_PLATFORM else jax.default_backend()


def triton_missing(knob: str) -> str | None:
  """None where this JAX has Pallas' Triton backend (the package's GPU kernels), else why
  `knob`=pallas cannot run, in one line."""
  if pltriton is not None:
    return None
  return (f"{knob}=pallas: this JAX ({jax.__version__}) has no Pallas Triton backend "
          "(jax.experimental.pallas.triton), which the kernels are written for; use auto")


def triton(knob: str):
  """Pallas' Triton backend for a kernel that `knob`=pallas runs (ConfigError, in one line, where
  this JAX lacks it: also for code that calls a kernel directly)."""
  if pltriton is None:
    from ttt_jax.config import ConfigError  # noqa: PLC0415

    raise ConfigError(triton_missing(knob))
  return pltriton


def triton_dim(n: int) -> bool:
  """A Triton block dimension: a power of two, and >= 16 where it enters a matmul."""
  return n >= 16 and not n & (n - 1)


def padded_dim(d: int) -> int:
  """The width a head dim `d` runs at in this package's Triton kernels: `d` where Triton takes it
  as a block dimension (`triton_dim`), else the next such. The kernels treat the columns past
  `d` as zero padding (layers/ttt_pallas.py, layers/cache_attention.py)."""
  return d if triton_dim(d) else max(16, 1 << (d - 1).bit_length())


@contextlib.contextmanager
def building_for(platform: str) -> Iterator[None]:
  """Models built (and traced) inside choose their kernels for `platform` ('gpu', 'tpu', 'cpu')
  instead of the backend this process runs on: `jax.export(..., platforms=['cuda'])` on a CPU
  machine then lowers exactly the program a GPU run would compile."""
  _BUILD_PLATFORM.append(platform)
  try:
    yield
  finally:
    _BUILD_PLATFORM.pop()


def _logical(init, axes: tuple[str | None, ...]):
  """`init` tagged with logical axis names (see ttt_jax/sharding.py). The parameter is created
  unplaced (no mesh needed in scope, whatever flax's eager-sharding default); the train step's
  jit applies the shardings the names map to."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def normal_init(std: float, axes: tuple[str | None, ...]):
  """A N(0, std²) initializer tagged with logical axis names."""
  return _logical(nnx.initializers.normal(std), axes)


def const_init(value: float, axes: tuple[str | None, ...]):
  return _logical(nnx.initializers.constant(value), axes)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, std: float,
           compute_dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  """A bias-free (by default) projection whose kernel carries logical axis names."""
  return nnx.Linear(
      d_in, d_out, use_bias=use_bias, dtype=compute_dtype, param_dtype=param_dtype,
      kernel_init=normal_init(std, axes),
      bias_init=_logical(nnx.initializers.zeros_init(), (axes[1],)),
      rngs=rngs)
