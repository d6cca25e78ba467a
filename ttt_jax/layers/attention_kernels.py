"""Attention through library kernels: `jax.nn.dot_product_attention` (XLA or cuDNN flash) and the
TPU splash-attention Pallas kernel, behind `model.attention_impl`.

  blockwise  this package's own exact JAX code (layers/attention.py; its algorithm is
             `model.attention_algorithm`);
  xla        `jax.nn.dot_product_attention(implementation='xla')`;
  cudnn      the same with cuDNN's fused flash attention (GPU, bfloat16/float16 compute);
  splash     `jax.experimental.pallas.ops.tpu.splash_attention` (TPU; one-shot inputs only, calls
             with a KV cache use the package's own code);
  auto       cudnn on a GPU with 16-bit compute, splash on a TPU, blockwise elsewhere.
TTT-E2E's inner loop runs its suffix blocks' attention per sequence (under `jax.vmap`) and
differentiates it twice (meta-learning): cuDNN's and splash's kernels have neither a batching
rule for that nor a second derivative, so the inner loop takes its own impl,
`model.e2e.inner_attention_impl` (`resolve_inner_impl`): auto = xla on a GPU or TPU (plain XLA
ops: batched and differentiated to any order), blockwise elsewhere.
One-shot inputs (keys = queries) use the kernels' causal / local-window masks, which never
materialize a [T, T] mask; calls against a KV cache pass the position-derived boolean mask.
An impl that cannot run where it is asked fails at model construction, in one line naming the
knob (`ConfigError`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from ttt_jax.config import ConfigError
from ttt_jax.layers import common
from ttt_jax.layers.common import target_platform

_HALF = (jnp.bfloat16, jnp.float16)


def resolve_impl(impl: str, compute_dtype, platform: str | None = None) -> str:
  """The concrete impl for `model.attention_impl` on this backend (ConfigError if impossible)."""
  platform = target_platform() if platform is None else platform
  half = jnp.dtype(compute_dtype) in tuple(jnp.dtype(d) for d in _HALF)
  if impl == "auto":
    if platform == "gpu" and half:
      return "cudnn"
    return "splash" if platform == "tpu" else "blockwise"
  if impl == "cudnn" and platform != "gpu":
    raise ConfigError(f"model.attention_impl='cudnn' needs a GPU; this process runs on "
                      f"{platform}: use auto, xla or blockwise")
  if impl == "cudnn" and not half:
    raise ConfigError("model.attention_impl='cudnn' needs model.compute_dtype='bfloat16' "
                      f"(got {jnp.dtype(compute_dtype).name}); use auto or xla for float32")
  if impl == "splash" and platform != "tpu":
    raise ConfigError(f"model.attention_impl='splash' needs a TPU; this process runs on "
                      f"{platform}: use auto, xla or blockwise")
  return impl


def resolve_inner_impl(impl: str, platform: str | None = None) -> str:
  """The concrete impl of `model.e2e.inner_attention_impl` (auto | blockwise | xla) here."""
  platform = target_platform() if platform is None else platform
  if impl == "auto":
    return "xla" if platform in ("gpu", "tpu") else "blockwise"
  return impl


def resolve_cache_impl(impl: str, platform: str | None = None) -> str:
  """`model.cache_attention_impl` here: 'pallas' (layers/cache_attention.py's Triton kernel) or
  'inherit' (whatever `model.attention_impl` does against a cache). auto = pallas on a GPU, at
  any head dim (one that is not a Triton block dimension runs padded: `common.padded_dim`; on
  a mesh, each device runs it on its shard of sequences and heads: `sharding.per_shard`), where
  this JAX has Pallas' Triton backend (`common.triton`)."""
  platform = target_platform() if platform is None else platform
  if impl == "auto":
    return "pallas" if platform == "gpu" and common.pltriton is not None else "inherit"
  if impl == "pallas" and platform == "tpu":
    raise ConfigError("model.cache_attention_impl='pallas' is a GPU (Triton) kernel; use auto or "
                      "inherit on a TPU")
  if impl == "pallas":
    common.triton("model.cache_attention_impl")
  return impl


def library_attention(q, k, v, q_pos, k_pos, window: int | None, *, impl: str,
                      one_shot: bool) -> jax.Array:
  """`jax.nn.dot_product_attention` with this package's masking. q [B,Tq,H,d], k/v [B,Tk,Hkv,d]
  (grouped-query attention natively when Hkv < H)."""
  if one_shot:
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation=impl)
  qp, kp = q_pos[:, None], k_pos[None, :]
  mask = (kp <= qp) & (kp >= 0)
  if window is not None:
    mask &= (qp - kp) < window
  return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation=impl)


def splash_block(t: int) -> int | None:
  """The largest splash block (512, 256 or 128 rows) dividing `t`, or None."""
  return next((b for b in (512, 256, 128) if t % b == 0), None)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, heads: int, window: int | None, interpret: bool):
  """Cached per shape, so built with concrete arrays: made during one jit trace, its mask info
  must not hold that trace's values when another trace reuses it."""
  with jax.ensure_compile_time_eval():
    return _make_splash_kernel(t, heads, window, interpret)


def _make_splash_kernel(t: int, heads: int, window: int | None, interpret: bool):
  shape = (t, t)
  one = (splash_mask.CausalMask(shape) if window is None
         else splash_mask.LocalMask(shape, (window - 1, 0), offset=0))
  b = splash_block(t)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=sizes,
                                head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, window: int | None, *, interpret: bool = False) -> jax.Array:
  """One-shot causal (optionally local) attention with the splash kernel. q [B, T, H, d], k/v
  [B, T, Hkv, d] (the kernel groups query heads itself); T a multiple of 128 (`splash_block`)."""
  _, t, h, d = q.shape
  if splash_block(t) is None:
    raise ConfigError(f"model.attention_impl='splash' needs sequence lengths that are multiples "
                      f"of 128 (got {t}); use auto or blockwise")
  kernel = _splash_kernel(t, h, window, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, T, d]
  scale = np.float32(d ** -0.5).astype(q.dtype)
  out = jax.vmap(kernel)(heads_first(q) * scale, heads_first(k), heads_first(v))
  return heads_first(out).astype(v.dtype)
