"""The Triton kernel for queries against a full-attention KV cache (`model.cache_attention_impl`):
equal to a float64 softmax written out query by query, at the geometries that change its
structure (query rows over several blocks, grouped heads, one decode query, ragged capacities,
one split or many), in bfloat16 as on a GPU, lowered for CUDA at the 128K streaming shape; the
knob picks it and changes nothing but the path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.benchmarks import lowering
from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers import attention as A
from ttt_jax.layers import cache_attention as CA
from ttt_jax.layers import common
from ttt_jax.layers.attention_kernels import resolve_cache_impl
from ttt_jax.layers.common import building_for
from ttt_jax.models import build_model


def reference(q, k, v, q_pos, k_pos):
  """Causal softmax attention over the visible slots, one query and head at a time (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, tq, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for t in range(tq):
      seen = (k_pos >= 0) & (k_pos <= q_pos[t])
      for hi in range(h):
        s = k[bi, seen, hi // g] @ q[bi, t, hi] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, t, hi] = p @ v[bi, seen, hi // g] / p.sum()
  return out


def cache_inputs(rng, b, tq, h, hk, d, cap, before, dtype=jnp.float32):
  """Queries at positions before..before+tq-1, written into a cache filled left to right."""
  q = jnp.asarray(rng.standard_normal((b, tq, h, d)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, cap, hk, d)), dtype) for _ in range(2))
  end = before + tq
  k_pos = np.where(np.arange(cap) < end, np.arange(cap), -1).astype(np.int32)
  q_pos = np.arange(before, end, dtype=np.int32)
  return q, k, v, q_pos, k_pos, end


