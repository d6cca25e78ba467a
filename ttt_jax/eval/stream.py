"""The one streaming loop of evaluation: a model fed fixed-size chunks by one jitted step, its
cache (KV window, TTT hidden state, E2E inner weights + KV window) carried between them
(`stream_chunks`), and the one-shot forward it is checked against. Every program runs on the
mesh its parameters lie on (`sharding.OnParamsMesh`): on several devices a batch's rows are
split over them; one device computes the same numbers. `eval/perplexity.py` re-exports these.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ttt_jax import sharding as shd


def make_chunk_step(graphdef) -> Callable:
  """jit(params, cache, inputs [B,c], targets [B,c], start) -> (nll [B,c] fp32, new cache)."""

  def step(params, cache, inputs, targets, start):
    model = nnx.merge(graphdef, params)
    positions = start + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    logits, cache = model(inputs, positions, cache)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), cache

  return shd.OnParamsMesh(step, batch_args=(1, 2), out_shardings=_chunk_out, donate_argnums=1)


def make_logprob_step(graphdef) -> Callable:
  """jit(params, cache, inputs [B,c], start) -> (log-softmax of the last position [B, V] fp32,
  new cache): streams a prompt whose continuation is not known yet (eval/needle.py)."""

  def step(params, cache, inputs, start):
    positions = start + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    logits, cache = nnx.merge(graphdef, params)(inputs, positions, cache)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1), cache

  return shd.OnParamsMesh(step, batch_args=(1,), out_shardings=_chunk_out, donate_argnums=1)


def _chunk_out(mesh, params, cache, inputs, *_):
  """Out-shardings of a chunk step: its per-row scores split like the batch, the cache placed as
  it came in (from `make_init_cache`: split along its batch dimensions)."""
  return shd.split_batch(np.shape(inputs), mesh), shd.placed_as(cache, mesh)


def make_init_cache(graphdef) -> Callable:
  """jit(params, batch_size, capacity) -> the model's empty streaming state (built under jit: E2E
  copies its inner weights in), compiled once per (batch_size, capacity). Build it once per model
  and reuse it, as the steps."""

  def init(params, batch_size, capacity):
    return nnx.merge(graphdef, params).init_cache(batch_size, capacity)

  placements = {}  # (mesh, batch_size, capacity) -> the cache's shardings

  def out(mesh, params, batch_size, capacity):
    key = (mesh, batch_size, capacity)
    if key not in placements:
      placements[key] = shd.grown_split(lambda b: init(params, b, capacity), batch_size, mesh)
    return placements[key]

  return shd.OnParamsMesh(init, out_shardings=out, static_argnums=(1, 2))


def init_cache(graphdef, params, batch_size: int, capacity: int, *,
               init_fn: Callable | None = None):
  """The model's empty streaming state, by `init_fn` (a `make_init_cache`; default: a new one,
  which compiles again)."""
  init_fn = make_init_cache(graphdef) if init_fn is None else init_fn
  return init_fn(params, batch_size, capacity)


def stream_chunks(graphdef, params, tokens: np.ndarray, chunk: int, *,
                  step_fn: Callable | None = None, capacity: int | None = None,
                  init_fn: Callable | None = None, progress=None, cache=None,
                  start: int = 0) -> Generator[tuple[int, np.ndarray], None, Any]:
  """Yields (start, NLL [B, n]) of the L = tokens.shape[1] - 1 positions of `tokens`, fed
  `chunk` tokens at a time with the cache carried (the one streaming loop of evaluation).

  A last partial chunk is padded to `chunk`, so every length runs through one compiled shape;
  the padding comes after the real tokens, which a causal model (and the TTT / E2E inner loop,
  which updates only after a mini-batch is scored) never lets influence them; only the n real
  positions are yielded. `capacity` is the KV capacity for full attention (default: L rounded
  up to the chunk, the whole context stays visible); windowed / recurrent mixers ignore it.
  `step_fn` / `init_fn` (make_chunk_step / make_init_cache) are built once by callers that
  stream more than once, so nothing compiles again.
  With `cache`, the tokens continue a stream at position `start` instead of starting one; the
  generator returns the cache after the last chunk (`stream_with_cache`). A cache from
  `make_init_cache` (or a step, or a copy of one) lies where the steps keep it; one built
  otherwise on several devices costs the step a second compilation.
  """
  batch, length = tokens.shape[0], tokens.shape[1] - 1
  step_fn = make_chunk_step(graphdef) if step_fn is None else step_fn
  padded = -(-length // chunk) * chunk
  if cache is None:
    cache = init_cache(graphdef, params, batch, padded if capacity is None else capacity,
                       init_fn=init_fn)
  for s in range(0, length, chunk):
    part = tokens[:, s:s + chunk + 1]
    n = part.shape[1] - 1
    if n < chunk:
      part = np.pad(part, ((0, 0), (0, chunk - n)))
    nll, cache = step_fn(params, cache, part[:, :-1], part[:, 1:], jnp.int32(start + s))
    out = np.asarray(nll)[:, :n]
    if progress is not None:
      progress.update(batch * n)
    yield s, out
  return cache


def stream_nll(graphdef, params, tokens: np.ndarray, chunk: int, *,
               step_fn: Callable | None = None, capacity: int | None = None,
               init_fn: Callable | None = None, progress=None) -> np.ndarray:
  """Per-position NLL [B, L] of `tokens` [B, L+1], streamed by `stream_chunks`."""
  out = np.empty((tokens.shape[0], tokens.shape[1] - 1), np.float32)
  for s, nll in stream_chunks(graphdef, params, tokens, chunk, step_fn=step_fn,
                              capacity=capacity, init_fn=init_fn, progress=progress):
    out[:, s:s + nll.shape[1]] = nll
  return out


def stream_with_cache(graphdef, params, tokens: np.ndarray, chunk: int, **kwargs):
  """(NLL [B, L], cache after the last position) of `tokens` [B, L+1], L a multiple of `chunk`
  (no padding enters the cache); `kwargs` as `stream_chunks`. With `cache` / `start` it continues
  a stream: eval/needle.py scores several continuations from copies of one prompt's cache."""
  if (tokens.shape[1] - 1) % chunk:
    raise ValueError(f"{tokens.shape[1] - 1} positions are not a multiple of the chunk {chunk}")
  parts, it = [], stream_chunks(graphdef, params, tokens, chunk, **kwargs)
  while True:
    try:
      parts.append(next(it)[1])
    except StopIteration as done:
      nll = np.concatenate(parts, axis=1) if parts else np.zeros((len(tokens), 0), np.float32)
      return nll, done.value


def make_one_shot_step(graphdef) -> shd.OnParamsMesh:
  """jit(params, tokens [B, L+1]) -> per-position NLL [B, L] fp32, one forward pass, no cache."""

  def fwd(params, tokens):
    logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])

  return shd.OnParamsMesh(fwd, batch_args=(0,))


def one_shot_nll(graphdef, params, tokens: np.ndarray) -> np.ndarray:
  """Per-position NLL [B, L] from a single forward pass without a cache (the reference)."""
  return np.asarray(make_one_shot_step(graphdef)(params, tokens))


def fill_rows(tokens: np.ndarray, rows: int) -> np.ndarray:
  """`tokens` [B, ...] filled up to `rows` rows with copies of its last row (scored, dropped)."""
  return np.concatenate([tokens, np.repeat(tokens[-1:], max(rows - len(tokens), 0), axis=0)])
