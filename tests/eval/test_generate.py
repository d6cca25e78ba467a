"""Generation: the compiled loop == a slow reference (argmax of the one-shot forward over the
growing sequence) for every model kind, no compilation for new prompt lengths / settings,
sampling (top-k, top-p, seeds, bad values), stop strings, context warning."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config
from ttt_jax.eval import generate as G
from ttt_jax.eval import sampling as S
from ttt_jax.models import build_model

from ..repo_files import load_file
from ..tiers import core_and_extended

KINDS = ["transformer", "swa", "ttt_linear", "ttt_mlp", "e2e"]


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
  return m, graphdef, nnx.to_pure_dict(state)


def slow_greedy(graphdef, params, prompt: np.ndarray, n: int, length: int) -> np.ndarray:
  """n greedy tokens by a Python loop: each is the argmax of the model's one-shot forward over
  the sequence so far (right-padded to `length`, a multiple of every mini-batch: the model is
  causal, so the padding never reaches the positions read)."""
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
  seq = np.zeros((prompt.shape[0], length), np.int32)
  seq[:, :prompt.shape[1]] = prompt
  for t in range(prompt.shape[1], prompt.shape[1] + n):
    logits = np.asarray(forward(params, jnp.asarray(seq)))
    seq[:, t] = logits[:, t - 1].argmax(-1)
  return seq[:, prompt.shape[1]:prompt.shape[1] + n]


@pytest.mark.parametrize("kind", core_and_extended(KINDS, ("transformer", "e2e")))
def test_compiled_generation_equals_slow_reference(kind, monkeypatch):
  """Prompt of 30 tokens (prefill: a chunk of 16, one of 8, then 5 single steps in the decode
  loop; full attention: a chunk of 16, one of 8, one of 8 with 3 padding slots, 1 step), 18 new
  tokens, token for token. Full attention runs past max_len (its KV cache grows to the next
  bucket)."""
  monkeypatch.setattr(G, "SMALL_CHUNK", 8)
  m, graphdef, params = tiny_model(kind)
  assert G.chunk_sizes(16, G.stream_alignment(m), 48) == (16, 8)
  prompt = np.random.default_rng(0).integers(0, 259, (2, 30)).astype(np.int32)
  max_len = 40 if kind == "transformer" else 48
  gen = G.Generator(graphdef, params, m, chunk=16, max_len=max_len)
  new = gen(prompt, 18)
  assert new.shape == (2, 18)
  np.testing.assert_array_equal(new, slow_greedy(graphdef, params, prompt, 18, 48))


class CompileLog(logging.Handler):
  def __init__(self):
    super().__init__()
    self.compiled = []

  def emit(self, record):
    if "Compiling" in record.getMessage():
      self.compiled.append(record.getMessage()[:300])


@pytest.mark.parametrize("kind", ["transformer", "e2e"])
def test_new_prompt_lengths_and_settings_compile_nothing(kind):
  m, graphdef, params = tiny_model(kind)
  gen = G.Generator(graphdef, params, m, chunk=16, max_len=64, segment=4)
  rng = np.random.default_rng(1)
  gen(rng.integers(0, 256, (1, 5)).astype(np.int32), 4)  # compiles the loop and the cache
  log, logger = CompileLog(), logging.getLogger("jax")
  logger.addHandler(log)
  greedy = []
  try:
    with jax.log_compiles(True):
      for plen, n, temp, top_k, top_p, seed in [(1, 9, 0.0, 0, 1.0, 0), (17, 30, 0.7, 5, 0.9, 3),
                                                (33, 2, 1.3, 0, 0.5, 4), (40, 24, 0.0, 0, 1.0, 0),
                                                (60, 4, 0.0, 0, 1.0, 0)]:
        prompt = rng.integers(0, 256, (1, plen)).astype(np.int32)
        out = gen(prompt, n, temperature=temp, top_k=top_k, top_p=top_p, seed=seed,
                  eos_id=[3, 7])
        assert 1 <= out.shape[1] <= n
        if temp == 0:
          greedy.append((prompt, out))
      gen(prompt[:, :20], 10, until=lambda new: new.shape[1] >= 3, progress=True)  # segmented
  finally:
    logger.removeHandler(log)
  for prompt, out in greedy:  # prompts up to the end of the buffer
    want = slow_greedy(graphdef, params, prompt, out.shape[1], 64)
    np.testing.assert_array_equal(out, want)
  assert log.compiled == []
  assert gen.loop._cache_size() == 1 and gen.init_fn._cache_size() == 1


def test_top_k_1_is_greedy_and_a_seed_reproduces():
  m, graphdef, params = tiny_model("swa")
  prompt = np.random.default_rng(1).integers(0, 256, (1, 10)).astype(np.int32)
  gen = G.Generator(graphdef, params, m, chunk=8, max_len=32)
  greedy = gen(prompt, 12)
  np.testing.assert_array_equal(gen(prompt, 12, temperature=1.0, top_k=1, seed=5), greedy)
  np.testing.assert_array_equal(gen(prompt, 12, temperature=5.0, top_p=1e-6, seed=5), greedy)
  a = gen(prompt, 12, temperature=1.5, top_k=20, seed=7)
  np.testing.assert_array_equal(gen(prompt, 12, temperature=1.5, top_k=20, seed=7), a)
  assert not np.array_equal(gen(prompt, 12, temperature=1.5, top_k=20, seed=8), a)
  # segments (asked after every 4 tokens) draw the same samples as one run of the loop
  gen.segment = 4
  np.testing.assert_array_equal(gen(prompt, 12, temperature=1.5, top_k=20, seed=7,
                                    until=lambda new: False), a)
  # each sampled token is among the 20 most likely under the full forward
  full = np.concatenate([prompt, a], axis=1)
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(full[:, :-1]))[0])[0, 9:]
  ranks = (logits > logits[np.arange(12), a[0]][:, None]).sum(-1)
  assert (ranks < 20).all()


def allowed_numpy(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
  """Reference allowed set [B, V] and scaled logits, row by row in float64."""
  scaled = logits.astype(np.float64) / temperature
  allowed = np.zeros(logits.shape, bool)
  for b, row in enumerate(scaled):
    order = np.argsort(-row)
    if top_k:
      order = order[:top_k]
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    n = min(int(np.searchsorted(np.cumsum(p), top_p - 1e-9)) + 1, len(order))
    allowed[b, order[:n]] = True
  return allowed, scaled


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.3), (2.0, 40, 0.8), (0.5, 3, 0.99), (1.0, 1, 0.5)])
def test_filter_matches_numpy_and_samples_stay_inside(temperature, top_k, top_p):
  logits = np.random.default_rng(top_k).normal(0, 2, (6, 97)).astype(np.float32)
  want, scaled = allowed_numpy(logits, temperature, top_k, top_p)
  got = np.asarray(S.filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(got), want)
  np.testing.assert_allclose(got[want], scaled[want], rtol=1e-6)
  keys = jax.random.split(jax.random.key(0), 300)
  draws = np.asarray(jax.vmap(lambda k: S.sample_logits(jnp.asarray(logits), k, temperature,
                                                         top_k, top_p))(keys))  # [300, 6]
  assert want[np.arange(6)[None], draws].all()


def test_sample_logits_distribution():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 4000))
  keys = jax.random.key(0)
  toks = np.asarray(G.sample_logits(logits, keys, 1.0, 0))
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)
  toks = np.asarray(G.sample_logits(logits, keys, 1.0, 2))
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, [0.0, 0.0, 3 / 7, 4 / 7], atol=0.03)
  toks = np.asarray(G.sample_logits(logits, keys, 1.0, 0, 0.65))  # 0.4 + 0.3 reach 0.65
  freq = np.bincount(toks, minlength=4) / len(toks)
  np.testing.assert_allclose(freq, [0.0, 0.0, 3 / 7, 4 / 7], atol=0.03)


@pytest.mark.parametrize("knobs,name", [((-0.1, 0, 1.0), "--temperature"),
                                        ((float("nan"), 0, 1.0), "--temperature"),
                                        ((float("inf"), 0, 1.0), "--temperature"),
                                        ((1.0, -1, 1.0), "--top_k"),
                                        ((1.0, 0, 0.0), "--top_p"), ((1.0, 0, 1.5), "--top_p")])
def test_bad_sampling_values_fail_in_one_line(knobs, name):
  with pytest.raises(ConfigError, match=name) as e:
    S.check_sampling(*knobs)
  assert "\n" not in str(e.value)


def test_generate_script_rejects_bad_values_before_loading(tmp_path, capsys):
  script = load_file("scripts/generate.py")
  with pytest.raises(SystemExit) as e:
    script.main(["--workdir", str(tmp_path / "none"), "--top_p", "1.5"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert "--top_p" in err and "'1.5'" in err and "\n" not in err  # the flags' shared range check
  with pytest.raises(SystemExit):
    script.main(["--workdir", str(tmp_path / "none"), "--temperature", "nan"])
  assert "--temperature" in capsys.readouterr().err


def test_stop_strings_and_context_warning():
  assert G.cut_at_stop("abc. def\n\nxyz", ["\n\n", "."]) == ("abc", True)
  assert G.cut_at_stop("abc", ["x", ""]) == ("abc", False)
  m = tiny_model("swa")[0]
  assert G.context_warning(m, 64, 64) is None
  line = G.context_warning(m, 65, 64)
  assert "65" in line and "64" in line and "\n" not in line and "untested" in line
  m.mixer = "full"
  assert "KV cache" in G.context_warning(m, 100, 64)


@pytest.mark.parametrize("kind", core_and_extended(("e2e", "ttt_linear", "transformer"), ("e2e",)))
def test_a_buffer_shorter_than_the_inner_mini_batch_is_rounded_up_to_one(kind):
  """max_len 4 under an inner mini-batch of 8 (E2E's 1024 at 125m under a short --seq_len):
  the buffer holds one whole mini-batch, and the tokens are the slow reference's."""
  m, graphdef, params = tiny_model(kind)
  gen = G.Generator(graphdef, params, m, chunk=16, max_len=4)
  align = G.stream_alignment(m)
  assert gen.length(4) == (8 if kind != "transformer" else 4) and gen.length(4) % align == 0
  prompt = np.random.default_rng(3).integers(0, 259, (2, 2)).astype(np.int32)
  new = gen(prompt, 2)
  np.testing.assert_array_equal(new, slow_greedy(graphdef, params, prompt, 2, 8))
