"""Library attention backends (model.attention_impl) against the package's own attention: values
and gradients, one-shot (causal / sliding window) and against a KV cache; one-line errors where
a backend cannot run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config
from ttt_jax.layers.attention import Attention, AttentionAlgorithm
from ttt_jax.layers.attention_kernels import resolve_impl
from ttt_jax.models import build_model

B, T, D, H = 2, 256, 64, 2  # T: a multiple of the splash kernel's 128-row blocks


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make(window):
  return Attention(D, H, window=window, rope_theta=1e4, qk_norm=True, norm_eps=1e-6, std=0.3,
                   out_std=0.3, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(params=3))


def run(attn, algo, x):
  attn.algorithm = algo
  pos = jnp.arange(x.shape[1])
  y = attn(x, pos)[0]
  g = jax.grad(lambda x: jnp.sum(jnp.sin(attn(x, pos)[0])))(x)
  return y, g


@pytest.mark.parametrize("window", [None, 100])
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_one_shot_backends_match_dense(impl, window):
  """Values and input gradients (through RoPE, qk-norm and the projections)."""
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  attn = make(window)
  y_ref, g_ref = run(attn, AttentionAlgorithm("dense"), x)
  algo = AttentionAlgorithm(impl=impl, interpret=impl == "splash")
  y, g = run(attn, algo, x)
  assert rel_err(y, y_ref) < 1e-5 and rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_streaming_against_a_cache_matches_one_shot(impl, window):
  """Chunks against a KV window / full-attention cache (queries = the last keys; splash hands
  these to the package's own code) equal the one-shot dense output."""
  x = jax.random.normal(jax.random.key(1), (B, 96, D))
  attn = make(window)
  ref, _ = run(attn, AttentionAlgorithm("dense"), x)
  attn.algorithm = AttentionAlgorithm(impl=impl, interpret=impl == "splash")
  state, outs = attn.init_state(B, 96), []
  for lo in range(0, 96, 24):
    y, state = attn(x[:, lo:lo + 24], jnp.arange(lo, lo + 24), state)
    outs.append(y)
  assert rel_err(jnp.concatenate(outs, 1), ref) < 1e-5


def test_knob_selects_the_backend_in_the_model():
  c = build_config("model=swa,ctx=256")
  c.model.attention_impl = "xla"
  model = build_model(c.model)
  assert model.blocks[0].mixer.algorithm.impl == "xla"
  c.model.attention_impl = "auto"  # on CPU: the package's own code
  assert build_model(c.model).blocks[0].mixer.algorithm.impl == "blockwise"


@pytest.mark.parametrize("impl,dtype,platform,needle", [
    ("cudnn", "bfloat16", "cpu", "needs a GPU"),
    ("cudnn", "float32", "gpu", "compute_dtype='bfloat16'"),
    ("splash", "bfloat16", "gpu", "needs a TPU"),
])
def test_backend_that_cannot_run_fails_in_one_line(impl, dtype, platform, needle):
  with pytest.raises(ConfigError, match=needle) as e:
    resolve_impl(impl, jnp.dtype(dtype), platform)
  assert "model.attention_impl" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("platform,dtype,want", [
    ("gpu", "bfloat16", "cudnn"), ("gpu", "float32", "blockwise"), ("tpu", "float32", "splash"),
    ("cpu", "bfloat16", "blockwise")])
def test_auto_picks_the_platform_kernel(platform, dtype, want):
  assert resolve_impl("auto", jnp.dtype(dtype), platform) == want


def test_cudnn_on_cpu_fails_when_the_model_is_built():
  c = build_config("model=swa,ctx=256")
  c.model.attention_impl, c.model.compute_dtype = "cudnn", "bfloat16"
  with pytest.raises(ConfigError, match="model.attention_impl='cudnn' needs a GPU"):
    build_model(c.model)


def test_algorithm_is_static_and_hashable():
  a = AttentionAlgorithm(impl="xla")
  assert hash(a) == hash(dataclasses.replace(a))
