"""Text generation with carried state: prefill through the streaming path, then decode.

The prompt is fed in chunks (whole multiples of the model's inner mini-batch, see
perplexity.stream_alignment), any remainder token by token; then each new token is one model
call of length 1 with the cache carried (KV window for SWA, growing KV cache for full
attention, TTT hidden state, E2E inner weights: E2E takes an inner step whenever a mini-batch of
tokens completes). Temperature 0 is greedy decoding.

Text generation follows the tokenizer's files (data/special_tokens.py): the prompt starts with
BOS only when they say so (add_bos_token), generation ends at any of their EOS ids (stop_ids),
and `chat=True` wraps the prompt as a user message in their chat template (data/chat.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ttt_jax.data.chat import apply_chat_template
from ttt_jax.data.tokenizers import Tokenizer
from ttt_jax.eval.perplexity import make_init_cache, stream_alignment
from ttt_jax.train.runs import Run


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k) -> jax.Array:
  """Token ids [B] from fp32 logits [B, V]: argmax at temperature <= 0, else sampling from the
  `top_k` most likely tokens (all when top_k <= 0). Both knobs may be traced values."""
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
  k = jnp.clip(jnp.where(top_k > 0, top_k, logits.shape[-1]), 1, logits.shape[-1])
  kth = jax.lax.dynamic_slice_in_dim(ranked, k - 1, 1, axis=-1)
  scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def make_step(graphdef) -> Callable:
  """jit(params, cache, tokens [B,T], start, key, temperature, top_k) -> (next token [B], cache).

  One function for prefill pieces and decoding, compiled once per piece length T. Build it once
  per model and reuse it (`Generator`), so repeated generations do not compile again.
  """

  def step(params, cache, tokens, start, key, temperature, top_k):
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache)
    return sample_logits(logits[:, -1], key, temperature, top_k), cache

  return jax.jit(step, donate_argnums=1)


def prefill_pieces(length: int, chunk: int, align: int) -> list[int]:
  """Piece lengths that feed a prompt: chunks that are multiples of `align`, then 1s."""
  step = max(align, chunk // align * align)
  aligned = length // align * align
  pieces = [step] * (aligned // step)
  if aligned % step:
    pieces.append(aligned % step)
  return pieces + [1] * (length - aligned)


class Generator:
  """A model ready to generate: its compiled step and cache initializer are built once and reused
  by every call."""

  def __init__(self, graphdef, params, model_cfg: ml_collections.ConfigDict, *, chunk: int = 512):
    self.graphdef, self.params, self.chunk = graphdef, params, chunk
    self.align = stream_alignment(model_cfg)
    self.step = make_step(graphdef)
    self.init_fn = make_init_cache(graphdef)

  def __call__(self, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, eos_id: int | Sequence[int] | None = None,
               progress: bool = False) -> np.ndarray:
    """New tokens [B, <= max_new_tokens] after `prompt` [B, P] (P >= 1, e.g. starting with BOS).

    Stops early once every row has produced `eos_id` (one id or several: any of them; rows that
    stopped first keep producing tokens, which callers cut at their EOS).
    """
    stops = None if eos_id is None else np.atleast_1d(np.asarray(eos_id, np.int64))
    prompt = np.asarray(prompt, np.int32)
    batch, plen = prompt.shape
    if plen < 1 or max_new_tokens < 1:
      raise ValueError("generate needs a prompt of >= 1 token and max_new_tokens >= 1")
    params, step = self.params, self.step
    cache = self.init_fn(params, batch, plen + max_new_tokens)
    knobs = (jnp.float32(temperature), jnp.int32(top_k))
    keys = iter(jax.random.split(jax.random.key(seed), plen + max_new_tokens))
    pos = 0
    for n in prefill_pieces(plen, self.chunk, self.align):
      token, cache = step(params, cache, prompt[:, pos:pos + n], jnp.int32(pos), next(keys),
                          *knobs)
      pos += n
    out = [np.asarray(token)]
    done = np.zeros(batch, bool)
    for _ in tqdm(range(max_new_tokens - 1), desc="decode", unit="tok", disable=not progress,
                  leave=False):
      if stops is not None:
        done |= np.isin(out[-1], stops)
        if done.all():
          break
      token, cache = step(params, cache, token[:, None], jnp.int32(pos), next(keys), *knobs)
      pos += 1
      out.append(np.asarray(token))
    return np.stack(out, axis=1)


def generate(graphdef, params, model_cfg: ml_collections.ConfigDict, prompt: np.ndarray,
             max_new_tokens: int, *, chunk: int = 512, **kwargs) -> np.ndarray:
  """One generation (`Generator.__call__`); build a `Generator` to generate more than once."""
  return Generator(graphdef, params, model_cfg, chunk=chunk)(prompt, max_new_tokens, **kwargs)


def prompt_ids(tok: Tokenizer, prompt: str, *, chat: bool = False) -> np.ndarray:
  """The ids a generation starts from: BOS when the tokenizer's files say so (`add_bos`), then
  the prompt as text or, with `chat`, as a user message in their chat template with the
  assistant's turn opened. BOS alone when that leaves nothing."""
  if chat:
    prompt = apply_chat_template(tok.chat_template, [{"role": "user", "content": prompt}],
                                 add_generation_prompt=True)
  ids = np.asarray(tok.encode(prompt), np.int32)
  if tok.add_bos or not len(ids):
    ids = np.concatenate([[tok.bos_id], ids]).astype(np.int32)
  return ids


def generate_text(run: Run, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, chat: bool = False,
                  progress: bool = True) -> str:
  """Continuation of `prompt` (text; with `chat` the reply to it as a user message) by a loaded
  run (runs.load_run), cut at the first of the tokenizer's EOS ids; the text is encoded and
  decoded with the run's own tokenizer (`run.data`, see `prompt_ids`)."""
  tok = run.data.tokenizer
  ids = prompt_ids(tok, prompt, chat=chat)[None]
  new = generate(run.graphdef, run.params, run.config.model, ids, max_new_tokens,
                 temperature=temperature, top_k=top_k, seed=seed, chunk=run.config.eval.chunk,
                 eos_id=tok.stop_ids, progress=progress)[0]
  stop = np.flatnonzero(np.isin(new, tok.stop_ids))
  if len(stop):
    new = new[:stop[0]]
  return tok.decode(new.tolist())