def rel_err(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


# (batch, queries, heads, kv heads, head dim, capacity, filled before the call)
GEOMETRIES = {
    "prefill-rows-over-two-blocks": (1, 40, 4, 2, 16, 256, 100),  # 80 rows: 2 query blocks
    "decode-mha": (2, 1, 4, 4, 32, 320, 250),  # 1 row padded to 16; 4 key blocks, 5 splits
    "gqa-4": (1, 6, 8, 2, 16, 128, 0),  # an empty cache: the chunk sees only itself
    "ragged-capacity": (1, 7, 4, 2, 16, 200, 190),  # 4th block read from 136, overlap masked
    "ragged-full": (1, 50, 2, 2, 16, 130, 80),  # every slot filled, 3 blocks of 64 over 130
    "head-dim-24": (1, 20, 4, 2, 24, 192, 100),  # read as 32 wide, the rest masked
    "head-dim-80": (1, 9, 4, 2, 80, 128, 60),  # the 3b presets': read as 128 wide
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES), ids=list(GEOMETRIES))
def test_kernel_equals_the_written_out_softmax(geometry):
  rng = np.random.default_rng(len(geometry))
  q, k, v, q_pos, k_pos, end = cache_inputs(rng, *GEOMETRIES[geometry])
  want = reference(q, k, v, q_pos, k_pos)
  kernel = jax.jit(lambda *a: CA.filled_attention_pallas(*a, interpret=True))
  got = kernel(q, k, v, q_pos, k_pos, end)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert rel_err(got, want) < 2e-6
  if k.shape[1] % CA.PALLAS_BLOCK_K:
    return  # a ragged capacity's last block is read from C - 64: every slot may be read
  # blocks past the filled slots are never read: NaN there changes nothing
  bad = [x.at[:, -(-end // CA.PALLAS_BLOCK_K) * CA.PALLAS_BLOCK_K:].set(jnp.nan) for x in (k, v)]
  np.testing.assert_array_equal(kernel(q, *bad, q_pos, k_pos, end), got)


def test_an_overflowing_call_reads_only_the_cache():
  """end > C (the stream overflowed; the layer raises KVCacheOverflow beside the call): the
  kernel reads the C slots and no block past them, so it equals the call with end = C."""
  rng = np.random.default_rng(11)
  q, k, v, q_pos, k_pos, _ = cache_inputs(rng, 1, 4, 2, 2, 16, 128, 124)
  full = CA.filled_attention_pallas(q, k, v, q_pos, k_pos, 128, interpret=True)
  over = CA.filled_attention_pallas(q, k, v, q_pos, k_pos, 200, interpret=True)
  np.testing.assert_array_equal(over, full)
  assert rel_err(full, reference(q, k, v, q_pos, k_pos)) < 2e-6


def test_one_split_equals_many(monkeypatch):
  """The splits' partial softmaxes merge exactly: one program per query block gives the same."""
  rng = np.random.default_rng(7)
  args = cache_inputs(rng, 1, 3, 4, 4, 16, 512, 400)
  many = CA.filled_attention_pallas(*args, interpret=True)  # 7 used key blocks over 8 splits
  monkeypatch.setattr(CA, "_TARGET_PROGRAMS", 1)
  one = CA.filled_attention_pallas(*args, interpret=True)
  assert rel_err(one, np.asarray(many, np.float64)) < 1e-6


def test_bfloat16_within_rounding_of_float64():
  rng = np.random.default_rng(3)
  q, k, v, q_pos, k_pos, end = cache_inputs(rng, 1, 24, 4, 2, 64, 384, 200, jnp.bfloat16)
  got = CA.filled_attention_pallas(q, k, v, q_pos, k_pos, end, interpret=True)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, reference(q, k, v, q_pos, k_pos)) < 2e-2


def test_geometry_it_cannot_take_is_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="the capacity 32 must be >= 64"):
    CA.filled_attention_pallas(*cache_inputs(rng, 1, 2, 2, 2, 16, 32, 0))


@pytest.mark.parametrize("head_dim", [64, 80])
def test_lowers_for_cuda_at_the_128k_streaming_shape(head_dim):
  """A 512-token prefill chunk of the gpu preset (8 heads of 64, bf16; of 80, the 3b presets'
  head dim, the kernel's blocks 128 wide) against a 128K cache: one Triton kernel, no cuDNN
  call, no [Tq, C] mask, and the cache read where it lies, not copied padded."""
  c, tq = 131072, 512
  spec = jax.ShapeDtypeStruct
  args = (spec((1, tq, 8, head_dim), jnp.bfloat16), spec((1, c, 8, head_dim), jnp.bfloat16),
          spec((1, c, 8, head_dim), jnp.bfloat16), spec((tq,), jnp.int32),
          spec((c,), jnp.int32), spec((), jnp.int32))
  exported = lowering.export_cuda(CA.filled_attention_pallas, *args)
  assert lowering.kernels_in(exported) == {"__gpu$xla.gpu.triton"}
  text = exported.mlir_module()
  assert "grid_x = 8" in text and "grid_y = 8" in text and "grid_z = 4" in text
  assert f"tensor<{tq}x{c}xi1>" not in text
  padded = common.padded_dim(head_dim)
  assert f"tensor<1x{c}x8x{padded}xbf16>" not in text or padded == head_dim
  assert f"tensor<8x4x{tq}x{padded}xf32>" in text  # the splits' sums, at the kernel's width


# -- the knob ------------------------------------------------------------------------------------


def tiny_transformer(impl: str):
  m = build_config("model=transformer,ctx=256").model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 2, 64, 4, 2  # head dim 16
  m.intermediate_size, m.init_std = 128, 0.3
  m.cache_attention_impl = impl
  return build_model(m, seed=5)


def test_knob_routes_cache_calls_through_the_kernel(monkeypatch):
  calls = []
  real = CA.filled_attention_pallas
  monkeypatch.setattr(A, "filled_attention_pallas",
                      lambda q, *a, **kw: calls.append(q.shape[1]) or real(q, *a, **kw))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 90)), jnp.int32)
  logits = {}
  for impl in ("pallas", "inherit"):
    calls.clear()
    model = tiny_transformer(impl)
    step = jax.jit(lambda t, p, c, model=model: model(t, p, c))
    cache, outs = model.init_cache(2, 100), []  # capacity 100: a ragged last block
    for lo, hi in ((0, 40), (40, 89), (89, 90)):  # two prefill chunks, then one decode step
      out, cache = step(tokens[:, lo:hi], jnp.arange(lo, hi, dtype=jnp.int32), cache)
      outs.append(out)
    logits[impl] = jnp.concatenate(outs, axis=1)
    assert sorted(set(calls)) == ([1, 40, 49] if impl == "pallas" else []), (impl, calls)
  one_shot, _ = tiny_transformer("inherit")(tokens, jnp.arange(90, dtype=jnp.int32))
  for impl, got in logits.items():
    assert rel_err(got, np.asarray(one_shot, np.float64)) < 1e-5, impl


def test_auto_resolves_per_platform_and_bad_values_name_the_key():
  assert resolve_cache_impl("auto", platform="cpu") == "inherit"
  assert resolve_cache_impl("auto", platform="gpu") == "pallas"
  assert resolve_cache_impl("inherit", platform="gpu") == "inherit"
  assert resolve_cache_impl("pallas", platform="cpu") == "pallas"  # interpreted
  with pytest.raises(ConfigError, match="model.cache_attention_impl='pallas'.*TPU"):
    resolve_cache_impl("pallas", platform="tpu")
  with building_for("gpu"):  # a model built for a GPU takes the kernel by default
    assert tiny_transformer("auto").blocks[0].mixer.algorithm.cache_impl == "pallas"
    # ... unless its layers keep window caches, where the knob is not used (nor checked)
    m = build_config("model=swa,ctx=256").model
    m.d_model, m.num_heads, m.cache_attention_impl = 96, 4, "pallas"  # head dim 24
    assert build_model(m, seed=0).blocks[0].mixer.algorithm.cache_impl == "inherit"
  assert tiny_transformer("auto").blocks[0].mixer.algorithm.cache_impl == "inherit"
  c = build_config("model=transformer")
  c.model.cache_attention_impl = "triton"
  with pytest.raises(ConfigError, match="model.cache_attention_impl"):
    validate(c)
