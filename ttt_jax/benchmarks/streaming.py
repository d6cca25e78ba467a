"""Prefill / decode latency and streaming memory through the model contract.

Every model is run the way long-context evaluation and generation run it: one jitted chunk step
`(params, cache, tokens [1, c], positions [c]) -> (last logits, cache)` fed chunk after chunk
(the cache is donated, so it is updated in place), then single-token decode steps from the
prefilled cache. Full attention gets a KV capacity of the whole context; SWA and E2E keep their
window; TTT layers keep their hidden state.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.benchmarks.common import Size, interleaved, memory_stats, model_config
from ttt_jax.benchmarks.training import _failure
from ttt_jax.models import build_model


class Streamer:
  """Compiled chunk and decode steps of one model kind (compiled once per cache shape)."""

  def __init__(self, kind: str, size: Size, seed: int = 0):
    self.kind = kind
    self.size = size
    cfg = model_config(kind, size)
    self.model_cfg = cfg.model
    self.graphdef, self.params = nnx.split(build_model(cfg.model, seed))
    self.chunk = size.e2e_chunk
    self._compiled: dict = {}

    def step(params, cache, tokens, positions):
      logits, cache = nnx.merge(self.graphdef, params)(tokens, positions, cache)
      return logits[:, -1], cache

    self._step = jax.jit(step, donate_argnums=1)

  def capacity(self, length: int) -> int:
    return length + self.size.decode_steps

  def init_cache(self, length: int):
    model = nnx.merge(self.graphdef, self.params)
    return jax.jit(lambda: model.init_cache(1, self.capacity(length)))()

  def abstract_cache(self, length: int):
    model = nnx.merge(self.graphdef, self.params)
    return jax.eval_shape(lambda: model.init_cache(1, self.capacity(length)))

  def compiled(self, length: int, width: int):
    """The step for `width` new tokens with the cache of context `length` (+ its memory)."""
    cache = self.abstract_cache(length)
    key = (width, str(jax.tree.map(lambda a: (a.shape, a.dtype), cache)))
    if key not in self._compiled:
      tokens = jax.ShapeDtypeStruct((1, width), jnp.int32)
      positions = jax.ShapeDtypeStruct((width,), jnp.int32)
      compiled = self._step.lower(self.params, cache, tokens, positions).compile()
      cache_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                        for a in jax.tree.leaves(cache))
      self._compiled[key] = (compiled, dict(memory_stats(compiled), cache_bytes=cache_bytes))
    return self._compiled[key]

  def prefill_fn(self, length: int, tokens: np.ndarray):
    """(setup, run): setup makes a fresh cache (untimed); run streams all chunks."""
    c = self.chunk
    if length % c:
      raise ValueError(f"context length {length} must be a multiple of the chunk {c}")
    compiled, _ = self.compiled(length, c)
    chunks = [jnp.asarray(tokens[None, i:i + c]) for i in range(0, length, c)]
    pos = [jnp.arange(i, i + c, dtype=jnp.int32) for i in range(0, length, c)]

    def run(cache):
      out = None
      for tok, p in zip(chunks, pos, strict=True):
        out, cache = compiled(self.params, cache, tok, p)
      return out, cache

    return (lambda: self.init_cache(length)), run

  def decode_fn(self, length: int, prefilled, steps: int):
    """(setup, run): setup copies the prefilled cache; run decodes `steps` tokens greedily."""
    compiled, _ = self.compiled(length, 1)

    def run(cache):
      tok = jnp.zeros((1, 1), jnp.int32)
      for j in range(steps):
        logits, cache = compiled(self.params, cache, tok, jnp.full((1,), length + j, jnp.int32))
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
      return tok, cache

    return (lambda: jax.tree.map(jnp.copy, prefilled)), run


def _timed(pairs: dict, repeats: int, warmup: int, echo) -> dict:
  """interleaved() over (setup, run) pairs: only `run` is inside the timed region."""
  return interleaved({k: run for k, (_, run) in pairs.items()}, repeats, warmup, echo,
                     setups={k: setup for k, (setup, _) in pairs.items()})


def bench_streaming(size: Size, kinds, lengths, *, prefill: bool, decode: bool,
                    echo=print) -> dict:
  """Prefill and/or decode latency per token at each context length, interleaved over kinds."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (max(lengths),), dtype=np.int32)
  streamers, results = {}, {k: {} for k in kinds}
  for kind in kinds:
    try:
      streamers[kind] = Streamer(kind, size)
    except Exception as e:  # noqa: BLE001
      results[kind] = _failure(kind, e, echo)
  for length in lengths:
    echo(f"streaming: context {length}")
    pairs, compile_s = {}, {}
    for kind, s in list(streamers.items()):
      try:
        t0 = time.perf_counter()
        pairs[kind] = s.prefill_fn(length, tokens)
        if decode:
          s.compiled(length, 1)
        compile_s[kind] = time.perf_counter() - t0
      except Exception as e:  # noqa: BLE001
        results[kind] = _failure(kind, e, echo)
        del streamers[kind]
    if not pairs:
      continue
    for kind in pairs:
      entry = results[kind].setdefault(str(length), {})
      entry["compile_s"] = compile_s[kind]
      entry["memory"] = streamers[kind].compiled(length, streamers[kind].chunk)[1]
    if prefill:
      for kind, t in _timed(pairs, size.repeats, size.warmup, echo).items():
        results[kind][str(length)]["prefill"] = dict(t, per_token_s=t["median_s"] / length)
    if decode:
      dec = {}
      for kind, (setup, run) in pairs.items():
        _, cache = jax.block_until_ready(run(setup()))  # untimed prefill
        try:
          dec[kind] = streamers[kind].decode_fn(length, cache, size.decode_steps)
          jax.block_until_ready(dec[kind][1](dec[kind][0]()))  # compile check
        except Exception as e:  # noqa: BLE001
          results[kind][str(length)]["decode"] = _failure(kind, e, echo)
          dec.pop(kind, None)
      steps = size.decode_steps
      for kind, t in _timed(dec, size.repeats, size.warmup, echo).items():
        results[kind][str(length)]["decode"] = dict(t, steps=steps,
                                                    per_token_s=t["median_s"] / steps)
  return {"lengths": list(lengths), "chunk": size.e2e_chunk, "kinds": results,
          "ratios": streaming_ratios(results, lengths)}


def streaming_ratios(results: dict, lengths) -> dict:
  """Constant-latency ratio (longest / shortest) per kind, and speedups over full attention."""
  lo, hi = str(min(lengths)), str(max(lengths))
  out: dict = {}
  for phase in ("prefill", "decode"):
    per = {}
    for kind, r in results.items():
      a, b = r.get(lo, {}).get(phase, {}), r.get(hi, {}).get(phase, {})
      if "per_token_s" in a and "per_token_s" in b:
        per[kind] = {"longest_over_shortest": b["per_token_s"] / a["per_token_s"],
                     "per_token_s_longest": b["per_token_s"]}
    full = per.get("transformer", {}).get("per_token_s_longest")
    if full:
      for p in per.values():
        p["speedup_over_full_attention_at_longest"] = full / p["per_token_s_longest"]
    out[phase] = per
  return out


def stream_memory(size: Size, kinds, lengths, echo=print) -> dict:
  """Compile-only memory of the streaming chunk step at each context length."""
  out: dict = {}
  for kind in kinds:
    try:
      s = Streamer(kind, size)
      out[kind] = {str(n): s.compiled(n, s.chunk)[1] for n in lengths}
    except Exception as e:  # noqa: BLE001
      out[kind] = _failure(kind, e, echo)
  return out
