"""Model FLOPs per training token and the device's peak FLOP/s: the `mfu` of training logs.

MFU = model FLOPs per token x tokens/s / (peak FLOP/s per device x devices). The model FLOPs are
the standard 6·N (+ attention) count; the peak is a data-sheet figure for known accelerators
(dense, no sparsity) or, on CPU, the measured throughput of one large matmul (the "matmul
ceiling" that `make bench` also reports).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections

from ttt_jax.layers.mixers import mixer_spec
from ttt_jax.models.config import model_config
from ttt_jax.models.lm import padded_vocab

# Dense peak FLOP/s per chip from the vendors' data sheets: (bfloat16, float32 matmuls). float32
# on NVIDIA tensor cores is the TF32 rate (XLA's default precision for float32 dots on GPU).
# Matched against `jax.devices()[0].device_kind` by substring, longest key first.
PEAK_FLOPS = {
    "H200": (989e12, 495e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v6": (918e12, None),
    "TPU v5p": (459e12, None),
    "TPU v5 lite": (197e12, None),
    "TPU v5e": (197e12, None),
    "TPU v4": (275e12, None),
    "TPU v3": (123e12, None),
}


def attended_keys(seq_len: int, window: int | None) -> float:
  """Mean number of keys a causal query attends to (within `window` if given)."""
  if window is None or window >= seq_len:
    return (seq_len + 1) / 2
  w = window
  # positions 0..w-1 see t+1 keys, the rest see w keys
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def train_flops_per_token(config: ml_collections.ConfigDict, n_params: int) -> float:
  """Model FLOPs of one training token: 6·N (N without an untied embedding lookup table; the
  output head's matmul always counts) plus
  3 x 4·D·(mean attended keys) per attention layer (QK^T and PV, forward + backward).

  TTT inner-loop work and E2E's inner gradient / meta backward are not counted: for those
  kinds this is the cost of the equally sized Transformer, so their MFU reads as 'useful work
  at Transformer cost' (XLA's own count is reported beside it by `make bench`).
  """
  m = config.model
  # the lookup table is no matmul, but the output head is one: a tied model's only table is
  # also its head (N counts it once), so it stays in; an untied model drops its lookup table
  n = n_params - (0 if m.tie_embeddings else padded_vocab(m.vocab_size) * m.d_model)
  attn = 0.0
  window = mixer_spec(m.mixer).attention_window
  if window is not None:
    keys = attended_keys(config.data.seq_len, window(model_config(m)))
    attn = 3 * 4 * m.d_model * keys * m.num_layers
  return 6 * n + attn


def measured_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` n x n @ n x n products on the default device."""
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)
  mm = jax.jit(jnp.dot).lower(a, b).compile()
  mm(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    mm(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_flops_per_device(dtype: str = "float32", device=None) -> tuple[float | None, str]:
  """(peak FLOP/s of one device for `dtype` matmuls, where the figure comes from).

  Known accelerators: the data-sheet table; CPU: the measured matmul ceiling; otherwise None.
  """
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return measured_matmul_flops(dtype), "measured matmul (cpu)"
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      peak = PEAK_FLOPS[name][0 if dtype == "bfloat16" else 1]
      return peak, f"data sheet ({name})"
  return None, f"unknown device {kind!r}"
