"""TTT-E2E streaming: read a sequence piece by piece, learning as its chunks complete.

The state between calls is an `E2ECache`. Its invariants, for a stream that has read positions
0 .. n-1 (n = `next_position(cache)`), with chunk size b:
  * every suffix KV window has `window + b` slots and keys are only ever shifted in, so its real
    keys are one run of consecutive positions ending at n - 1 (the layout attention's blocked
    path needs, see layers/attention.py `ordered_layout`);
  * `count` = n mod b positions of the pending chunk are read (0 < count <= b once n > 0: a
    chunk that has just completed stays pending until the next position arrives, because its
    loss needs that position's token as the last target); `buf_h[:, :count]` and
    `buf_tok[:, :count]` hold its suffix inputs and tokens;
  * `inner` holds each sequence's weights after the updates of all chunks before the pending one.
`check_continuation` checks the call against them in one place (a call must continue the stream
at position n with contiguous positions) and raises `StreamError` otherwise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ttt_jax.layers.attention import KVCache
from ttt_jax.models.e2e_inner import KV_AXES, SuffixRunner


class E2ECache(NamedTuple):
  """Streaming state of an E2E model (batch B, pending chunk of up to b positions)."""

  inner: Any  # nnx.State of per-sequence inner weights, leaves [B, ...]
  prefix: Any  # KVCache per prefix block (capacity = window); one stacked under scan_layers
  suffix: list  # KVCache per suffix block (capacity = window + b)
  buf_h: jax.Array  # [B, b, D] suffix inputs of the pending chunk
  buf_tok: jax.Array  # [B, b] int32 input tokens of the pending chunk
  count: jax.Array  # int32 scalar: positions of the pending chunk read so far, 0..b


class StreamError(ValueError):
  """A streaming call that does not continue its cache's stream."""


def next_position(cache: E2ECache) -> jax.Array:
  """The position the stream continues at: one past the newest key (0 for a fresh cache)."""
  return jnp.max(cache.suffix[0].pos) + 1


def _raise_discontinuity(expected, first, contiguous, count, b) -> None:
  if not contiguous:
    raise StreamError("E2E streaming: the positions of one call must be contiguous "
                      f"(first {int(first)})")
  raise StreamError(f"E2E streaming: this call starts at position {int(first)} but the cache has "
                    f"read positions 0..{int(expected) - 1} (pending chunk holds {int(count)} of "
                    f"{b}); continue at position {int(expected)}, or start a new cache")


def check_continuation(cache: E2ECache, positions: jax.Array, b: int, window: int) -> None:
  """Checks the invariants of the module docstring for a call reading `positions`.

  Shapes are checked while tracing (ValueError); positions at run time (`StreamError`, raised
  from a `jax.debug.callback` under a `lax.cond`: no cost unless it fires).
  """
  caps = {kv.pos.shape[-1] for kv in cache.suffix}
  if caps != {window + b} or cache.buf_tok.shape[-1] != b:
    raise ValueError(f"E2E cache does not match the model: suffix windows of {sorted(caps)} "
                     f"slots and a buffer of {cache.buf_tok.shape[-1]} (expected "
                     f"{window + b} and {b}); make it with model.init_cache(batch)")
  positions = positions.astype(jnp.int32)
  expected = next_position(cache)
  contiguous = jnp.all(positions == positions[0] + jnp.arange(positions.shape[0]))
  pending_ok = cache.count == jnp.where(expected == 0, 0, (expected - 1) % b + 1)
  ok = contiguous & (positions[0] == expected) & pending_ok
  jax.lax.cond(ok, lambda: None, lambda: jax.debug.callback(
      _raise_discontinuity, expected, positions[0], contiguous, cache.count, b))


def window_before_chunk(kv: KVCache, b: int) -> KVCache:
  """The KV window a chunk was read with, from a suffix window that ends with that chunk.

  When a chunk of b positions has just completed, its keys are the last b slots and the
  `window` slots before them are the window it saw. Slicing (not masking) keeps the real keys
  one contiguous run.
  """
  cap = kv.pos.shape[-1] - b
  return KVCache(kv.k[:, :cap], kv.v[:, :cap], kv.pos[:cap])


class _Carry(NamedTuple):
  inner: Any  # per-sequence inner weights
  kvs: list  # suffix KV windows
  buf_h: jax.Array  # [B, b + s, D] pending chunk inputs (padded by one segment)
  buf_tok: jax.Array  # [B, b + s]
  count: jax.Array  # positions of the pending chunk read
  done: jax.Array  # positions of this call read
  out: jax.Array  # [B, T + s, D] suffix outputs of this call


