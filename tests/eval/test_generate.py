"""Generation: greedy decoding == step-by-step argmax of the full forward, prefill pieces,
sampling (top-k, seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import build_config
from ttt_jax.eval import generate as G
from ttt_jax.models import build_model


def tiny_model(kind: str):
  """(model config, graphdef, params): d_model 32, window 16, inner mini-batch 8; one layer
  (E2E: two, a prefix block and a suffix block). Streaming over several layers is covered by
  test_perplexity.py."""
  m = build_config(f"model={kind},ctx=64").model
  m.num_layers = 2 if kind == "e2e" else 1
  m.d_model, m.num_heads, m.intermediate_size = 32, 2, 64
  m.window, m.init_std = 16, 0.3
  m.ttt.mini_batch_size = 8
  m.e2e.mini_batch_size, m.e2e.suffix_len, m.e2e.prime_intermediate_size = 8, 1, 64
  m.e2e.ilr_init = m.e2e.inner_lr = 0.5
  graphdef, state = nnx.split(build_model(m, seed=2))
  return m, graphdef, state.to_pure_dict()


@pytest.mark.parametrize("kind", ["transformer", "swa", "ttt_linear", "e2e"])
def test_greedy_equals_argmax_of_full_forward(kind):
  """Prompt of 21 tokens (not a multiple of the mini-batch), 27 new tokens: every new token is
  the argmax of the one-shot forward over prompt + the tokens generated before it."""
  m, graphdef, params = tiny_model(kind)
  prompt = np.random.default_rng(0).integers(0, 259, (2, 21)).astype(np.int32)
  new = G.generate(graphdef, params, m, prompt, 27, chunk=7)  # attention: 3 x 7; TTT: 2 x 8 + 5
  assert new.shape == (2, 27)
  full = np.concatenate([prompt, new], axis=1)  # 48 tokens: inputs full[:, :-1]
  seq = full[:, :48]  # one-shot length a multiple of every mini-batch
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(params, jnp.asarray(seq))
  expect = np.asarray(jnp.argmax(logits, -1))[:, 20:47]
  np.testing.assert_array_equal(new, expect)


def test_prefill_pieces():
  assert G.prefill_pieces(21, 8, 1) == [8, 8, 5]
  assert G.prefill_pieces(21, 8, 8) == [8, 8, 1, 1, 1, 1, 1]
  assert G.prefill_pieces(40, 20, 16) == [16, 16, 1, 1, 1, 1, 1, 1, 1, 1]
  assert G.prefill_pieces(3, 512, 16) == [1, 1, 1]
  for n, c, a in [(21, 8, 1), (100, 24, 8), (5, 4, 4)]:
    assert sum(G.prefill_pieces(n, c, a)) == n


def test_sampling_top_k_and_seed():
  m, graphdef, params = tiny_model("swa")
  prompt = np.random.default_rng(1).integers(0, 256, (1, 10)).astype(np.int32)
  gen = G.Generator(graphdef, params, m, chunk=8)  # one compiled step for the five calls
  greedy = gen(prompt, 12)
  top1 = gen(prompt, 12, temperature=1.0, top_k=1, seed=5)
  np.testing.assert_array_equal(top1, greedy)
  a = gen(prompt, 12, temperature=1.5, top_k=20, seed=7)
  b = gen(prompt, 12, temperature=1.5, top_k=20, seed=7)
  c = gen(prompt, 12, temperature=1.5, top_k=20, seed=8)
  assert gen.step._cache_size() == 3  # prefill pieces of 8 and 2, decode steps of 1: no more
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # each sampled token is among the 20 most likely under the full forward
  full = np.concatenate([prompt, a], axis=1)
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(full[:, :-1]))[0])[0, 9:]
  ranks = (logits > logits[np.arange(12), a[0]][:, None]).sum(-1)
  assert (ranks < 20).all()


def test_sample_logits_distribution():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4000))
  keys = jax.random.key(0)
  toks = np.asarray(G.sample_logits(logits, keys, 1.0, 0))
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
  toks = np.asarray(G.sample_logits(logits, keys, 1.0, 2))
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, [0.0, 0.0, 3 / 7, 4 / 7], atol=0.03)
