"""Faster decode, same answers: attention over a full-attention cache's filled slots only equals
the dense masked softmax (and a generation through it gives the dense path's tokens); bfloat16
weights for decode are bfloat16 and keep the float32 greedy tokens; 8-bit weights compute their
widened float model, for every kind; the trained-context warning."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.data.tokenizers import ByteTokenizer
from ttt_jax.eval import generate as G
from ttt_jax.layers import attention as A
from ttt_jax.layers import cpu_kernel
from ttt_jax.layers import int8 as Q
from ttt_jax.layers.cache_attention import filled_attention
from ttt_jax.layers.common import building_for
from ttt_jax.models import build_model

from ..tiers import core_and_extended


def tiny_transformer(algorithm: str = "auto"):
  """(model config, graphdef, params): full attention, GQA 4:2, key blocks of 16 slots."""
  m = build_config("model=transformer,ctx=64").model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = 2, 32, 4, 2
  m.intermediate_size, m.init_std = 64, 0.3
  m.attention_block, m.attention_algorithm = 16, algorithm
  graphdef, state = nnx.split(build_model(m, seed=3))
  return m, graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize("tq", [1, 5])
def test_filled_attention_equals_dense(tq):
  rng = np.random.default_rng(0)
  filled, cap = 37, 64  # 3 blocks of 16 hold keys, the 4th is empty
  q = jnp.asarray(rng.standard_normal((2, tq, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, cap, 2, 8)), jnp.float32) for _ in range(2))
  k_pos = jnp.where(jnp.arange(cap) < filled, jnp.arange(cap), -1)
  q_pos = jnp.arange(filled - tq, filled)
  want = A.dense_attention(q, k, v, q_pos, k_pos, None)
  got = filled_attention(q, k, v, q_pos, k_pos, filled, block=16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # the slots past `end` are never read: garbage there changes nothing
  k_bad = k.at[:, 48:].set(jnp.nan)
  np.testing.assert_array_equal(filled_attention(q, k_bad, v, q_pos, k_pos, filled, block=16),
                                got)


def test_generation_reads_filled_slots_with_the_dense_tokens(monkeypatch):
  calls = []  # the query length of each traced call (1: a decode step; 16: a prefill chunk)
  monkeypatch.setattr(A, "filled_attention",
                      lambda q, *a, **kw: calls.append(q.shape[1]) or filled_attention(q, *a,
                                                                                       **kw))
  prompt = np.random.default_rng(1).integers(0, 256, (2, 20)).astype(np.int32)
  outs = {}
  for algorithm in ("auto", "blocked", "dense"):  # blocked falls back to auto against the cache
    calls.clear()
    m, graphdef, params = tiny_transformer(algorithm)
    outs[algorithm] = G.Generator(graphdef, params, m, chunk=16, max_len=64)(prompt, 30)
    assert (1 in calls) == (algorithm != "dense"), (algorithm, calls)
  np.testing.assert_array_equal(outs["auto"], outs["dense"])
  np.testing.assert_array_equal(outs["blocked"], outs["dense"])


def test_bfloat16_decode_model_keeps_the_greedy_tokens():
  m, graphdef, params = tiny_transformer()
  cfg, graphdef16, params16 = G.decode_model(m, params, "bfloat16")
  dtypes = {x.dtype for x in jax.tree.leaves(params16)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)} and cfg.compute_dtype == "bfloat16"
  assert m.param_dtype == "float32"  # the run's config is left as it was
  prompt = np.random.default_rng(2).integers(0, 256, (1, 12)).astype(np.int32)
  want = G.Generator(graphdef, params, m, chunk=16, max_len=64)(prompt, 16)
  got = G.Generator(graphdef16, params16, cfg, chunk=16, max_len=64)(prompt, 16)
  np.testing.assert_array_equal(got, want)


def test_longer_than_the_trained_context_warns_in_one_line():
  m = build_config("model=transformer,ctx=64").model
  assert G.context_warning(m, 100, 128) is None  # trained context unknown (0)
  m.trained_context = 96
  line = G.context_warning(m, 100, 128)
  assert "trained at (96" in line and "\n" not in line
  assert G.context_warning(m, 96, 128) is None
  assert "--ctx = 200" in G.trained_context_warning(m, 200, "--ctx")


def test_a_generation_is_one_call_of_the_compiled_loop():
  """Prefill and every decode step run in one device program: no host round trip per token."""
  m, graphdef, params = tiny_transformer()
  gen = G.Generator(graphdef, params, m, chunk=16, max_len=64)
  calls, loop = [], gen.loop
  gen.loop = lambda *a: calls.append(1) or loop(*a)
  prompt = np.random.default_rng(3).integers(0, 256, (1, 9)).astype(np.int32)
  assert gen(prompt, 40).shape == (1, 40) and len(calls) == 1


class _Cast(Exception):
  """Raised by the stand-in decode_model: the cast was asked for (nothing is compiled)."""


@pytest.mark.parametrize("compute, asked, cast", [
    ("float32", "float32", False), ("bfloat16", "float32", True), ("float32", "bfloat16", True)])
def test_generate_text_dtype_means_weights_and_computation(monkeypatch, compute, asked, cast):
  """--dtype X: weights and computation in X. Float32 weights computing in bfloat16 asked for
  float32 are rebuilt to compute in float32 (the dtype was compared with the weights' alone)."""
  config = build_config("model=transformer,ctx=64")
  config.model.compute_dtype = compute
  run = types.SimpleNamespace(config=config, graphdef=None, params=None,
                              data=types.SimpleNamespace(tokenizer=ByteTokenizer()))

  def stand_in(cfg, params, dtype):
    raise _Cast(dtype)

  monkeypatch.setattr(G, "decode_model", stand_in)
  monkeypatch.setattr(G, "Generator", lambda *a, **kw: (_ for _ in ()).throw(AssertionError))
  with pytest.raises(_Cast if cast else AssertionError):
    G.generate_text(run, "hi", 4, dtype=asked, echo=lambda s: None)


def test_generate_text_refuses_a_dtype_for_a_given_generator():
  with pytest.raises(ValueError, match="a given generator keeps the dtype it was built with"):
    G.generate_text(None, "hi", 4, generator=object(), dtype="bfloat16")


def _widened(params: dict, params8: dict) -> dict:
  """The float parameters with every weight that decode_model(..., 'int8') stored 8-bit replaced
  by what its codes stand for: the float model that the 8-bit one computes."""
  out = dict(params)
  for key, sub in params8.items():
    if not isinstance(sub, dict):
      continue
    if set(sub) == {"q", "scale", "offset"}:  # a SwiGLU matrix or the head
      out[key] = Q.dequantize(sub["q"], sub["scale"], sub["offset"])
    elif "weight" in sub and "kernel" in params[key]:  # a projection
      out[key] = {**params[key], "kernel": Q.dequantize(**sub["weight"])}
    elif "table" in sub:  # the embedding: token rows
      out[key] = {"embedding": Q.dequantize(**sub["table"]).T}
    else:
      out[key] = _widened(params[key], sub)
  return out


def _int8_case(kind: str):
  kind, _, scan = kind.partition("-")  # e2e-scan: E2E with its prefix blocks stacked
  m = build_config(f"model={kind},ctx=64").model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.init_std = 2, 64, 4, 96, 0.3
  if scan:
    m.num_layers, m.scan_layers = 3, True
  if kind == "transformer":
    m.num_kv_heads, m.attention_block, m.tie_embeddings = 2, 16, True
  if kind == "e2e":
    m.e2e.mini_batch_size, m.e2e.ilr_init, m.e2e.prime_intermediate_size = 16, 1.0, 96
  if kind == "swa":
    m.scan_layers, m.tie_embeddings = True, False
  graphdef, state = nnx.split(build_model(m, seed=4))
  return m, graphdef, nnx.to_pure_dict(state)


@pytest.mark.parametrize("kind", core_and_extended(
    ("transformer", "swa", "ttt_linear", "e2e", "e2e-scan"), ("transformer", "e2e")))
def test_int8_decode_model_computes_its_widened_float_model(kind):
  """Every matrix stored 8-bit (layers/int8.py) but TTT-E2E's prime MLPs, which keep training
  while it decodes (their inner steps differentiate through the 8-bit layers); the greedy tokens
  and logits are those of the float model whose weights are the codes widened."""
  m, graphdef, params = _int8_case(kind)
  cfg, graphdef8, params8 = G.decode_model(m, params, "int8")
  assert cfg.compute_dtype == cfg.param_dtype == "float32"
  leaves = jax.tree_util.tree_flatten_with_path(params8)[0]
  coded = {jax.tree_util.keystr(p) for p, x in leaves if x.dtype == jnp.uint8}
  assert any("embed" in p for p in coded) and any("mlp" in p for p in coded)
  assert any("mixer" in p for p in coded)
  assert not any("prime" in p for p in coded)  # e2e: float, trained at test time
  floats = {jax.tree_util.keystr(p) for p, x in leaves if x.dtype == jnp.float32}
  assert kind.startswith("e2e") == any("prime" in p for p in floats)
  reference = _widened(params, params8)
  prompt = np.random.default_rng(7).integers(0, 256, (1, 21)).astype(np.int32)
  want = G.Generator(graphdef, reference, m, chunk=16, max_len=64)(prompt, 30)
  got = G.Generator(graphdef8, params8, cfg, chunk=16, max_len=64)(prompt, 30)
  np.testing.assert_array_equal(got, want)
  if kind in ("transformer", "swa"):  # one row through the kernel, teacher-forced
    seq = jnp.asarray(np.concatenate([prompt, want], 1))
    logits = {}
    for name, (g, p) in {"int8": (graphdef8, params8), "float": (graphdef, reference)}.items():
      model = nnx.merge(g, p)
      logits[name] = np.asarray(model.forward(seq[:, :1])[0])[..., :m.vocab_size]
    err = np.abs(logits["int8"] - logits["float"]).max() / np.abs(logits["float"]).max()
    assert err < 1e-5, err


def test_int8_decode_steps_lower_for_cuda_without_the_cpu_kernel():
  """On GPU the 8-bit weights are widened by XLA (decode_model warns: slower than float32);
  the CPU program calls the kernel (where a C++ compiler built it)."""
  m, _, params = _int8_case("transformer")
  with building_for("gpu"), pytest.warns(RuntimeWarning, match="int8 decode weights on gpu"):
    G.decode_model(m, params, "int8")
  cfg, graphdef8, params8 = G.decode_model(m, params, "int8")

  def step(params, tokens):
    return nnx.merge(graphdef8, params).forward(tokens)[0]

  tokens = jnp.zeros((1, 1), jnp.int32)
  with building_for("gpu"):
    exported = jax.export.export(jax.jit(step), platforms=["cuda"])(params8, tokens)
  text = exported.mlir_module()
  assert "ttt_jax_int8_matmul" not in text and "ui8" in text
  cpu = jax.jit(lambda p, t: step(p, t)).lower(params8, tokens).as_text()
  assert ("ttt_jax_int8_matmul" in cpu) == (cpu_kernel.int8_matmul_target() is not None)


@pytest.mark.parametrize("kind", ["transformer", "swa"])  # swa: stacked blocks (scan_layers)
def test_int8_decode_model_stores_16_level_weights_in_4_bits_exactly(kind):
  """A model whose matrices hold 16 evenly spaced levels per group of 32 (as a GGUF Q4_1 import
  does) is stored in 4 bits and generates exactly what its float weights generate."""
  from tests.layers.test_int8 import q4_levels

  m, graphdef, params = _int8_case(kind)

  def snap(path, x):
    names = [getattr(k, "key", k) for k in path]
    if names[-1] == "embedding":
      return q4_levels(np.asarray(x).T).T
    return q4_levels(np.asarray(x)) if x.ndim >= 2 and x.shape[-2] % 32 == 0 else x

  snapped = jax.tree_util.tree_map_with_path(snap, params)
  cfg, graphdef8, params8 = G.decode_model(m, snapped, "int8")
  scales = {jax.tree_util.keystr(p)[:-len("['scale']")]: x.ndim for p, x in
            jax.tree_util.tree_leaves_with_path(params8) if jax.tree_util.keystr(p).endswith(
                "['scale']")}
  four = [p for p, x in jax.tree_util.tree_leaves_with_path(params8) if x.dtype == jnp.uint8
          and x.ndim == scales[jax.tree_util.keystr(p)[:-len("['q']")]] + 1]
  # every projection and MLP matrix of every block (one stacked array each with scan_layers),
  # the embedding table and, untied, the head
  per_block = 7 * (1 if m.scan_layers else m.num_layers)
  assert len(four) == per_block + 1 + (0 if m.tie_embeddings else 1), four
  prompt = np.random.default_rng(8).integers(0, 256, (1, 21)).astype(np.int32)
  want = G.Generator(graphdef, snapped, m, chunk=16, max_len=64)(prompt, 30)
  got = G.Generator(graphdef8, params8, cfg, chunk=16, max_len=64)(prompt, 30)
  np.testing.assert_array_equal(got, want)
