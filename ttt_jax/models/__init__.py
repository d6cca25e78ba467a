"""Model construction from a config."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax.models.config import ModelConfig, model_config
from ttt_jax.models.e2e import E2EModel
from ttt_jax.models.lm import LanguageModel


def build_model(model_cfg: ml_collections.ConfigDict | ModelConfig, seed: int = 0) -> nnx.Module:
  """The model named by `model.kind`; every model has `compute_loss(batch, step)`.

  `model_cfg` is the `config.model` section (made into a frozen `ModelConfig` here) or a
  `ModelConfig`. Parameters are created unplaced (layers/common.py), so no mesh is needed."""
  cfg = model_config(model_cfg)
  rngs = nnx.Rngs(params=seed)
  if cfg.kind == "e2e":
    return E2EModel(cfg, rngs=rngs)
  return LanguageModel(cfg, rngs=rngs)


@contextlib.contextmanager
def gpu_rng_kernels(enabled: bool = True) -> Iterator[None]:
  """Within the block, random draws lowered for a GPU call JAX's threefry kernel
  (`jax_threefry_gpu_kernel_lowering`) instead of inlining the hash's 20 rounds into XLA
  fusions: the same hash function (gpu-check's `env` task compares the bits on a GPU), and an
  initialisation program that XLA compiles several times faster (docs/gpu_census.md: 22-26 s
  -> 4-5 s for the gpu preset's transformer on an H200, 727 s -> 18 s for the 1b transformer
  over 8 H200s, both compiled without a GPU). The setting is read when a program is lowered, so
  only what is lowered (jitted calls, eager draws) inside the block changes; other platforms
  lower as before. `enabled=False`: the inlined hash within the block."""
  before = jax.config.jax_threefry_gpu_kernel_lowering
  jax.config.update("jax_threefry_gpu_kernel_lowering", enabled)
  try:
    yield
  finally:
    jax.config.update("jax_threefry_gpu_kernel_lowering", before)


def rng_kernel_same_bits(shape: tuple[int, ...] = (1031, 257)) -> bool:
  """Whether this backend's draws through `gpu_rng_kernels` are bit for bit those of the inlined
  hash (normal, truncated normal and raw bits of an odd shape; gpu-check's `env` task asks the
  GPU, where the two lowerings differ)."""
  def draws():
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    return (jax.random.normal(k1, shape), jax.random.truncated_normal(k2, -2.0, 2.0, shape),
            jax.random.bits(k3, shape))

  out = []
  for enabled in (False, True):
    with gpu_rng_kernels(enabled):
      out.append(jax.device_get(jax.jit(draws)()))
  return all(np.array_equal(a, b) for a, b in zip(*out, strict=True))


def abstract_model(model_cfg: ml_collections.ConfigDict | ModelConfig, seed: int = 0):
  """(graphdef, abstract nnx.State of parameters) without allocating any weights."""
  return nnx.split(nnx.eval_shape(lambda: build_model(model_cfg, seed)))


def count_params(abstract_params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params)))
