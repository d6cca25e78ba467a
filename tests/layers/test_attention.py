"""Attention against a NumPy reference; SWA band; chunked streaming; causality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import attention as A
from ttt_jax.layers.attention import Attention
from ttt_jax.layers.rope import apply_rope

B, T, D, H = 2, 48, 32, 4


def make(window=None, qk_norm=False, seed=0):
  return Attention(D, H, window=window, rope_theta=1e4, qk_norm=qk_norm, norm_eps=1e-6, std=0.3,
                   out_std=0.3, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                   rngs=nnx.Rngs(params=seed))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def reference(attn: Attention, x, mask):
  """Naive attention in NumPy: explicit projections, RoPE, masked softmax, output projection."""
  x = np.asarray(x, np.float64)
  d = D // H
  q = (x @ np.asarray(attn.wq.kernel[...])).reshape(B, T, H, d)
  k = (x @ np.asarray(attn.wk.kernel[...])).reshape(B, T, H, d)
  v = (x @ np.asarray(attn.wv.kernel[...])).reshape(B, T, H, d)
  pos = jnp.arange(T)
  q = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), pos, 1e4), np.float64)
  k = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), pos, 1e4), np.float64)
  out = np.zeros((B, T, H, d))
  for b in range(B):
    for h in range(H):
      s = q[b, :, h] @ k[b, :, h].T / np.sqrt(d)
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[b, :, h] = p @ v[b, :, h]
  return out.reshape(B, T, D) @ np.asarray(attn.wo.kernel[...])


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (B, T, D))


def test_full_attention_matches_naive_reference(x):
  attn = make()
  y, _ = attn(x, jnp.arange(T))
  causal = np.tril(np.ones((T, T), bool))
  assert rel_err(y, reference(attn, x, causal)) < 1e-5


@pytest.mark.parametrize("window", [1, 7, 16])
def test_swa_equals_band_masked_attention(x, window):
  attn = make(window=window)
  y, _ = attn(x, jnp.arange(T))
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  band = (j <= i) & (i - j < window)
  assert rel_err(y, reference(attn, x, band)) < 1e-5


@pytest.mark.parametrize("window,chunk", [(16, 8), (16, 16), (12, 24), (5, 1)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_chunked_swa_with_carried_kv_equals_one_shot(x, window, chunk, qk_norm):
  attn = make(window=window, qk_norm=qk_norm)
  full, _ = attn(x, jnp.arange(T))
  state = attn.init_state(B)
  outs = []
  for s in range(0, T, chunk):
    y, state = attn(x[:, s:s + chunk], jnp.arange(s, s + chunk), state)
    outs.append(y)
  assert state.k.shape[1] == window  # memory is the window, not the sequence
  assert rel_err(jnp.concatenate(outs, 1), full) < 1e-5


def test_full_attention_streams_with_a_capacity_cache(x):
  attn = make(qk_norm=True)
  full, _ = attn(x, jnp.arange(T))
  state = attn.init_state(B, capacity=T)
  outs = []
  for s in range(0, T, 12):
    y, state = attn(x[:, s:s + 12], jnp.arange(s, s + 12), state)
    outs.append(y)
  assert rel_err(jnp.concatenate(outs, 1), full) < 1e-5
  with pytest.raises(ValueError, match="capacity"):
    attn.init_state(B)


@pytest.mark.parametrize("window", [None, 8])
def test_causality(x, window):
  attn = make(window=window)
  t = 20
  y1, _ = attn(x, jnp.arange(T))
  x2 = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), (B, T - t - 1, D)))
  y2, _ = attn(x2, jnp.arange(T))
  np.testing.assert_array_equal(np.asarray(y1[:, :t + 1]), np.asarray(y2[:, :t + 1]))
  assert not np.allclose(y1[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("window,cache", [(None, 0), (70, 0), (None, 50), (45, 50)])
def test_causal_blocked_attention_equals_dense(window, cache):
  """Query blocks against only their visible key range == the dense masked softmax (values and
  gradients), one-shot and after a cache with empty (-1) slots."""
  keys = jax.random.split(jax.random.key(7), 3)
  b, tq, h, d = 2, 200, 3, 8
  q = jax.random.normal(keys[0], (b, tq, h, d))
  k = jax.random.normal(keys[1], (b, cache + tq, h, d))
  v = jax.random.normal(keys[2], (b, cache + tq, h, d))
  filled = cache // 2  # the first half of the cache is empty
  k_pos = jnp.concatenate([jnp.full((cache - filled,), -1), jnp.arange(filled + tq)])
  q_pos = jnp.arange(filled, filled + tq)
  dense = jax.jit(lambda q, k, v: A.dense_attention(q, k, v, q_pos, k_pos, window))
  blocked = jax.jit(lambda q, k, v: A.causal_blocked_attention(
      q, k, v, q_pos, k_pos, window, q_block=48))
  assert rel_err(blocked(q, k, v), dense(q, k, v)) < 1e-6
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
  g_ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
  g_blk = jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
  for a, r in zip(g_blk, g_ref, strict=True):
    assert rel_err(a, r) < 1e-6


def test_attention_layer_uses_blocked_path_for_long_inputs(monkeypatch):
  """The layer's output is unchanged when one-shot inputs go through the blocked path."""
  attn = make(window=20, qk_norm=True)
  x = jax.random.normal(jax.random.key(2), (B, T, D))
  pos = jnp.arange(T)
  ref, _ = attn(x, pos)
  calls = []
  real = A.causal_blocked_attention
  attn.algorithm = A.AttentionAlgorithm(block=16)
  monkeypatch.setattr(A, "causal_blocked_attention",
                      lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  got, _ = attn(x, pos)
  assert calls == [{"q_block": 16}]
  assert rel_err(got, ref) < 1e-6


def _gapped_inputs(window):
  """Queries = the last 24 keys; the 40 cached keys have empty (-1) slots in the middle."""
  keys = jax.random.split(jax.random.key(11), 3)
  tq, cache, h, d = 24, 40, 2, 8
  q = jax.random.normal(keys[0], (B, tq, h, d))
  k = jax.random.normal(keys[1], (B, cache + tq, h, d))
  v = jax.random.normal(keys[2], (B, cache + tq, h, d))
  cached = jnp.arange(cache)
  k_pos = jnp.concatenate([jnp.where((cached >= 10) & (cached < 22), -1, cached),
                           jnp.arange(cache, cache + tq)])
  return q, k, v, jnp.arange(cache, cache + tq), k_pos


def _naive(q, k, v, q_pos, k_pos, window):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  qp, kp = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
  mask = (kp >= 0) & (kp <= qp) & (True if window is None else (qp - kp) < window)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window", [None, 30])
def test_caches_with_empty_slots_in_the_middle(window):
  """Dense and online-softmax attention are exact for any slot layout; the blocked path, whose
  static key ranges assume one contiguous run of keys, refuses (NaN) instead of being wrong."""
  q, k, v, q_pos, k_pos = _gapped_inputs(window)
  ref = _naive(q, k, v, q_pos, k_pos, window)
  assert not bool(A.ordered_layout(q_pos, k_pos))
  for algo in (A.AttentionAlgorithm("dense"), A.AttentionAlgorithm("blockwise", flash_block=8),
               A.AttentionAlgorithm("auto", block=8)):  # auto: not ordered -> dense
    got = A.dot_product_attention(q, k, v, q_pos, k_pos, window, algorithm=algo)
    assert rel_err(got, ref) < 1e-5, algo
  blocked = A.causal_blocked_attention(q, k, v, q_pos, k_pos, window, q_block=8)
  assert np.isnan(np.asarray(blocked)).all()
  # the same keys without the gap (the layout windows keep) pass the check and are exact
  filled = jnp.concatenate([jnp.arange(40), q_pos])
  assert bool(A.ordered_layout(q_pos, filled))
  got = A.causal_blocked_attention(q, k, v, q_pos, filled, window, q_block=8)
  assert rel_err(got, _naive(q, k, v, q_pos, filled, window)) < 1e-5


@pytest.mark.parametrize("window", [None, 20])
def test_every_algorithm_gives_the_same_layer_output_and_gradient(x, window):
  """model.attention_algorithm changes how, not what: values and input gradients agree, one-shot
  and streamed against a cache, with blocks small enough that several are used."""
  attn = make(window=window, qk_norm=True)
  pos = jnp.arange(T)

  def run(algo):
    attn.algorithm = algo
    graphdef, state = nnx.split(attn)
    call = lambda x, p, st=None: nnx.merge(graphdef, state)(x, p, st)  # noqa: E731
    y, _ = jax.jit(call)(x, pos)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(call(x, pos)[0]))))(x)
    st, chunk, outs = attn.init_state(B, T), jax.jit(call), []
    for lo in range(0, T, 12):
      yc, st = chunk(x[:, lo:lo + 12], pos[lo:lo + 12], st)
      outs.append(yc)
    return y, g, jnp.concatenate(outs, axis=1)

  y_ref, g_ref, s_ref = run(A.AttentionAlgorithm("dense"))
  assert rel_err(s_ref, y_ref) < 1e-5
  for algo in (A.AttentionAlgorithm("blocked", block=8),
               A.AttentionAlgorithm("blockwise", flash_block=8)):
    y, g, s = run(algo)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(g, g_ref) < 1e-5 and rel_err(s, y_ref) < 1e-5


def test_full_attention_cache_overflow_is_an_error(x):
  """Streaming more positions than a full-attention cache holds fails and names the capacity
  (before, the write was clamped and overwrote the newest keys silently)."""
  attn = make(window=None)
  step = jax.jit(lambda x, p, st: attn(x, p, st))
  st = attn.init_state(B, 40)
  _, st = step(x[:, :24], jnp.arange(24), st)
  with pytest.raises(Exception, match="capacity 40"):
    y, _ = step(x[:, 24:], jnp.arange(24, T), st)
    jax.block_until_ready(y)
