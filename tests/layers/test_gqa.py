"""Grouped-query attention (`num_kv_heads` < `num_heads`) equals multi-head attention whose key
and value heads are repeated: every algorithm and backend, one-shot and streamed, and the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers.attention import Attention, AttentionAlgorithm
from ttt_jax.models import build_model

B, T, D, H, HKV = 2, 128, 64, 4, 2
D_HEAD = D // H

ALGORITHMS = [AttentionAlgorithm("dense"), AttentionAlgorithm("blocked", block=32),
              AttentionAlgorithm("blockwise", flash_block=32), AttentionAlgorithm("auto"),
              AttentionAlgorithm(impl="xla"), AttentionAlgorithm(impl="splash", interpret=True)]
ALGO_IDS = ["dense", "blocked", "blockwise", "auto", "xla", "splash"]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make(num_kv_heads, window, seed=0):
  return Attention(D, H, window=window, rope_theta=1e4, qk_norm=True, norm_eps=1e-6, std=0.3,
                   out_std=0.3, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(params=seed), num_kv_heads=num_kv_heads)


def repeated_kv(gqa: Attention, window) -> Attention:
  """The multi-head layer with GQA's weights, each key/value head repeated H/Hkv times."""
  mha = make(H, window)
  for name in ("wq", "wo"):
    getattr(mha, name).kernel[...] = getattr(gqa, name).kernel[...]
  for name in ("wk", "wv"):
    w = getattr(gqa, name).kernel[...].reshape(D, HKV, 1, D_HEAD)
    getattr(mha, name).kernel[...] = jnp.broadcast_to(w, (D, HKV, H // HKV, D_HEAD)).reshape(D, D)
  mha.q_norm.scale[...] = gqa.q_norm.scale[...]
  mha.k_norm.scale[...] = gqa.k_norm.scale[...]
  return mha


def outputs(attn: Attention, algo, x, chunk=32):
  attn.algorithm = algo
  pos = jnp.arange(x.shape[1])
  graphdef, state = nnx.split(attn)  # jitted: several traces share a cached splash kernel, as
  # a train and an eval step do (a kernel built inside one trace leaked its tracers)
  call = jax.jit(lambda x, p, st=None: nnx.merge(graphdef, state)(x, p, st))
  y, _ = call(x, pos)
  g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x, pos)[0]))))(x)
  st, outs = attn.init_state(B, x.shape[1]), []
  for lo in range(0, x.shape[1], chunk):
    yc, st = call(x[:, lo:lo + chunk], pos[lo:lo + chunk], st)
    outs.append(yc)
  return y, g, jnp.concatenate(outs, axis=1), st


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(2), (B, T, D))


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("algo", ALGORITHMS, ids=ALGO_IDS)
def test_gqa_equals_repeated_kv_heads(x, algo, window):
  gqa = make(HKV, window)
  assert gqa.wk.kernel.shape == (D, HKV * D_HEAD)
  y_ref, g_ref, s_ref, _ = outputs(repeated_kv(gqa, window), AttentionAlgorithm("dense"), x)
  y, g, s, st = outputs(gqa, algo, x)
  assert st.k.shape[2] == HKV and st.v.shape[2] == HKV  # the cache holds the KV heads only
  assert rel_err(y, y_ref) < 1e-5 and rel_err(g, g_ref) < 1e-5 and rel_err(s, y_ref) < 1e-5
  assert rel_err(s_ref, y_ref) < 1e-5


def test_multi_query_attention(x):
  mqa = make(1, None)
  mha = make(H, None)
  for name in ("wq", "wo"):
    getattr(mha, name).kernel[...] = getattr(mqa, name).kernel[...]
  for name in ("wk", "wv"):
    getattr(mha, name).kernel[...] = jnp.tile(getattr(mqa, name).kernel[...], (1, H))
  mha.q_norm.scale[...], mha.k_norm.scale[...] = mqa.q_norm.scale[...], mqa.k_norm.scale[...]
  assert rel_err(mqa(x, jnp.arange(T))[0], mha(x, jnp.arange(T))[0]) < 1e-5


def test_model_knob_and_validation():
  c = build_config("model=transformer")
  c.model.num_layers, c.model.num_kv_heads = 1, 2
  model = build_model(validate(c).model, seed=0)
  assert model.blocks[0].mixer.wk.kernel.shape == (128, 64)
  tokens = jnp.zeros((1, 16), jnp.int32)
  cache = model.init_cache(1, 16)
  assert cache[0].k.shape == (1, 16, 2, 32)
  full, _ = model(tokens)
  step, _ = model(tokens[:, :8], jnp.arange(8), cache)
  assert rel_err(step, full[:, :8]) < 1e-5
  c.model.num_kv_heads = 3
  with pytest.raises(ConfigError, match="model.num_kv_heads=3 must divide model.num_heads=4"):
    validate(c)
