"""Strided perplexity (eval/strided.py): the windows score every position of a document exactly
once, the batched and padded evaluation equals slow references (a fresh forward per token at
stride 1, a plain loop over windows at larger strides) for every model kind and compiles once
per shape, bad strides fail in one line, and scripts/evaluate.py --stride end to end.

Convention: a document of N tokens ([BOS] text [EOS]) has N - 1 scored positions (position p
predicts token p + 1), so a strided evaluation scores sum(N - 1) tokens."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.eval import perplexity as P
from ttt_jax.eval import strided as S
from ttt_jax.models import build_model
from ttt_jax.runs.load import load_run

from ..repo_files import load_file

KINDS = ["transformer", "swa", "ttt_linear", "ttt_mlp", "e2e"]
CTX, CHUNK = 16, 8  # windows of 16 positions streamed in 2 chunks (inner mini-batches of 8)


@pytest.fixture(scope="module")
def tiny_model(run_config):
  """`tiny_model(kind)` -> (config, graphdef, params): the evaluation tests' tiny run config
  (1 layer, d_model 32) with window 12 and inner mini-batches of 8 (TTT and E2E)."""

  def build(kind: str):
    c = run_config("embedded", kind)
    m = c.model
    m.window, m.init_std, m.ttt.mini_batch_size, m.e2e.mini_batch_size = 12, 0.2, 8, 8
    m.e2e.ilr_init = m.e2e.inner_lr = 0.5  # a visible inner step while reading a window
    graphdef, state = nnx.split(build_model(m, seed=1))
    return c, graphdef, nnx.to_pure_dict(state)

  return build


def documents(lengths, seed=0) -> list[np.ndarray]:
  """[BOS] random bytes [EOS] of the given total lengths."""
  rng = np.random.default_rng(seed)
  return [np.concatenate([[256], rng.integers(0, 256, n - 2), [257]]).astype(np.int32)
          for n in lengths]


def fresh_forward(graphdef):
  """NLL [n] of tokens [n + 1], one forward over exactly those n inputs from the model's initial
  state (positions 0 .. n - 1, an empty cache: what a model of context >= n sees)."""

  @jax.jit
  def nll(params, tokens):
    model = nnx.merge(graphdef, params)
    n = tokens.shape[0] - 1
    logits, _ = model(tokens[None, :-1], jnp.arange(n, dtype=jnp.int32), model.init_cache(1, n))
    return optax.softmax_cross_entropy_with_integer_labels(logits[0], tokens[1:])

  return lambda params, tokens: np.asarray(nll(params, jnp.asarray(tokens)))


def per_token_reference(forward, params, doc: np.ndarray, ctx: int) -> np.ndarray:
  """Token t (1 .. N-1) scored by its own forward over its min(ctx, t) preceding tokens."""
  return np.array([forward(params, doc[max(0, t - ctx):t + 1])[-1] for t in range(1, len(doc))])


def window_reference(forward, params, doc: np.ndarray, ctx: int, stride: int) -> np.ndarray:
  """Windows of ctx positions starting at 0, S, 2S, ... until one reaches the end; each scores the
  positions no earlier window scored (all of the first; at most the last S of the others)."""
  n = len(doc) - 1
  out, begin = np.full(n, np.nan), 0
  while True:
    end = min(begin + ctx, n)
    nll = forward(params, doc[begin:end + 1])
    new = [p for p in range(begin, end) if np.isnan(out[p])]
    assert begin == 0 or len(new) <= stride and new == list(range(end - len(new), end))
    for p in new:
      out[p] = nll[p - begin]
    if end == n:
      return out
    begin += stride


@pytest.mark.parametrize("length,ctx,stride", [(2, 4, 1), (5, 4, 4), (40, 16, 1), (40, 16, 5),
                                               (40, 16, 16), (17, 16, 3), (100, 32, 7),
                                               (33, 8, 8), (1000, 64, 64), (1000, 64, 17)])
def test_every_position_is_scored_once(length, ctx, stride):
  """Scored ranges tile 0 .. N-2 without overlap or gap; a scored position p sees p + 1 tokens
  in the first window and ctx - stride + 1 .. ctx tokens after it; windows advance by the
  stride and hold ctx positions except the last."""
  windows = S.stride_windows(length, ctx, stride)
  scored = np.concatenate([np.arange(first, end) for _, end, first in windows])
  np.testing.assert_array_equal(scored, np.arange(length - 1))  # N - 1 positions, each once
  assert [b for b, _, _ in windows] == [k * stride for k in range(len(windows))]
  assert windows[-1][1] == length - 1
  for k, (begin, end, first) in enumerate(windows):
    assert end - begin == ctx or k == len(windows) - 1
    seen = np.arange(first, end) - begin + 1  # tokens of context of each scored position
    if k == 0:
      assert first == 0 and (seen == np.arange(1, end + 1)).all()
    else:
      assert seen.min() >= ctx - stride + 1 and seen.max() <= ctx and end - first <= stride


# The stride-1 reference compiles a forward for every prefix length (16 per kind): in `make test`
# for one kind, for all under `make test-slow`
STRIDES = [pytest.param(k, (1, 5, CTX), marks=() if k == "swa" else pytest.mark.slow,
                        id=f"{k}-per-token") for k in KINDS]
STRIDES += [pytest.param(k, (5, CTX), id=f"{k}-windows") for k in KINDS if k != "swa"]


@pytest.mark.parametrize("kind,strides", STRIDES)
def test_strided_equals_slow_references_and_compiles_once(kind, strides, tiny_model):
  """Batched, padded windows (3 per batch, the last batch and each last window short) give the
  NLL of a fresh forward per token at stride 1, and of the plain window loop at strides 5 and
  16; one compiled chunk step and cache initializer serve every window of every stride."""
  c, graphdef, params = tiny_model(kind)
  docs = documents([41, 12, 30])  # 12 < ctx: one short window
  step_fn, init_fn = P.make_chunk_step(graphdef), P.make_init_cache(graphdef)
  forward = fresh_forward(graphdef)
  for stride in strides:
    got = S.strided_nll(graphdef, params, docs, CTX, stride, chunk=CHUNK, batch_size=3,
                        step_fn=step_fn, init_fn=init_fn)
    assert [len(g) for g in got] == [40, 11, 29] and not np.isnan(np.concatenate(got)).any()
    for doc, nll in zip(docs, got, strict=True):
      ref = (per_token_reference(forward, params, doc, CTX) if stride == 1
             else window_reference(forward, params, doc, CTX, stride))
      np.testing.assert_allclose(nll, ref, rtol=2e-5, atol=2e-5, err_msg=f"{kind} S={stride}")
  assert step_fn._cache_size() == 1 and init_fn._cache_size() == 1


def test_summary_counts_every_token_once(tiny_model):
  c, graphdef, params = tiny_model("swa")
  docs = documents([41, 12, 30, 70])
  res = S.evaluate_strided(graphdef, params, c.model, docs, [8, 16], 4, chunk=CHUNK,
                           batch_size=4, progress=False, echo=None)
  assert res["stride"] == 4 and [r["ctx"] for r in res["contexts"]] == [8, 16]
  for r in res["contexts"]:
    assert r["tokens"] == sum(len(d) - 1 for d in docs) and r["docs"] == 4
    assert r["windows"] == S.window_count(docs, r["ctx"], 4)
    nll = S.strided_nll(graphdef, params, docs, r["ctx"], 4, chunk=CHUNK, batch_size=4)
    assert r["mean_nll"] == pytest.approx(np.concatenate(nll).astype(np.float64).mean())
    assert r["ppl"] == pytest.approx(np.exp(r["mean_nll"]))


def test_bad_stride_is_one_line():
  for stride in (0, -3):
    with pytest.raises(ConfigError, match=f"--stride {stride}: the stride must be a positive"):
      S.check_stride(stride, [16, 64])
  with pytest.raises(ConfigError, match="--stride 32 is larger than ctx 16: .* --stride <= 16"):
    S.check_stride(32, [16, 64])
  with pytest.raises(ConfigError, match="^eval.stride 32 is larger than ctx 16"):
    S.check_stride(32, [64, 16], "eval.stride")
  S.check_stride(16, [16, 64])
  c = build_config("model=swa")
  c.eval.stride = -1
  with pytest.raises(ConfigError, match="eval.stride=-1 must be >= 0"):
    validate(c)


def test_evaluate_script_with_stride(trained_run, capsys):
  """scripts/evaluate.py --stride: the strided perplexity of the same documents, whole, at each
  context length, beside the per-length table, in results.json, the printed table and the plot;
  a stride larger than a context length stops in one line before any compute."""
  evaluate = load_file("scripts/evaluate.py")
  evaluate.main(["--workdir", trained_run, "--ctx", "16,32", "--stride", "8", "--max_docs", "2",
                 "--no_progress"])
  out = capsys.readouterr().out
  res = json.loads((pathlib.Path(trained_run) / "eval" / "results.json").read_text())
  stream = load_run(trained_run).data.stream("validation")
  lengths = dict(zip(stream.names, stream.doc_lengths.tolist(), strict=True))
  assert res["strided"]["stride"] == 8 and len(res["documents"]) == 2
  for per_len, st in zip(res["contexts"], res["strided"]["contexts"], strict=True):
    assert per_len["ctx"] == st["ctx"] and per_len["tokens"] == 2 * per_len["ctx"]
    assert st["tokens"] == sum(lengths[n] - 1 for n in res["documents"])
  assert "strided ppl" in out and "advancing by 8" in out
  with pytest.raises(SystemExit):
    evaluate.main(["--workdir", trained_run, "--ctx", "16,32", "--stride", "20"])
  assert "--stride 20 is larger than ctx 16" in capsys.readouterr().err