class ChunkReader:
  """Reads the T new positions of one call in segments of s = min(T, b) slots.

  A segment never crosses a chunk boundary. Before a segment that starts a new chunk, the
  completed (pending) chunk's update runs, under `lax.cond` so only when a chunk completes. The
  segment's last slots are padding (position -1) when fewer than s positions remain.
  """

  def __init__(self, runner: SuffixRunner, outer, e2e_cfg, lr, h, tokens, first_position):
    self.runner, self.outer = runner, outer
    self.b, self.clip, self.lr = e2e_cfg.mini_batch_size, e2e_cfg.inner_clip, lr
    self.t = tokens.shape[1]
    self.s = min(self.t, self.b)
    self.h = jnp.pad(h, ((0, 0), (0, self.s), (0, 0)))
    self.tokens = jnp.pad(tokens, ((0, 0), (0, self.s)))
    self.p0 = first_position.astype(jnp.int32)

  def _kv_axes(self, kvs):
    return [KV_AXES] * len(kvs)

  def learn(self, c: _Carry):
    """The pending chunk's SGD step; the first position of this call's remaining input is the
    target of the chunk's last position."""
    b = self.b
    start = self.p0 + c.done - b  # first position of the completed chunk
    views = [window_before_chunk(kv, b) for kv in c.kvs]
    nxt = jax.lax.dynamic_slice_in_dim(self.tokens, c.done, 1, axis=1)
    targets = jnp.concatenate([c.buf_tok[:, 1:b], nxt], axis=1)
    pos = start + jnp.arange(b, dtype=jnp.int32)

    def one(inner, kvs, h, tgt):
      ones = jnp.ones(tgt.shape, jnp.float32)
      return self.runner.inner_step(inner, self.outer, kvs, h, pos, tgt, ones, self.lr,
                                    self.clip)[0]

    return jax.vmap(one, in_axes=(0, self._kv_axes(views), 0, 0))(
        c.inner, views, c.buf_h[:, :b], targets)

  def segment(self, c: _Carry, _=None):
    full = (c.count == self.b) & (c.done < self.t)
    c = c._replace(inner=jax.lax.cond(full, lambda: self.learn(c), lambda: c.inner),
                   count=jnp.where(full, 0, c.count))
    s = self.s
    take = jnp.minimum(jnp.minimum(self.b - c.count, self.t - c.done), s)
    hs = jax.lax.dynamic_slice_in_dim(self.h, c.done, s, axis=1)
    ts = jax.lax.dynamic_slice_in_dim(self.tokens, c.done, s, axis=1)
    slot = jnp.arange(s, dtype=jnp.int32)
    pos = jnp.where(slot < take, self.p0 + c.done + slot, -1)
    read = jax.vmap(lambda w, kvs, hs: self.runner.hidden(w, self.outer, hs, pos, kvs, take),
                    in_axes=(0, self._kv_axes(c.kvs), 0), out_axes=(0, self._kv_axes(c.kvs)))
    h_out, kvs = read(c.inner, c.kvs, hs)
    update = jax.lax.dynamic_update_slice_in_dim
    return _Carry(
        inner=c.inner, kvs=kvs,
        buf_h=update(c.buf_h, hs.astype(c.buf_h.dtype), c.count, axis=1),
        buf_tok=update(c.buf_tok, ts.astype(jnp.int32), c.count, axis=1),
        count=c.count + take, done=c.done + take,
        out=update(c.out, h_out.astype(c.out.dtype), c.done, axis=1)), None

  def run(self, cache: E2ECache, prefix) -> tuple[jax.Array, E2ECache]:
    """(suffix outputs [B, T, D], the cache after this call)."""
    s, b = self.s, self.b
    n_seg = -(-self.t // s) + (0 if self.t == 1 else 1)
    c = _Carry(cache.inner, cache.suffix, jnp.pad(cache.buf_h, ((0, 0), (0, s), (0, 0))),
               jnp.pad(cache.buf_tok, ((0, 0), (0, s))), cache.count,
               jnp.zeros((), jnp.int32), jnp.zeros_like(self.h))
    c, _ = jax.lax.scan(self.segment, c, None, length=n_seg)
    new = E2ECache(c.inner, prefix, c.kvs, c.buf_h[:, :b], c.buf_tok[:, :b], c.count)
    return c.out[:, :self.t], new
