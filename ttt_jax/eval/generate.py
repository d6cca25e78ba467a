"""Text generation with carried state: prefill through the streaming path, then decode.

The prompt is fed in chunks (whole multiples of the model's inner mini-batch, see
perplexity.stream_alignment), any remainder token by token; then each new token is one model
call of length 1 with the cache carried (KV window for SWA, growing KV cache for full
attention, TTT hidden state, E2E inner weights: E2E takes an inner step whenever a mini-batch of
tokens completes). Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax.eval.perplexity import init_cache, stream_alignment


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Token ids [B] from fp32 logits [B, V]: argmax at temperature 0, else top-k sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_forward(graphdef) -> Callable:
  """jit(params, cache, tokens [B,T], start) -> (last-position logits [B,V], new cache)."""

  def fwd(params, cache, tokens, start):
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache)
    return logits[:, -1], cache

  return jax.jit(fwd, donate_argnums=1)


def make_decode_step(graphdef, temperature: float, top_k: int) -> Callable:
  """jit(params, cache, token [B], pos, key) -> (next token [B], new cache)."""
  forward = make_forward(graphdef)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(params, cache, token, pos, key):
    logits, cache = forward(params, cache, token[:, None], pos)
    return sample_logits(logits, key, temperature, top_k), cache

  return step


def prefill_pieces(length: int, chunk: int, align: int) -> list[int]:
  """Piece lengths that feed a prompt: chunks that are multiples of `align`, then 1s."""
  step = max(align, chunk // align * align)
  aligned = length // align * align
  pieces = [step] * (aligned // step)
  if aligned % step:
    pieces.append(aligned % step)
  return pieces + [1] * (length - aligned)


def generate(graphdef, params, model_cfg: ml_collections.ConfigDict, prompt: np.ndarray,
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
             chunk: int = 512, eos_id: int | None = None, progress: bool = False) -> np.ndarray:
  """New tokens [B, <= max_new_tokens] after `prompt` [B, P] (P >= 1, e.g. starting with BOS).

  Stops early once every row has produced `eos_id` (rows that stopped first keep producing
  tokens, which callers cut at their EOS).
  """
  from tqdm.auto import tqdm  # noqa: PLC0415

  prompt = np.asarray(prompt, np.int32)
  batch, plen = prompt.shape
  if plen < 1 or max_new_tokens < 1:
    raise ValueError("generate needs a prompt of >= 1 token and max_new_tokens >= 1")
  cache = init_cache(graphdef, params, batch, plen + max_new_tokens)
  forward = make_forward(graphdef)
  decode = make_decode_step(graphdef, float(temperature), int(top_k))
  pos = 0
  for n in prefill_pieces(plen, chunk, stream_alignment(model_cfg)):
    logits, cache = forward(params, cache, prompt[:, pos:pos + n], jnp.int32(pos))
    pos += n
  key = jax.random.key(seed)
  key, sub = jax.random.split(key)
  token = sample_logits(logits, sub, float(temperature), int(top_k))
  out = [np.asarray(token)]
  done = np.zeros(batch, bool)
  for _ in tqdm(range(max_new_tokens - 1), desc="decode", unit="tok", disable=not progress,
                leave=False):
    if eos_id is not None:
      done |= out[-1] == eos_id
      if done.all():
        break
    key, sub = jax.random.split(key)
    token, cache = decode(params, cache, token, jnp.int32(pos), sub)
    pos += 1
    out.append(np.asarray(token))
  return np.stack(out, axis=1)


def generate_text(run, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, progress: bool = True) -> str:
  """Continuation of `prompt` (text) by a loaded run (perplexity.load_run), cut at EOS."""
  from ttt_jax.data.tokenizers import get_tokenizer  # noqa: PLC0415

  tok = get_tokenizer(run.config.data.tokenizer)
  ids = np.concatenate([[tok.bos_id], np.asarray(tok.encode(prompt), np.int32)])[None]
  new = generate(run.graphdef, run.params, run.config.model, ids, max_new_tokens,
                 temperature=temperature, top_k=top_k, seed=seed, chunk=run.config.eval.chunk,
                 eos_id=tok.eos_id, progress=progress)[0]
  stop = np.flatnonzero(new == tok.eos_id)
  if len(stop):
    new = new[:stop[0]]
  return tok.decode(new.tolist())
