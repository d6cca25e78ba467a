"""Streaming evaluation vs one-shot forward, perplexity vs a naive NumPy computation, position
buckets, document selection, bad input, blockwise attention vs dense, 128K constant memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config
from ttt_jax.data.pipeline import TokenStream
from ttt_jax.eval import perplexity as P
from ttt_jax.eval.generate import Generator
from ttt_jax.layers import attention as A
from ttt_jax.models import build_model

KINDS = ["transformer", "swa", "ttt_linear", "ttt_mlp", "e2e"]
TOKENS = np.random.default_rng(1).integers(0, 259, (2, 65)).astype(np.int32)


def tiny_config(kind: str):
  """d_model 32, 2 layers, window 16, inner mini-batches of 8 (TTT) / 16 (E2E)."""
  c = build_config(f"model={kind},ctx=64")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 2, 32, 2, 64
  m.window, m.init_std = 16, 0.2
  m.ttt.mini_batch_size = 8
  m.e2e.mini_batch_size, m.e2e.suffix_len, m.e2e.prime_intermediate_size = 16, 1, 64
  m.e2e.ilr_init = m.e2e.inner_lr = 0.5  # a visible inner step at eval time
  return c


def tiny_graph(c):
  graphdef, state = nnx.split(build_model(c.model, seed=1))
  return graphdef, nnx.to_pure_dict(state)


def tiny_model(kind: str):
  """(config, graphdef, params) of a random-weight tiny model."""
  c = tiny_config(kind)
  return (c, *tiny_graph(c))


@pytest.fixture(scope="module", params=KINDS)
def model(request):
  return (request.param, *tiny_model(request.param))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_streaming_equals_one_shot(model):
  kind, c, graphdef, params = model
  tokens = np.random.default_rng(0).integers(0, 259, (2, 65)).astype(np.int32)
  ref = P.one_shot_nll(graphdef, params, tokens)
  got = P.stream_nll(graphdef, params, tokens, chunk=16)
  assert got.shape == (2, 64)
  assert rel_err(got, ref) < 1e-5, kind


def test_cache_initializer_compiles_once_per_shape():
  c, graphdef, params = tiny_model("swa")
  init_fn, step_fn = P.make_init_cache(graphdef), P.make_chunk_step(graphdef)
  for rows in (TOKENS, TOKENS[::-1], TOKENS[:1]):
    P.stream_nll(graphdef, params, rows, 16, step_fn=step_fn, init_fn=init_fn)
  assert init_fn._cache_size() == 2  # batch 2 (twice), batch 1
  gen = Generator(graphdef, params, c.model, chunk=16)
  for _ in range(2):
    gen(TOKENS[:, :20], 3)
  assert gen.init_fn._cache_size() == 1


def naive_ppl(graphdef, params, rows: np.ndarray):
  """exp(mean NLL) from one forward pass per row, log-softmax in float64 NumPy."""
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  nlls = []
  for row in rows:
    logits = np.asarray(forward(params, jnp.asarray(row[None, :-1]))[0], np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nlls.append(logz - logits[np.arange(len(row) - 1), row[1:]])
  nll = np.stack(nlls)
  return float(np.exp(nll.mean())), nll


def fake_stream(lengths, seed=0) -> TokenStream:
  """Documents [BOS] random bytes [EOS] of the given total lengths."""
  rng = np.random.default_rng(seed)
  docs = [np.concatenate([[256], rng.integers(0, 256, n - 2), [257]]) for n in lengths]
  starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
  return TokenStream(np.concatenate(docs).astype(np.int32), starts.astype(np.int64),
                     tuple(f"doc{i}" for i in range(len(docs))))


def test_perplexity_per_context_matches_naive(monkeypatch):
  """Per-length perplexity and position buckets as a naive full forward computes them; the
  documents stream `batch_size` at a time (3 documents, batch_size 2: batches of 2 and 1)."""
  rows, real = [], P.stream_nll
  monkeypatch.setattr(P, "stream_nll", lambda g, p, tokens, *a, **k: (
      rows.append(tokens.shape[0]), real(g, p, tokens, *a, **k))[1])
  c, graphdef, params = tiny_model("swa")
  stream = fake_stream([40, 80, 65, 200, 64, 70])  # docs with >= 65 tokens: 1, 2, 3, 5
  docs = P.select_documents(stream, max_ctx=64, max_docs=3)
  assert docs.names == ("doc1", "doc2", "doc3")
  assert (docs.tokens[:, 0] == 256).all() and docs.tokens.shape == (3, 65)
  np.testing.assert_array_equal(docs.tokens[1], stream.tokens[120:185])
  res = P.evaluate_model(graphdef, params, c.model, docs, [16, 32, 64], chunk=16, batch_size=2,
                         first_bucket=8, progress=False, echo=None)
  assert rows == [2, 1] * 3
  for ctx_res, L in zip(res["contexts"], [16, 32, 64], strict=True):
    ppl, _ = naive_ppl(graphdef, params, docs.tokens[:, :L + 1])
    assert ctx_res["ctx"] == L and ctx_res["tokens"] == 3 * L
    assert abs(ctx_res["ppl"] - ppl) / ppl < 1e-5
  _, nll = naive_ppl(graphdef, params, docs.tokens)
  buckets = res["position_buckets"]["buckets"]
  assert [(b["start"], b["end"]) for b in buckets] == [(0, 8), (8, 16), (16, 32), (32, 64)]
  for b in buckets:
    assert abs(b["mean_nll"] - nll[:, b["start"]:b["end"]].mean()) < 1e-5


def test_bad_input_is_one_clear_line():
  c, graphdef, params = tiny_model("swa")
  stream = fake_stream([40, 80])
  with pytest.raises(ConfigError, match="larger than the data allows.*ctx <= 79"):
    P.select_documents(stream, max_ctx=100, max_docs=4)
  with pytest.raises(ConfigError, match="not a multiple of the chunk size eval.chunk=16"):
    P.chunk_for(40, 16)
  assert P.chunk_for(8, 16) == 8  # shorter contexts are one chunk
  ttt = tiny_config("ttt_linear").model
  with pytest.raises(ConfigError, match="multiple of the model's inner mini-batch size 8"):
    P.chunk_for(36, 12, P.stream_alignment(ttt))
  with pytest.raises(ConfigError, match="ctx="):
    P.parse_ctx_list("1k,abc")
  assert P.parse_ctx_list("2k,512,1K") == [512, 1024, 2048]


def dense_reference(q, k, v, q_pos, k_pos, window):
  """Masked softmax attention in float64 NumPy, one (batch, head) at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qp, kp = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
  mask = (kp <= qp) & (kp >= 0) & ((qp - kp) < window if window else True)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask, s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("window", [None, 37])
