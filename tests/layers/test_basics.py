"""RoPE, RMSNorm and SwiGLU against NumPy references on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.layers.mlp import SwiGLU
from ttt_jax.layers.norms import RMSNorm
from ttt_jax.layers.rope import apply_rope


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_rope_matches_complex_rotation():
  T, H, d, theta = 11, 3, 8, 500.0
  x = np.random.default_rng(0).standard_normal((2, T, H, d))
  pos = np.random.default_rng(1).integers(0, 1000, T)
  out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), theta))
  # Reference: pair feature i with i + d/2 as a complex number, rotate by pos * theta^(-2i/d).
  z = x[..., : d // 2] + 1j * x[..., d // 2:]
  freq = theta ** (-np.arange(0, d, 2) / d)
  z = z * np.exp(1j * pos[:, None, None] * freq)[None]
  ref = np.concatenate([z.real, z.imag], -1)
  assert rel_err(out, ref) < 1e-5


def test_rope_is_relative():
  """<rope(q, m), rope(k, n)> depends only on m - n."""
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
  dot = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([m]), 1e4) *  # noqa: E731
                                   apply_rope(k, jnp.array([n]), 1e4)))
  assert abs(dot(7, 3) - dot(104, 100)) < 1e-4


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32) * 3
  norm = RMSNorm(16, eps=1e-6)
  norm.scale[...] = jnp.asarray(np.random.default_rng(1).standard_normal(16), jnp.float32)
  ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
  ref = ref * np.asarray(norm.scale[...])
  assert rel_err(norm(jnp.asarray(x)), ref) < 1e-6


def test_swiglu_matches_numpy():
  mlp = SwiGLU(16, 40, std=0.3, out_std=0.3, compute_dtype=jnp.float32,
               param_dtype=jnp.float32, rngs=nnx.Rngs(params=0))
  x = np.random.default_rng(0).standard_normal((4, 7, 16))
  w1, w2, w3 = (np.asarray(w[...], np.float64) for w in (mlp.w1, mlp.w2, mlp.w3))
  a = x @ w1
  ref = (a / (1 + np.exp(-a)) * (x @ w3)) @ w2
  assert rel_err(mlp(jnp.asarray(x, jnp.float32)), ref) < 1e-5
