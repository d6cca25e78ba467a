"""Text generation with carried state, one compiled program per (batch, length bucket).

A generation is `Generator.__call__`: the prompt and the tokens to come live in one int32 buffer
of `length` slots on the device, and one jitted function (`decode_loop`) runs the whole of it:
  * prefill: a `lax.while_loop` over chunks of `chunk` tokens, then one over chunks of `small`
    (both whole multiples of the model's inner mini-batch, perplexity.stream_alignment), leaving
    at least the prompt's last token (full attention: the last small chunk is padded with
    positions -1, which its KV cache never shows, so the prompt but its last token is read);
  * decode: a `lax.while_loop` of one-token model calls with the cache carried (KV window for SWA,
    KV cache of `length` slots for full attention, TTT hidden state, E2E inner weights: E2E takes
    an inner step whenever a mini-batch of tokens completes). It reads the prompt's remaining
    tokens, then its own samples, and stops on device at `limit` tokens or when every row has
    produced one of the EOS ids.
Prompt length, `max_new_tokens`, seed and sampling knobs are run-time values, so another prompt
or another setting compiles nothing; the cache and buffer are donated. `length` is the model's
context (`max_len`, the run's data.seq_len) unless a generation needs more (a bucket above it),
rounded up to whole streaming mini-batches.
Callers that check stop strings (or show progress) run the loop in segments of `segment` tokens,
continuing the same cache.

Text generation follows the tokenizer's files (data/special_tokens.py): the prompt starts with
BOS only when they say so (add_bos_token), generation ends at any of their EOS ids (stop_ids),
and `chat=True` wraps the prompt as a user message in their chat template (data/chat.py).
Sampling: eval/sampling.py (greedy at temperature 0).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ttt_jax.config import round_up
from ttt_jax.data.chat import apply_chat_template
from ttt_jax.data.tokenizers import Tokenizer
from ttt_jax.eval.perplexity import make_init_cache, stream_alignment
from ttt_jax.eval.sampling import check_sampling, sample_logits
from ttt_jax.layers.common import target_platform
from ttt_jax.layers.int8 import quantize_model
from ttt_jax.layers.mixers import mixer_spec
from ttt_jax.models import abstract_model
from ttt_jax.runs.load import Run
from ttt_jax.sharding import OnParamsMesh, placed_as

__all__ = ["Generator", "decode_model", "generate", "generate_text", "prompt_ids", "sample_logits"]

SMALL_CHUNK = 32  # prefill chunk for what remains after the large chunks (rounded to the align)


def chunk_sizes(chunk: int, align: int, length: int) -> tuple[int, int]:
  """(large, small) prefill chunk widths: multiples of `align`, at most `length`."""
  top = max(align, length // align * align)
  big = min(max(align, chunk // align * align), top)
  small = min(big, align * max(1, SMALL_CHUNK // align))
  return big, small


def decode_loop(graphdef, align: int, chunk: int, pad_last: bool, params, cache, seq, pos, plen,
                limit, key, temperature, top_k, top_p, stop_ids, done):
  """(cache, seq, pos, done) after reading `seq` [B, L] from `pos` to the prompt's end (`plen`)
  and sampling into it until `limit` tokens are filled or every row is `done`. Position i of
  `seq` is sampled with key fold_in(key, i - 1), so segments and chunking do not change samples.

  `pad_last` (full attention only: a key at position -1 is never visible and the next keys are
  written over it) ends the prefill with one padded small chunk instead of single steps, where
  `seq` has the slots for it.
  """
  model = nnx.merge(graphdef, params)
  big, small = chunk_sizes(chunk, align, seq.shape[1])

  def prefill(width, pos, cache):
    def body(carry):
      pos, cache = carry
      tokens = jax.lax.dynamic_slice_in_dim(seq, pos, width, axis=1)
      _, cache = model(tokens, pos + jnp.arange(width, dtype=jnp.int32), cache)
      return pos + width, cache

    return jax.lax.while_loop(lambda c: c[0] + width <= plen - 1, body, (pos, cache))

  pos, cache = prefill(big, pos, cache)
  if pad_last:
    def padded(carry):
      pos, cache = carry
      tokens = jax.lax.dynamic_slice_in_dim(seq, pos, small, axis=1)
      positions = pos + jnp.arange(small, dtype=jnp.int32)
      _, cache = model(tokens, jnp.where(positions < plen - 1, positions, -1), cache)
      return jnp.minimum(pos + small, plen - 1), cache

    fits = lambda c: (c[0] < plen - 1) & (c[0] + small <= seq.shape[1])  # noqa: E731
    pos, cache = jax.lax.while_loop(fits, padded, (pos, cache))
  elif small < big:
    pos, cache = prefill(small, pos, cache)

  def step(carry):
    pos, cache, seq, done = carry
    token = jax.lax.dynamic_slice_in_dim(seq, pos, 1, axis=1)
    logits, cache = model(token, pos[None], cache)
    nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, pos), temperature, top_k, top_p)
    new = pos + 1 >= plen
    nxt = jnp.where(new, nxt, jax.lax.dynamic_slice_in_dim(seq, pos + 1, 1, axis=1)[:, 0])
    seq = jax.lax.dynamic_update_slice_in_dim(seq, nxt[:, None], pos + 1, axis=1)
    return pos + 1, cache, seq, done | (new & jnp.isin(nxt, stop_ids))

  pos, cache, seq, done = jax.lax.while_loop(
      lambda c: (c[0] + 1 < limit) & ~jnp.all(c[3]), step, (pos, cache, seq, done))
  return cache, seq, pos, done


DECODE_DTYPES = ("float32", "bfloat16", "int8")


def decode_model(model_cfg: ml_collections.ConfigDict, params, dtype: str):
  """(model config, graphdef, params) of the same model for decoding with `dtype` weights:
  `float32` or `bfloat16` casts the floating-point parameters once and computes in that dtype
  (bfloat16 halves the weight and KV cache bytes a decode step reads); `int8` computes in
  float32 with every matrix stored int8 (layers/int8.py: a quarter of float32's weight bytes)."""
  if dtype not in DECODE_DTYPES:
    raise ValueError(f"decode dtype {dtype!r}: expected one of {', '.join(DECODE_DTYPES)}")
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  cfg.compute_dtype = cfg.param_dtype = "float32" if dtype == "int8" else dtype
  graphdef, _ = abstract_model(cfg)
  to = jnp.dtype(cfg.param_dtype)
  params = jax.tree.map(
      lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  if dtype == "int8":
    if target_platform() != "cpu":
      warnings.warn(f"int8 decode weights on {target_platform()}: XLA widens them at every "
                    "step, slower than float32 weights (the fast path is the CPU kernel)",
                    RuntimeWarning, stacklevel=2)
    model = nnx.merge(graphdef, params)
    quantize_model(model)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
  return cfg, graphdef, params


def full_attention(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the model's cache grows with the context (full attention's KV cache)."""
  return model_cfg.kind != "e2e" and mixer_spec(model_cfg.mixer).state_grows


def _loop_out(mesh, params, cache, seq, pos, *knobs):
  """Out-shardings of `decode_loop` (cache, seq, pos, done): as its arguments came in (the
  position, a scalar, replicated; `done`, the last argument, split like the rows)."""
  return placed_as((cache, seq, pos, knobs[-1]), mesh)


class Generator:
  """A model ready to generate: its compiled loop and cache initializer are built once and reused
  by every call (one compilation per batch size and length bucket)."""

  def __init__(self, graphdef, params, model_cfg: ml_collections.ConfigDict, *, chunk: int = 512,
               max_len: int | None = None, segment: int = 32):
    self.graphdef, self.params, self.max_len, self.segment = graphdef, params, max_len, segment
    self.align = stream_alignment(model_cfg)
    self.pad_last = full_attention(model_cfg)
    # on a loaded run's devices: the rows split over them, cache and sequences handed back
    # placed as they came in (`sharding.OnParamsMesh`); `pos`, a scalar, placed replicated
    self.loop = OnParamsMesh(partial(decode_loop, graphdef, self.align, chunk, self.pad_last),
                             batch_args=(1, 2, 10), out_shardings=_loop_out,
                             donate_argnums=(1, 2))
    self.init_fn = make_init_cache(graphdef)

  def length(self, need: int) -> int:
    """Buffer (and full-attention KV) slots for a generation of `need` tokens: `max_len` when it
    fits, else the next power of two (at least 64) above it; either rounded up to a whole number
    of the model's streaming mini-batches (E2E's 1024 at 125m: a shorter buffer holds no chunk)."""
    if self.max_len is not None and need <= self.max_len:
      return round_up(self.max_len, self.align)
    return round_up(max(64, self.max_len or 0, 1 << (need - 1).bit_length()), self.align)

  def __call__(self, prompt: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_id: int | Sequence[int] | None = None,
               until: Callable[[np.ndarray], bool] | None = None,
               progress: bool = False) -> np.ndarray:
    """New tokens [B, <= max_new_tokens] after `prompt` [B, P] (P >= 1, e.g. starting with BOS).

    Stops early once every row has produced `eos_id` (one id or several: any of them; rows that
    stopped first keep producing tokens, which callers cut at their EOS), or when `until(new
    tokens so far)` is true: it is asked after every `segment` tokens (and the result may then
    run up to `segment` - 1 tokens past the point it would have stopped).
    """
    check_sampling(temperature, top_k, top_p)
    prompt = np.asarray(prompt, np.int32)
    batch, plen = prompt.shape
    if plen < 1 or max_new_tokens < 1:
      raise ValueError("generate needs a prompt of >= 1 token and max_new_tokens >= 1")
    total = plen + max_new_tokens
    length = self.length(total)
    seq = np.zeros((batch, length), np.int32)
    seq[:, :plen] = prompt
    stops = [] if eos_id is None else np.atleast_1d(np.asarray(eos_id, np.int64)).tolist()
    stop_ids = np.full(-(-max(len(stops), 1) // 8) * 8, -1, np.int32)
    stop_ids[:len(stops)] = stops
    cache = self.init_fn(self.params, batch, length)
    seq, pos, done = jnp.asarray(seq), jnp.int32(0), jnp.zeros(batch, bool)
    knobs = (jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k),
             jnp.float32(top_p), jnp.asarray(stop_ids))
    segmented = until is not None or progress
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress,
               leave=False)
    limit = plen + self.segment if segmented else total
    while True:
      limit = min(limit, total)
      cache, seq, pos, done = self.loop(self.params, cache, seq, pos, jnp.int32(plen),
                                        jnp.int32(limit), *knobs, done)
      n = int(pos) + 1
      bar.update(n - plen - bar.n)
      if n >= total or bool(np.asarray(done).all()) or (until is not None
                                               and until(np.asarray(seq)[:, plen:n])):
        break
      limit = n + self.segment
    bar.close()
    return np.asarray(seq)[:, plen:n]


def generate(graphdef, params, model_cfg: ml_collections.ConfigDict, prompt: np.ndarray,
             max_new_tokens: int, *, chunk: int = 512, max_len: int | None = None,
             **kwargs) -> np.ndarray:
  """One generation (`Generator.__call__`); build a `Generator` to generate more than once."""
  return Generator(graphdef, params, model_cfg, chunk=chunk, max_len=max_len)(
      prompt, max_new_tokens, **kwargs)


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


def trained_context_warning(model_cfg: ml_collections.ConfigDict, length: int,
                            what: str) -> str | None:
  """One line when `what` (`length` tokens) is longer than the context the model was trained at
  (model.trained_context, recorded by imports; 0 = unknown: no warning)."""
  trained = model_cfg.get("trained_context", 0)
  if not trained or length <= trained:
    return None
  return (f"warning: {what} = {length} tokens is longer than the context the model was trained "
          f"at ({trained}, model.trained_context): positions past it were never trained")


def context_warning(model_cfg: ml_collections.ConfigDict, need: int, seq_len: int) -> str | None:
  """One line when a generation of `need` tokens runs past the context `seq_len` or the trained
  context (`trained_context_warning`)."""
  past = trained_context_warning(model_cfg, need, "prompt + max_new_tokens")
  if past or need <= seq_len:
    return past
  how = ("the full-attention KV cache is sized for it, but positions past it were never trained"
         if full_attention(model_cfg) else
         "the model's carried state (window / TTT / E2E) continues, untested past it")
  return (f"warning: prompt + max_new_tokens = {need} tokens is longer than the model's context "
          f"of {seq_len} (data.seq_len; --seq_len overrides): {how}")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` up to the first occurrence of any stop string, and whether one occurred."""
  ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(ends)], True) if ends else (text, False)