def test_blockwise_attention_equals_dense(window):
  keys = jax.random.split(jax.random.key(3), 4)
  b, tq, cache, h, d = 2, 100, 150, 3, 8
  q = jax.random.normal(keys[0], (b, tq, h, d))
  k = jax.random.normal(keys[1], (b, cache + tq, h, d))
  v = jax.random.normal(keys[2], (b, cache + tq, h, d))
  # a streamed step: 60 empty slots, 90 cached keys at positions 0..89, then the new chunk
  k_pos = jnp.concatenate([jnp.full((60,), -1), jnp.arange(90 + tq)]).astype(jnp.int32)
  q_pos = jnp.arange(90, 90 + tq, dtype=jnp.int32)
  ref = dense_reference(q, k, v, q_pos, k_pos, window)
  got = A.blockwise_attention(q, k, v, q_pos, k_pos, window, q_block=32, k_block=48)
  assert rel_err(got, ref) < 1e-5
  assert rel_err(A.dense_attention(q, k, v, q_pos, k_pos, window), ref) < 1e-5
  if window is None:
    return  # gradients once (compiling them is the slow part)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # noqa: E731
  blk = lambda q, k, v: A.blockwise_attention(q, k, v, q_pos, k_pos, window, q_block=32,  # noqa: E731
                                              k_block=48)
  dense = lambda q, k, v: A.dense_attention(q, k, v, q_pos, k_pos, window)  # noqa: E731
  g_blk = jax.grad(loss(blk), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g_blk, g_ref, strict=True):
    assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize("algorithm", ["blockwise", "blocked", "dense"])
