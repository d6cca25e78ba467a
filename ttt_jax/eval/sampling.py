"""Next-token choice: greedy at temperature 0, else sampling with temperature, top-k and top-p.

The order is Hugging Face's: logits / temperature, then the `top_k` most likely tokens, then of
those the smallest most-likely set whose probability (renormalised over the top-k) reaches
`top_p`. Tokens outside the allowed set get -inf. Ties at the cut-off are all kept. Every knob may
be a traced value, so one compiled decode loop serves every setting.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ttt_jax.config import ConfigError


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  """One-line ConfigError naming the first knob out of range."""
  if not (math.isfinite(temperature) and temperature >= 0):  # NaN and inf too
    raise ConfigError(f"--temperature={temperature} must be >= 0 (0 = greedy)")
  if int(top_k) != top_k or top_k < 0:
    raise ConfigError(f"--top_k={top_k} must be an integer >= 0 (0 = all tokens)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"--top_p={top_p} must be in (0, 1] (1 = all tokens)")


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
  """fp32 logits [B, V] -> logits / temperature with -inf outside the top-k / top-p set
  (top_k 0 = all V, top_p 1 = no nucleus cut; temperature <= 0 is treated as 1)."""
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  ranked = -jnp.sort(-scaled, axis=-1)  # descending
  k = jnp.clip(jnp.where(top_k > 0, top_k, v), 1, v)
  in_k = jnp.arange(v) < k
  probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  keep = in_k & ((before < top_p) | (top_p >= 1.0))
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  cut = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
  return jnp.where(scaled >= cut, scaled, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k,
                  top_p=1.0) -> jax.Array:
  """Token ids [B] from fp32 logits [B, V]: argmax at temperature <= 0 (the sort and the random
  draw are then skipped at run time), else a draw from `filter_logits`."""
  temperature = jnp.asarray(temperature, jnp.float32)

  def draw():
    filtered = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw,
                      lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))
