"""8-bit weights for decoding: every matrix stored as 8-bit codes with a float32 scale and offset
per group of input weights; activations and everything else stay float32.

A batch-1 decode step reads every weight of the model once, so its speed is the speed of reading
the weights: 8-bit codes read a quarter of float32's bytes. `quantize_model(model)` replaces, in
place, each projection (`nnx.Linear`), SwiGLU MLP and the embedding table / LM head by an 8-bit
copy; weights that keep training at test time (TTT-E2E's prime MLPs, `InnerParam`) stay float,
and so do LoRA-wrapped projections, base and factors (fold adapters in first: lora.merge_lora).

Format: along each output channel's row of K input weights, every group of GROUP = 32
consecutive weights (the whole row where 32 does not divide K) is stored as
w = scale · q + offset, q ∈ {0..255}, offset = the group's minimum, scale = (max − min) / 255 (or
max |w| / 127 where that reconstructs the group better, see `quantize`); each weight is within
scale / 2 of its original. Where every group of a matrix holds exactly 16 evenly spaced levels, the
matrix is stored in 4 bits instead (`quantize4`: two codes a byte, 0.75 bytes a weight with the
scale and offset, against 1.25). Why affine groups of 32: GGUF's blocks are groups of the same 32
weights; the 15 steps of its affine 4-bit blocks (Q4_1) divide the 255 steps here (GGUF's quantizer
maps each block's minimum and maximum to the end levels), and its symmetric 8-bit levels (Q8_0) are
the second step, so those blocks come back exactly (to float32 rounding); other GGUF types (Q4_0,
Q5_0/Q5_1, the K-quants) come back within half a step. Measured on SmolLM2-135M (Q4_1 blocks, Q8_0
embedding table), the median relative logit error against float32 was 3.5% with one symmetric scale
per row, 2.9% symmetric per group of 32, and 1.6% with bfloat16 weights (docs/pretrained.md has this
format's).

Products with at most `KERNEL_MAX_ROWS` activation rows (decode steps, short prompt chunks) run
on CPU in the package's C++ kernel (layers/csrc/int8_matmul.cc via layers/cpu_kernel.py), which
widens the codes to float32 in registers; larger ones (long prompt chunks) and other platforms
widen the weights with XLA and multiply: the same result to float rounding, but a float32 copy
of the weights is written to memory at every call. 8-bit weights pay off for CPU decoding; on
GPU/TPU `decode_model` warns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.layers.common import target_platform
from ttt_jax.layers.cpu_kernel import int8_matmul_target
from ttt_jax.layers.mlp import SwiGLU

# The kernel widens each block of weights once per tile of activation rows; past some hundred rows
# XLA's widen-then-multiply wins. SmolLM2-135M, a forward pass of T tokens on 2 cores (kernel /
# XLA): T = 32: 44 / 181 ms, 128: 203 / 266 ms, 512: 1012 / 572 ms (float32 weights: 41, 111,
# 528 ms).
KERNEL_MAX_ROWS = 128
GROUP = 32  # weights per (scale, offset) along the input axis, as GGUF's blocks
EXACT = 4e-7  # 4-bit where every group's largest error is this x its largest magnitude
LEVELS = 255


class Int8Param(nnx.Param):
  """8-bit codes of a weight, or their scales and offsets (decode only: never trained)."""


def group_size(k: int) -> int:
  """Weights per group along a row of K: GROUP where it divides K, else the whole row."""
  return GROUP if k % GROUP == 0 else k


def _row_groups(w, size: int) -> np.ndarray:
  """w [..., K, N] -> float32 [..., N, K / size, size]: each output channel's row of K input
  weights in groups of `size`."""
  w = np.swapaxes(np.asarray(jax.device_get(w), np.float32), -1, -2)  # [..., N, K]
  return w.reshape(*w.shape[:-1], w.shape[-1] // size, size)


def _codes(groups: np.ndarray, scale: np.ndarray, offset: np.ndarray, top: int):
  """(codes in 0..top as floats, largest reconstruction error) of each group for a given scale
  and offset."""
  q = np.clip(np.rint((groups - offset[..., None]) / scale[..., None]), 0, top)
  err = np.abs(q * scale[..., None] + offset[..., None] - groups).max(axis=-1)
  return q, err


def quantize(w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """w [..., K, N] (y = x·w) -> (q [..., N, K] uint8, scale, offset [..., N, K / G] float32),
  G = group_size(K): each output channel's row of K codes contiguous, as the kernel reads it.

  Each group takes the better (smaller largest error) of two steps from its minimum: its range
  over 255 (the finest; exact for 16-level blocks spanning their levels, GGUF's Q4_1) or
  its largest magnitude over 127 (exact for symmetric 8-bit blocks such as GGUF's Q8_0)."""
  k = np.shape(w)[-2]
  groups = _row_groups(w, group_size(k))
  lo, hi = groups.min(axis=-1), groups.max(axis=-1)
  amax = np.maximum(np.abs(lo), np.abs(hi))
  fine = np.where(hi > lo, (hi - lo) / LEVELS, 1.0).astype(np.float32)
  symmetric = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
  q, err = _codes(groups, fine, lo, LEVELS)
  q_sym, err_sym = _codes(groups, symmetric, lo, LEVELS)
  use_sym = err_sym < err
  q = np.where(use_sym[..., None], q_sym, q).astype(np.uint8)
  scale = np.where(use_sym, symmetric, fine)
  return q.reshape(*groups.shape[:-2], k), scale, lo.astype(np.float32)


def quantize4(w) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """w [..., K, N] -> (q [..., N, K / 32, 16] uint8: 4-bit codes, two a byte; scale, offset
  [..., N, K / 32]) where every group of 32 input weights is exactly 16 evenly spaced levels
  (to float32 rounding: GGUF's Q4_1 blocks); None otherwise (`quantize` then keeps 8 bits).
  Byte j of a group holds weight j's code in its low half and weight j + 16's in its high half."""
  if np.shape(w)[-2] % GROUP:
    return None
  groups = _row_groups(w, GROUP)
  lo, hi = groups.min(axis=-1), groups.max(axis=-1)
  scale = np.where(hi > lo, (hi - lo) / 15, 1.0).astype(np.float32)
  q, err = _codes(groups, scale, lo, 15)
  if not np.all(err <= EXACT * np.maximum(np.abs(lo), np.abs(hi))):  # NaN and inf fail too
    return None
  q = q.astype(np.uint8)
  return q[..., :16] | (q[..., 16:] << 4), scale, lo.astype(np.float32)


def widen(q: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """Codes q [..., N, K] (8-bit) or [..., N, K / 32, 16] (4-bit) with scale, offset
  [..., N, K / G] -> float32 rows [..., N, K]."""
  if q.ndim == scale.ndim + 1:  # 4-bit: low halves are weights 0..15 of a group, high 16..31
    q = jnp.concatenate([q & 15, q >> 4], axis=-1)
  groups = q.reshape(*scale.shape, -1).astype(jnp.float32)
  return (groups * scale[..., None] + offset[..., None]).reshape(*scale.shape[:-1], -1)


def dequantize(q: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """The float32 weights [..., K, N] that (q, scale, offset) stand for."""
  return jnp.swapaxes(widen(q, scale, offset), -1, -2)


def _use_kernel(x: jax.Array, scale: jax.Array) -> bool:
  rows = math.prod(x.shape[:-1])
  return target_platform() == "cpu" and 0 < rows <= KERNEL_MAX_ROWS and scale.ndim == 2


@jax.custom_vjp
def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """x [..., K] · W -> [..., N] in float32, W given by `quantize` (q [N, K] or, 4-bit,
  [N, K / 32, 16]; scale, offset).
  Differentiable in x (TTT-E2E's inner steps differentiate through frozen layers); the stored
  weights get zero cotangents."""
  x = x.astype(jnp.float32)
  if _use_kernel(x, scale):
    target = int8_matmul_target()
    if target is not None:
      out = jax.ShapeDtypeStruct((*x.shape[:-1], q.shape[0]), jnp.float32)
      return jax.ffi.ffi_call(target, out, vmap_method="sequential")(x, q, scale, offset)
  # Widen where the product is: tied to x, the widening is not loop-invariant, so XLA does not
  # hoist it out of generation's while loops, where it wrote every weight in float32 at every
  # call even when the loop body never ran (SmolLM2-135M, a 1-token prompt: 121 ms a call
  # against 30 ms for float32 weights).
  q, _ = jax.lax.optimization_barrier((q, x))
  return jnp.einsum("...k,nk->...n", x, widen(q, scale, offset))


def _int8_matmul_fwd(x, q, scale, offset):
  return int8_matmul(x, q, scale, offset), (jnp.zeros((), x.dtype), q, scale, offset)


def _int8_matmul_bwd(res, g):
  like_x, q, scale, offset = res  # like_x: x's dtype
  dx = jnp.einsum("...n,nk->...k", g, widen(q, scale, offset)).astype(like_x.dtype)
  return (dx, np.zeros(q.shape, jax.dtypes.float0), jnp.zeros_like(scale),
          jnp.zeros_like(offset))


int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


class Int8Weight(nnx.Module):
  """A matrix [..., K, N] stored by `quantize4` where that is exact, else by `quantize`;
  `self(x)` is x·W."""

  def __init__(self, w):
    q, scale, offset = quantize4(w) or quantize(w)
    self.q, self.scale, self.offset = (Int8Param(jnp.asarray(a)) for a in (q, scale, offset))

  def __call__(self, x: jax.Array) -> jax.Array:
    return int8_matmul(x, self.q[...], self.scale[...], self.offset[...])


class Int8Linear(nnx.Module):
  """`nnx.Linear` with its kernel stored 8-bit: y = x·W (+ b)."""

  def __init__(self, base: nnx.Linear):
    self.weight = Int8Weight(base.kernel[...])
    self.bias = None if base.bias is None else nnx.Param(base.bias[...].astype(jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.weight(x)
    return y if self.bias is None else y + self.bias[...]


class Int8SwiGLU(nnx.Module):
  """layers/mlp.SwiGLU with its three matrices stored 8-bit."""

  def __init__(self, base: SwiGLU):
    self.w1, self.w2, self.w3 = (Int8Weight(getattr(base, n)[...]) for n in ("w1", "w2", "w3"))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Int8Embed(nnx.Module):
  """An embedding table [V, D] stored 8-bit along each token's row: looked up by token and,
  tied, contracted with the final hidden state for the logits."""

  def __init__(self, base: nnx.Embed):
    self.table = Int8Weight(np.asarray(jax.device_get(base.embedding[...])).T)  # rows = tokens

  def lookup(self, tokens: jax.Array) -> jax.Array:
    t = self.table
    return widen(*(jnp.take(v[...], tokens, axis=0) for v in (t.q, t.scale, t.offset)))

  def attend(self, h: jax.Array) -> jax.Array:
    return self.table(h)


def _plain(var) -> bool:
  """A frozen float weight (not one that trains at test time, not an adapter)."""
  return type(var) is nnx.Param


def quantize_model(model: nnx.Module) -> list[str]:
  """Stores `model`'s matrices 8-bit, in place (module docstring). Returns the replaced module
  paths. A model built with `scan_layers` keeps the leading layers axis on the stored arrays."""
  edits = []
  for path, module in nnx.iter_modules(model):
    for name, value in list(vars(module).items()):
      if isinstance(value, nnx.Linear) and _plain(value.kernel):
        edits.append((path, module, name, Int8Linear, value))
      elif isinstance(value, SwiGLU) and _plain(value.w1):
        edits.append((path, module, name, Int8SwiGLU, value))
      elif isinstance(value, nnx.Embed) and _plain(value.embedding):
        edits.append((path, module, name, Int8Embed, value))
      elif name == "head" and _plain(value):
        edits.append((path, module, name, lambda v: Int8Weight(v[...]), value))
  for _, module, name, make, value in edits:
    setattr(module, name, make(value))
  return sorted("/".join(map(str, (*path, name))) for path, _, name, _, _ in edits)
