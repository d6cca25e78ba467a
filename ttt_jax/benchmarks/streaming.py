"""Prefill / decode latency and streaming memory through the model contract.

Every model is run the way long-context evaluation and generation run it: one jitted chunk step
`(params, cache, tokens [1, c], positions [c]) -> (last logits, cache)` fed chunk after chunk
(the cache is donated, so it is updated in place), then single-token decode steps from the
prefilled cache. Full attention gets a KV capacity of the whole context; SWA and E2E keep their
window; TTT layers keep their hidden state.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.benchmarks.common import (
  Size,
  error_record,
  interleaved,
  memory_stats,
  model_config,
)
from ttt_jax.benchmarks.training import _failure
from ttt_jax.models import build_model, gpu_rng_kernels

# kinds that are another kind with model overrides: full attention against its cache through
# model.attention_impl's path (on a GPU: cuDNN with a [chunk, capacity] mask over every slot)
# instead of the Triton kernel that reads only the filled blocks
STREAM_ALIASES = {"transformer-masked": ("transformer", {"cache_attention_impl": "inherit"}),
                  # TTT-Linear streaming through the dual form (a GPU's default: its kernels)
                  "ttt_linear-dual": ("ttt_linear", {"ttt.impl": "dual"})}


class Streamer:
  """Compiled chunk and decode steps of one model kind (compiled once per cache shape)."""

  def __init__(self, kind: str, size: Size, seed: int = 0):
    self.kind = kind
    self.size = size
    base, overrides = STREAM_ALIASES.get(kind, (kind, None))
    cfg = model_config(base, size, overrides=overrides)
    self.model_cfg = cfg.model
    with gpu_rng_kernels():  # the random draws lowered as in Trainer.init_state
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


# tile / launch settings of the cache-attention kernel timed beside its defaults
KERNEL_SETTINGS = {"kernel": {}, "kernel q128/w8": {"block_q": 128, "num_warps": 8},
                   "kernel k128": {"block_k": 128}, "kernel stages3": {"num_stages": 3}}


def bench_cache_attention(capacity: int, chunk: int, heads: int, head_dim: int, *,
                          fills=(0.5, 1.0), repeats: int = 5, echo=print) -> dict:
  """One attention call of `chunk` queries (and of one decode query) against a full-attention
  cache of `capacity` slots filled to each fraction in `fills`, bf16: the Triton kernel
  (layers/cache_attention.py) at each of `KERNEL_SETTINGS`, against the path it replaces on a
  GPU (cuDNN with the position mask over every slot) and an fp32 dense reference (the error is
  the largest element error over the largest element)."""
  from ttt_jax.layers.attention_kernels import library_attention  # noqa: PLC0415
  from ttt_jax.layers.cache_attention import filled_attention_pallas  # noqa: PLC0415

  keys = jax.random.split(jax.random.key(0), 3)
  shape = (1, capacity, heads, head_dim)
  k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys[:2])
  out: dict = {}
  for fill in fills:
    for tq in (chunk, 1):
      end = int(capacity * fill)
      q = jax.random.normal(keys[2], (1, tq, heads, head_dim), jnp.bfloat16)
      q_pos = jnp.arange(end - tq, end, dtype=jnp.int32)
      k_pos = jnp.where(jnp.arange(capacity) < end, jnp.arange(capacity), -1).astype(jnp.int32)
      args = (q, k, v, q_pos, k_pos)
      fns = {name: jax.jit(functools.partial(filled_attention_pallas, end=end, **s))
             for name, s in KERNEL_SETTINGS.items()}
      fns["cudnn, masked"] = jax.jit(functools.partial(library_attention, window=None,
                                                       impl="cudnn", one_shot=False))
      ref = library_attention(*(x.astype(jnp.float32) for x in args[:3]), q_pos, k_pos, None,
                              impl="xla", one_shot=False)
      row, timed = {}, {}
      for name, fn in fns.items():
        try:
          got = fn(*args).astype(jnp.float32)
          row[name] = {"rel_err": float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))}
          timed[name] = functools.partial(fn, *args)
        except Exception as e:  # noqa: BLE001
          row[name] = error_record(e, 200)
      flops = 4 * tq * end * heads * head_dim  # q.k and p.v over the filled slots
      for name, t in interleaved(timed, repeats, 2, echo).items():
        row[name].update(median_s=t["median_s"], tflops_per_s=flops / t["median_s"] / 1e12)
      out[f"{'prefill' if tq > 1 else 'decode'} at {end}"] = row
      echo(f"cache attention, {tq} queries, {end} of {capacity} slots: {row}")
  return out