def generate_text(run: Run, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
                  stop: Sequence[str] = (), seq_len: int | None = None, progress: bool = True,
                  generator: Generator | None = None, dtype: str | None = None,
                  echo: Callable[[str], None] | None = None) -> str:
  """Continuation of `prompt` (text; with `chat` the reply to it as a user message) by a loaded
  run (runs.load_run), cut at the first of the tokenizer's EOS ids and of the `stop` strings;
  the text is encoded and decoded with the run's own tokenizer (`run.data`, see `prompt_ids`).

  The context is the run's data.seq_len unless `seq_len` is given; a longer generation warns in
  one line through `echo` (default: stderr). Pass a `generator` (built with the same context) to
  generate more than once without compiling again. `dtype` (bfloat16, or int8 weights computing
  in float32) converts the weights once for decoding (`decode_model`).
  """
  check_sampling(temperature, top_k, top_p)
  if generator is not None and dtype:
    raise ValueError("dtype applies when the generator is built here; a given generator keeps "
                     "the dtype it was built with (decode_model)")
  tok = run.data.tokenizer
  ids = prompt_ids(tok, prompt, chat=chat)[None]
  seq_len = seq_len or run.config.data.seq_len
  warning = context_warning(run.config.model, ids.shape[1] + max_new_tokens, seq_len)
  if warning:
    (echo or partial(print, file=sys.stderr))(warning)
  if generator is None:
    cfg, graphdef, params = run.config.model, run.graphdef, run.params
    if dtype and (dtype, dtype) != (cfg.param_dtype, cfg.compute_dtype):  # both in `dtype`
      cfg, graphdef, params = decode_model(cfg, params, dtype)
    generator = Generator(graphdef, params, cfg, chunk=run.config.eval.chunk, max_len=seq_len)

  def text_of(new: np.ndarray) -> str:
    hit = np.flatnonzero(np.isin(new, tok.stop_ids))
    return tok.decode(new[:hit[0] if len(hit) else len(new)].tolist())

  until = (lambda new: cut_at_stop(text_of(new[0]), stop)[1]) if stop else None
  new = generator(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, eos_id=tok.stop_ids, until=until, progress=progress)[0]
  return cut_at_stop(text_of(new), stop)[0]