def test_full_attention_streams_with_every_algorithm(algorithm):
  """Forcing an attention algorithm (small blocks, so several are used) leaves NLL unchanged,
  one-shot and streamed against the KV cache."""
  c = tiny_config("transformer")
  ref = P.one_shot_nll(*tiny_graph(c), TOKENS)
  c.model.attention_algorithm = algorithm
  c.model.attention_block, c.model.attention_flash_block = 16, 8
  graphdef, params = tiny_graph(c)
  assert rel_err(P.one_shot_nll(graphdef, params, TOKENS), ref) < 1e-5
  assert rel_err(P.stream_nll(graphdef, params, TOKENS, chunk=16), ref) < 1e-5


def test_validation_metrics_adds_perplexity():
  batches = [{"x": 1.0}, {"x": 3.0}]
  out = P.validation_metrics(lambda b: {"loss": b["x"], "acc": 2 * b["x"]}, batches)
  assert out == pytest.approx({"loss": 2.0, "acc": 4.0, "ppl": float(np.exp(2.0))})


LONG_WORKER = r"""
import json, sys, time
import numpy as np
from flax import nnx
from ttt_jax.config import build_config
from ttt_jax.eval import perplexity as P
from ttt_jax.models import build_model

kind, length, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = build_config(f"model={kind},ctx={chunk}")
m = c.model
m.num_layers, m.d_model, m.num_heads, m.intermediate_size, m.window = 1, 32, 2, 64, 256
m.ttt.mini_batch_size = 16
graphdef, state = nnx.split(build_model(m, seed=0))
params = nnx.to_pure_dict(state)
tokens = np.random.default_rng(0).integers(0, 256, (1, length + 1)).astype(np.int32)
# peak RSS of this process image: VmHWM (ru_maxrss would keep the parent's peak across exec)
def rss():
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
step = P.make_chunk_step(graphdef)
P.stream_nll(graphdef, params, tokens[:, :4 * chunk + 1], chunk, step_fn=step)  # compile, warm
t0, rss_warm = time.perf_counter(), rss()
nll = P.stream_nll(graphdef, params, tokens, chunk, step_fn=step)
print(json.dumps({"kind": kind, "tokens": int(nll.size), "mean_nll": float(nll.mean()),
                  "finite": bool(np.isfinite(nll).all()), "rss_warm": rss_warm,
                  "rss_peak": rss(), "seconds": time.perf_counter() - t0}))
"""


@pytest.mark.parametrize("kind", ["swa", "ttt_linear"])
def test_128k_streaming_memory_is_constant(kind, tmp_path):
  """128K tokens through a tiny model in 2K chunks, in a fresh process: peak RSS stays far below
  one 128K x 128K fp32 score matrix (64 GiB) and barely grows after the first 8K tokens."""
  length, chunk = 128 * 1024, 2048
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", LONG_WORKER, kind, str(length), str(chunk)],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"{kind}: 128K tokens in {out['seconds']:.1f}s (process {time.perf_counter() - t0:.1f}s), "
        f"peak RSS {out['rss_peak'] / 2**20:.0f} MiB (after warm-up {out['rss_warm'] / 2**20:.0f})")
  assert out["tokens"] == length and out["finite"]
  assert out["rss_peak"] < 2 * 2**30  # vs 64 GiB for one L x L fp32 matrix
  assert out["rss_peak"] - out["rss_warm"] < 200 * 2**20


def test_results_are_written_whole_or_not_at_all(tmp_path):
  """`write_json` writes through a temporary file renamed over the target: a write that fails
  part way (here an object JSON cannot hold, after some of the file was written) leaves the
  previous results whole and no temporary file behind."""
  from ttt_jax.eval.perplexity import write_json  # noqa: PLC0415

  path = str(tmp_path / "eval" / "results.json")
  assert write_json({"ppl": [1.5, 2.5]}, path) == path
  with pytest.raises(TypeError):
    write_json({"ppl": [3.5], "bad": object()}, path)
  with open(path) as f:
    assert json.load(f) == {"ppl": [1.5, 2.5]}
  assert os.listdir(tmp_path / "eval") == ["results.json"]
