"""Causal multi-head attention: full or sliding-window, RoPE, optional qk-norm, KV state.

A sequence mixer (layers/mixers.py: the `SequenceMixer` protocol): registered as 'full' and
'swa' (`model.mixer`) at the end of this module.

The KV state is a fixed-capacity window of the most recent keys/values with their absolute
positions (empty slots hold position -1). Sliding-window attention (capacity = window) shifts
new keys in at the end; full attention (capacity = the longest context to be streamed, which it
must not exceed) fills its slots left to right in place, so a decode step copies nothing.
Keys are cached after qk-norm *and* RoPE: RoPE at absolute positions
makes q·k depend only on the distance, so rotating each key once when it enters is exact, and a
decode step costs O(1) rotations instead of re-rotating the whole cache.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.layers.attention_kernels import (
  library_attention,
  resolve_cache_impl,
  resolve_impl,
  splash_attention,
  splash_block,
)
from ttt_jax.layers.attention_remat import remat_blocked_attention, xla_dense
from ttt_jax.layers.cache_attention import (
  NEG_INF,
  PALLAS_BLOCK_K,
  check_capacity,
  filled_attention,
  filled_attention_pallas,
  online_softmax_step,
)
from ttt_jax.layers.common import dtype, linear, target_platform
from ttt_jax.layers.mixers import MixerSpec, ModelCfg, register_mixer
from ttt_jax.layers.norms import RMSNorm
from ttt_jax.layers.rope import apply_rope
from ttt_jax.sharding import per_shard


class KVCache(NamedTuple):
  k: jax.Array  # [B, C, Hkv, d] after qk-norm and RoPE (at the key's absolute position)
  v: jax.Array  # [B, C, Hkv, d]  (Hkv = num_kv_heads, < H for grouped-query attention)
  pos: jax.Array  # [C] int32 absolute positions, -1 = empty


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
  """[Tq, Tk] bool: key visible to query (causal, inside the window, not an empty slot)."""
  qp, kp = q_pos[:, None], k_pos[None, :]
  mask = (kp <= qp) & (kp >= 0)
  if window is not None:
    mask &= (qp - kp) < window
  return mask


@dataclasses.dataclass(frozen=True)
class AttentionAlgorithm:
  """Which exact algorithm computes the softmax (`model.attention_algorithm` and friends).

  All of them give the same result; they trade speed against memory:
    dense      one [Tq, Tk] score matrix per (batch, head);
    blocked    (one-shot / window caches only) query blocks of `block` rows, each against only
               the keys it can see: skips the work above the causal diagonal / outside the window;
    blockwise  online softmax over (`flash_block` x `flash_block`) tiles: memory O(block^2);
    auto       blocked for ordered inputs of >= 2 blocks (at most `max_blocks` of them), else
               dense up to `dense_max_scores` scores per (batch, head), else blockwise.
  `blocked` asked for where keys are not ordered (a full-attention cache) falls back to auto.
  Against a full-attention cache (capacity a multiple of `block`), auto reads only the blocks
  holding keys where it would take dense (layers/cache_attention.py: decode steps, prefill).
  """

  name: str = "auto"
  block: int = 256
  max_blocks: int = 8
  flash_block: int = 512
  dense_max_scores: int = 1 << 22
  # backend (layers/attention_kernels.py, `model.attention_impl` resolved for this platform):
  # blockwise = the algorithms above; xla / cudnn / splash = library kernels
  impl: str = "blockwise"
  # queries against a full-attention cache: 'pallas' (cache_attention.filled_attention_pallas,
  # for a capacity of at least its key block) | 'inherit' (the path of `impl`)
  cache_impl: str = "inherit"
  interpret: bool = False  # run Pallas kernels in interpret mode (always off a GPU for Triton)
  # > 0: ordered inputs whose query count it divides run in query blocks of this many rows, each
  # rematerialised at every derivative order (layers/attention_remat.py; impl xla or blockwise)
  remat_block: int = 0


ALGORITHMS = ("auto", "dense", "blocked", "blockwise")
DEFAULT_ALGORITHM = AttentionAlgorithm()


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
  """[B, T, H, d] -> [B, T, Hkv, G, d]: query head h reads key/value head h // G (G = H/Hkv)."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def dense_attention(q, k, v, q_pos, k_pos, window: int | None) -> jax.Array:
  """Softmax attention over the full [Tq, Tk] score matrix. q [B,Tq,H,d], k/v [B,Tk,Hkv,d]
  (grouped-query attention when Hkv < H: each key/value head serves H/Hkv query heads)."""
  scale = q.shape[-1] ** -0.5
  mask = attention_mask(q_pos, k_pos, window)
  if k.shape[2] == q.shape[2]:  # multi-head: no grouping axis
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask[None, None], logits, NEG_INF), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
  qg = group_queries(q, k.shape[2])
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
  probs = jax.nn.softmax(jnp.where(mask[None, None, None], logits, NEG_INF), axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
  return out.reshape(q.shape[:3] + v.shape[3:])


def _pad_to(x: jax.Array, n: int, axis: int, value=0) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def blockwise_attention(q, k, v, q_pos, k_pos, window: int | None, *, q_block: int = 512,
                        k_block: int = 512) -> jax.Array:
  """The same attention as `dense_attention`, computed one (query block, key block) at a time.

  Query blocks run sequentially (`lax.map`); each scans the key blocks carrying the running
  max, normaliser and weighted sum (online softmax), so memory is O(q_block * k_block) per head.
  Key blocks with no visible key (future keys, empty cache slots, outside the window) are
  skipped. The block body is rematerialised, so gradients need no [Tq, Tk] residuals either.
  """
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  g = h // hk
  qb, kb = min(q_block, tq), min(k_block, tk)
  nq, nk = -(-tq // qb), -(-tk // kb)
  scale = d ** -0.5
  q_pos = _pad_to(q_pos.astype(jnp.int32), nq * qb, 0, -1)
  k_pos = _pad_to(k_pos.astype(jnp.int32), nk * kb, 0, -1)  # -1 = never visible
  qs = _pad_to(q, nq * qb, 1).reshape(b, nq, qb, hk, g, d).swapaxes(0, 1)
  ks = _pad_to(k, nk * kb, 1).reshape(b, nk, kb, hk, d).swapaxes(0, 1)
  vs = _pad_to(v, nk * kb, 1).reshape(b, nk, kb, hk, d).swapaxes(0, 1)
  kps = k_pos.reshape(nk, kb)

  def query_block(args):
    qi, qpi = args

    @jax.checkpoint
    def update(carry, kj, vj, mask):
      return online_softmax_step(carry, qi, kj, vj, mask, scale)

    def body(carry, xs):
      kj, vj, kpj = xs
      mask = attention_mask(qpi, kpj, window)
      carry = jax.lax.cond(mask.any(), lambda c: update(c, kj, vj, mask), lambda c: c, carry)
      return carry, None

    init = (jnp.full((b, hk, g, qb), NEG_INF, jnp.float32),
            jnp.zeros((b, hk, g, qb), jnp.float32), jnp.zeros((b, hk, g, qb, d), jnp.float32))
    (_, norm, acc), _ = jax.lax.scan(body, init, (ks, vs, kps))
    out = acc / jnp.where(norm > 0, norm, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, qb, h, d).astype(v.dtype)  # [B, qb, H, d]

  out = jax.lax.map(query_block, (qs, q_pos.reshape(nq, qb)))  # [nq, B, qb, H, d]
  return out.swapaxes(0, 1).reshape(b, nq * qb, h, d)[:, :tq]


def ordered_layout(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """bool scalar: the key layout `causal_blocked_attention` relies on holds.

  The layout: the real keys (position >= 0) form ONE run of consecutive slots holding
  consecutive positions (empty slots only before or after it), and every real query is the key
  in its own slot among the last Tq (query i = key Tk - Tq + i). Sliding windows that shift keys
  in, and one-shot inputs, have it; a cache with empty slots between real keys does not.
  O(Tk) work, computed once per call.
  """
  k_pos, q_pos = k_pos.astype(jnp.int32), q_pos.astype(jnp.int32)
  valid = k_pos >= 0
  steps_ok = jnp.all(~(valid[:-1] & valid[1:]) | (k_pos[1:] == k_pos[:-1] + 1))
  runs = valid[0].astype(jnp.int32) + jnp.sum(valid[1:] & ~valid[:-1])
  own = k_pos[k_pos.shape[0] - q_pos.shape[0]:]
  queries_ok = jnp.all((q_pos < 0) | (own == q_pos))
  return steps_ok & (runs <= 1) & queries_ok


def nan_unless_ordered(out: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
  """`out` where `ordered_layout` holds, NaN where it does not (never silently wrong numbers)."""
  return jnp.where(ordered_layout(q_pos, k_pos), out, jnp.nan).astype(out.dtype)


def causal_blocked_attention(q, k, v, q_pos, k_pos, window: int | None, *,
                             q_block: int) -> jax.Array:
  """The same attention as `dense_attention`, skipping keys a query block cannot see.

  Precondition: the layout of `ordered_layout` (queries = the last keys, real keys one run of
  consecutive positions). Then query i (key index o + i, o = Tk - Tq) sees no key after index
  o + i, and none before o + i - window + 1 (those are >= window positions older). Each query
  block therefore takes a static key range: a causal T x T product costs about (n + 1) / 2n of
  the dense one for n blocks, and a window shrinks it further. Every block is a dense masked
  softmax, so the result is exact. The precondition is checked on every call (O(Tk)): if it
  does not hold the output is NaN, never silently wrong numbers.
  """
  tq, tk = q.shape[1], k.shape[1]
  off = tk - tq
  outs = []
  for s in range(0, tq, q_block):
    e = min(s + q_block, tq)
    lo = 0 if window is None else max(0, off + s - window + 1)
    hi = off + e
    outs.append(dense_attention(q[:, s:e], k[:, lo:hi], v[:, lo:hi], q_pos[s:e], k_pos[lo:hi],
                                window))
  return nan_unless_ordered(jnp.concatenate(outs, axis=1), q_pos, k_pos)


def dot_product_attention(q, k, v, q_pos, k_pos, window: int | None, *, ordered: bool = False,
                          filled: jax.Array | None = None,
                          algorithm: AttentionAlgorithm = DEFAULT_ALGORITHM) -> jax.Array:
  """Softmax attention with a position-derived mask. q [B,Tq,H,d], k/v [B,Tk,Hkv,d].

  `algorithm` picks how (see `AttentionAlgorithm`). `ordered=True` says the inputs have the
  layout of `ordered_layout` (one-shot inputs, window caches), which allows the blocked path.
  `filled` says the keys are a full-attention cache filled left to right, its first `filled`
  slots holding keys: where auto would read every slot densely it reads only the blocks of
  those (layers/cache_attention.py), when Tk is a multiple of the block.
  """
  tq, tk = q.shape[1], k.shape[1]
  # Pallas kernels carry no partitioning rule: on a mesh, each device runs them on its sequences
  per_head = [("batch", None, "heads")] * 3  # and heads (query and key/value heads alike)
  if (filled is not None and window is None and algorithm.cache_impl == "pallas"
      and tk >= PALLAS_BLOCK_K):
    interpret = algorithm.interpret or target_platform() != "gpu"
    kernel = per_shard(lambda *a: filled_attention_pallas(*a, interpret=interpret),
                       [*per_head, (), (), ()], per_head[0])
    return kernel(q, k, v, q_pos, k_pos, filled)
  one_shot = ordered and tq == tk  # keys = queries (no cache)
  rb = min(algorithm.remat_block, tq)
  if ordered and rb and tq % rb == 0 and algorithm.impl in ("xla", "blockwise"):
    dense = dense_attention if algorithm.impl == "blockwise" else xla_dense
    out = remat_blocked_attention(q, k, v, q_pos, k_pos, window, q_block=rb, dense=dense)
    return nan_unless_ordered(out, q_pos, k_pos)
  if algorithm.impl in ("xla", "cudnn"):
    return library_attention(q, k, v, q_pos, k_pos, window, impl=algorithm.impl,
                             one_shot=one_shot)
  if algorithm.impl == "splash" and one_shot and splash_block(tq) is not None:
    kernel = per_shard(lambda *a: splash_attention(*a, window, interpret=algorithm.interpret),
                       per_head, per_head[0])
    return kernel(q, k, v)
  name = algorithm.name
  if name == "dense":
    return dense_attention(q, k, v, q_pos, k_pos, window)
  if name == "blockwise":
    fb = algorithm.flash_block
    return blockwise_attention(q, k, v, q_pos, k_pos, window, q_block=fb, k_block=fb)
  if ordered and name == "blocked":
    return causal_blocked_attention(q, k, v, q_pos, k_pos, window,
                                    q_block=min(algorithm.block, tq))
  n_blocks = -(-tq // algorithm.block)
  q_block = -(-tq // min(n_blocks, algorithm.max_blocks))
  if ordered and n_blocks >= 2 and q_block * tk <= algorithm.dense_max_scores:
    return causal_blocked_attention(q, k, v, q_pos, k_pos, window, q_block=q_block)
  if tq * tk <= algorithm.dense_max_scores:
    if filled is not None and window is None and tk % algorithm.block == 0:
      return filled_attention(q, k, v, q_pos, k_pos, filled, block=algorithm.block)
    return dense_attention(q, k, v, q_pos, k_pos, window)
  fb = algorithm.flash_block
  return blockwise_attention(q, k, v, q_pos, k_pos, window, q_block=fb, k_block=fb)


class Attention(nnx.Module):
  """Multi-head causal self-attention. `window=None` is full attention.

  `num_kv_heads` < `num_heads` is grouped-query attention: keys and values have `num_kv_heads`
  heads (so does the KV cache), each shared by `num_heads / num_kv_heads` query heads.
  """

  def __init__(self, d_model: int, num_heads: int, *, window: int | None, rope_theta: float,
               qk_norm: bool, norm_eps: float, std: float, out_std: float, compute_dtype,
               param_dtype, rngs: nnx.Rngs,
               algorithm: AttentionAlgorithm = DEFAULT_ALGORITHM, num_kv_heads: int | None = None):
    self.algorithm = algorithm
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    if num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    self.head_dim = d_model // num_heads
    kv_dim = self.num_kv_heads * self.head_dim
    self.window = window
    self.rope_theta = rope_theta
    self.compute_dtype = compute_dtype
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.wq = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wk = linear(d_model, kv_dim, ("embed", "heads"), std=std, **kw)
    self.wv = linear(d_model, kv_dim, ("embed", "heads"), std=std, **kw)
    self.wo = linear(d_model, d_model, ("heads", "embed"), std=out_std, **kw)
    if qk_norm:
      self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, axis_name=None, param_dtype=param_dtype)
      self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, axis_name=None, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None

  def init_state(self, batch_size: int, capacity: int | None = None) -> KVCache:
    """Empty KV state. Capacity defaults to the window (required for full attention)."""
    capacity = capacity if self.window is None else self.window
    if capacity is None:
      raise ValueError("full attention needs an explicit KV capacity (the longest context)")
    shape = (batch_size, capacity, self.num_kv_heads, self.head_dim)
    return KVCache(k=jnp.zeros(shape, self.compute_dtype), v=jnp.zeros(shape, self.compute_dtype),
                   pos=jnp.full((capacity,), -1, jnp.int32))

  def _split_heads(self, x):
    return x.reshape(*x.shape[:-1], x.shape[-1] // self.head_dim, self.head_dim)

  def __call__(self, x: jax.Array, positions: jax.Array, state: KVCache | None = None,
               step: jax.Array | int | None = None):
    del step  # no inner learning rate to warm up
    x = x.astype(self.compute_dtype)
    q = self._split_heads(self.wq(x))
    k = self._split_heads(self.wk(x))
    v = self._split_heads(self.wv(x))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    filled = None  # the slots holding keys, for a full-attention cache
    if state is None:
      k_all, v_all, k_pos = k, v, positions
      new_state = None
    elif self.window is None:
      # Full attention: slots fill left to right and the new keys are written in place after
      # the filled ones (with a donated cache no copy of it is made, unlike a shift).
      filled = jnp.sum(state.pos >= 0)
      check_capacity(filled, positions.shape[0], state.pos.shape[0])
      k_all, v_all = (jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), filled,
                                                          axis=1)
                      for buf, new in ((state.k, k), (state.v, v)))
      k_pos = jax.lax.dynamic_update_slice_in_dim(state.pos, positions.astype(jnp.int32), filled,
                                                  axis=0)
      new_state = KVCache(k=k_all, v=v_all, pos=k_pos)
      filled = filled + positions.shape[0]
    else:
      k_all = jnp.concatenate([state.k, k.astype(state.k.dtype)], axis=1)
      v_all = jnp.concatenate([state.v, v.astype(state.v.dtype)], axis=1)
      k_pos = jnp.concatenate([state.pos, positions.astype(jnp.int32)])
      cap = state.pos.shape[0]
      new_state = KVCache(k=k_all[:, -cap:], v=v_all[:, -cap:], pos=k_pos[-cap:])
    # one-shot, or keys = [window, new]: the queries are the last keys and positions only grow
    ordered = state is None or self.window is not None
    with jax.named_scope("attention"):  # the core, apart from the projections (kernel_profile)
      out = dot_product_attention(q, k_all, v_all, positions, k_pos, self.window,
                                  ordered=ordered, filled=filled, algorithm=self.algorithm)
    out = out.reshape(*out.shape[:-2], -1)
    return self.wo(out), new_state


# -- registration as the 'full' and 'swa' sequence mixers ------------------------------------------


def attention_algorithm(cfg: ModelCfg, impl: str | None = None,
                        full_cache: bool = False) -> AttentionAlgorithm:
  """The attention of the model `cfg` (a `ModelConfig`); `impl` overrides the resolved
  backend; `full_cache`: its layers keep a full-attention cache (`model.cache_attention_impl`
  applies, and is checked, only then)."""
  impl = impl or resolve_impl(cfg.attention_impl, dtype(cfg.compute_dtype))
  cache_impl = resolve_cache_impl(cfg.cache_attention_impl) if full_cache else "inherit"
  return AttentionAlgorithm(name=cfg.attention_algorithm, block=cfg.attention_block,
                            flash_block=cfg.attention_flash_block, impl=impl,
                            cache_impl=cache_impl)


def build_attention(cfg: ModelCfg, *, window: int | None, **kw) -> Attention:
  """Attention of the model `cfg` (a `ModelConfig`); kw = compute_dtype, param_dtype, rngs."""
  return Attention(cfg.d_model, cfg.num_heads, window=window, rope_theta=cfg.rope_theta,
                   qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps, std=cfg.init_std,
                   out_std=cfg.out_std,
                   algorithm=attention_algorithm(cfg, full_cache=window is None),
                   num_kv_heads=cfg.num_kv_heads, **kw)


def _check_window(config: ml_collections.ConfigDict) -> None:
  if config.model.window > config.data.seq_len:
    raise ConfigError(f"model.window={config.model.window} must be <= "
                      f"data.seq_len={config.data.seq_len}")


register_mixer(MixerSpec("full", lambda cfg, **kw: build_attention(cfg, window=None, **kw),
                         state_grows=True, attention_window=lambda cfg: None))
register_mixer(MixerSpec("swa", lambda cfg, **kw: build_attention(cfg, window=cfg.window, **kw),
                         check=_check_window, attention_window=lambda cfg: cfg.window))
