"""TTT-E2E: a sliding-window Transformer whose last blocks keep learning while it reads.

The model is `LanguageModel` (SWA, qk-norm, pre+post norms, RoPE 5e5) whose last `suffix_len`
blocks carry a prime SwiGLU MLP with `InnerParam` weights (the inner weights W). Reading a
sequence split into chunks of `mini_batch_size` = b positions, for chunk i:
  loss_i = mean next-token NLL of chunk i with W_i (attention sees the carried KV window);
  W_{i+1} = W_i - ilr * clip(d loss_i / d W_i)   (one global norm over all prime MLPs).
Each sequence of a batch has its own inner weights. The prefix blocks (no inner weights) run
once over the whole input.

Training (`compute_loss`): `train_mode=meta` minimises mean_i loss_i, differentiating through
every inner update (second order), so the initial W and all other weights are meta-learned;
`train_mode=pretrain` is the plain LM loss with W as ordinary weights.

Inference (`__call__`) runs the same inner loop with no outer gradient. Logits of a chunk's
tokens are made with the weights before that chunk's update (as in training). Chunk i's loss
needs the targets of all its positions, and the target of its last position is the first token
of chunk i+1; so when streaming, the update for chunk i happens when that token arrives, just
before its own logits are computed. The cache holds the per-sequence inner weights, the KV
windows of every block (suffix windows hold `window + b` keys so the KV window at the start of
the pending chunk stays available), and the pending chunk's suffix inputs and tokens. Calls may
have any length T (T=1 decoding included); positions must continue the stream contiguously, and
chunks are counted from the start of the stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from ttt_jax.layers.attention import KVCache
from ttt_jax.layers.attention_kernels import resolve_inner_impl
from ttt_jax.layers.mlp import InnerParam
from ttt_jax.models.config import ModelConfig
from ttt_jax.models.e2e_inner import SuffixRunner, inner_loop, inner_lr
from ttt_jax.models.e2e_stream import ChunkReader, E2ECache, check_continuation
from ttt_jax.models.lm import (
  ACT_AXES,
  LanguageModel,
  attention_algorithm,
  masked_mean,
  remat_call,
  split_batch,
)
from ttt_jax.sharding import constrain


class E2EOutput(NamedTuple):
  losses: jax.Array  # [n_chunks, B] chunk losses (each with the weights before its update)
  hidden: jax.Array  # [B, T, D] outputs of the last block
  nll: jax.Array  # [B, T] per-token NLL
  inner: Any  # per-sequence inner weights after all n updates (final_update=True), else None


def suffix_remat(cfg: ModelConfig) -> str:
  """The remat policy of each suffix block in the inner loop (`model.e2e.suffix_remat`), in
  training, streaming and one-shot evaluation alike: 'auto' is 'none' when the chunk steps are
  rematerialised (`remat_chunks`: the backward pass recomputes a chunk step whole, so a block
  remat nested in it only recomputes the blocks once more: 27% more FLOPs for the meta step at
  the gpu preset, docs/gpu_census.md), else `model.remat`. The prefix blocks, the first suffix
  block's attention when it runs before the loop (`hoist_first_attention`) and
  `train_mode=pretrain` always take `model.remat`."""
  e = cfg.e2e
  if e.suffix_remat != "auto":
    return e.suffix_remat
  return "none" if e.remat_chunks else cfg.remat


def window_residuals(cfg: ModelConfig) -> str:
  """`model.e2e.window_residuals` here: auto keeps only each chunk's new keys ('chunks',
  models/window_scan.py) where the chunk steps are recomputed whole (`remat_chunks` with policy
  'full'), else every chunk's window ('windows')."""
  e = cfg.e2e
  if e.window_residuals != "auto":
    return e.window_residuals
  return "chunks" if e.remat_chunks and e.remat_chunks_policy == "full" else "windows"


def chunk_group(setting: int, n: int) -> int:
  """Chunk steps per checkpoint group of the inner loop over n chunks (`model.e2e.remat_group`;
  1 = no groups). n: the largest divisor of n up to `setting`; -1 (auto): the divisor g that
  keeps the fewest copies of the inner weights, n / g + g, if that is fewer than the n - 1 of
  the loop without groups (n = 8 chunks: 2, 6 copies instead of 7; 32: 4, 12 instead of 31; 128:
  8, 24 instead of 127); 0: 1."""
  divisors = [g for g in range(1, n + 1) if n % g == 0]
  if setting >= 0:
    return max(g for g in divisors if g <= max(setting, 1))
  best = min(divisors, key=lambda g: (n // g + g, g))
  return best if n // best + best < n - 1 else 1


def fillable_window(window: KVCache, keys: int) -> KVCache:
  """An empty KV window cut to the slots that `keys` keys can fill (at least one). The inner
  loop over T positions carries at most T - b keys into a chunk: at the 8K presets (window 8K)
  a chunk's attention then reads 8K keys instead of 9K (its default blocks of 256 queries 8,192
  instead of 8,447 each), the same values (the cut slots would have stayed empty)."""
  keep = max(1, min(window.pos.shape[0], keys))
  return KVCache(window.k[:, -keep:], window.v[:, -keep:], window.pos[-keep:])


# `model.e2e.inner_attention_block=-1` (auto): where one chunk's scores per head would exceed
# AUTO_SCORES (the `125m`+ presets at 4K context and more: 1024 x (window + 1024)), blocks of the
# largest divisor of the chunk up to AUTO_BLOCK rows (at least MIN_AUTO_BLOCK), else off
AUTO_BLOCK, MIN_AUTO_BLOCK, AUTO_SCORES = 256, 16, 1 << 22


def inner_attention_block(cfg: ModelConfig) -> int:
  """Query rows per rematerialised block of the inner loop's attention (0: one dense call)."""
  rows, chunk = cfg.e2e.inner_attention_block, cfg.e2e.mini_batch_size
  if rows >= 0:
    return rows
  if chunk * (cfg.window + chunk) <= AUTO_SCORES:
    return 0
  rows = max(r for r in range(1, min(AUTO_BLOCK, chunk) + 1) if chunk % r == 0)
  return rows if rows >= MIN_AUTO_BLOCK else 0


class E2EModel(LanguageModel):
  """`LanguageModel` with the TTT-E2E inner loop in its loss, forward and streaming cache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.kind != "e2e":
      raise ValueError("E2EModel needs model.kind='e2e'")
    if cfg.scan_layers and cfg.e2e.suffix_len >= cfg.num_layers:
      raise ValueError("E2EModel with model.scan_layers=True stacks its prefix blocks: needs "
                       f"model.e2e.suffix_len={cfg.e2e.suffix_len} < model.num_layers")
    super().__init__(cfg, rngs=rngs)
    self.n_prefix = cfg.num_layers - cfg.e2e.suffix_len
    # the inner loop's attention (vmapped per sequence, differentiated twice in meta-training);
    # the prefix blocks and the plain LM forward keep model.attention_impl
    self.inner_attention = dataclasses.replace(
        attention_algorithm(cfg, resolve_inner_impl(cfg.e2e.inner_attention_impl)),
        remat_block=inner_attention_block(cfg))

  # -- pieces ------------------------------------------------------------------------------------
  def split_inner(self, mixed_first: bool = False):
    """(runner over graphdef, inner state, outer state): the functional view of this model.
    `mixed_first`: the caller ran the first suffix block's mixer already (`SuffixRunner`)."""
    graphdef, inner, outer = nnx.split(self, InnerParam, ...)
    runner = SuffixRunner(graphdef, suffix_remat(self.cfg), self.inner_attention, mixed_first)
    return runner, inner, outer

  @staticmethod
  def inner_axes(inner) -> list[tuple]:
    specs = nnx.get_partition_spec(inner)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return [tuple(p) for p in jax.tree.leaves(specs, is_leaf=is_spec)]

  def run_prefix(self, tokens: jax.Array, positions: jax.Array, caches=None):
    """Embeddings through the prefix blocks: the suffix inputs [B, T, D] (+ new prefix caches:
    a list, or one stacked cache under `model.scan_layers`)."""
    h = self.embed_tokens(tokens)
    # scan_layers: self.blocks is the prefix stack, scanned; else the list's first blocks
    blocks = None if self.cfg.scan_layers else list(self.blocks)[:self.n_prefix]
    return LanguageModel.run_blocks(self, h, positions, caches, blocks=blocks)

  def suffix_blocks(self) -> list:
    """The blocks with prime MLPs: the last `suffix_len` of `blocks`, or `suffix` when the
    prefix blocks are stacked (`model.scan_layers`)."""
    if self.cfg.scan_layers:
      return list(self.suffix)
    return list(self.blocks)[self.n_prefix:]

  def run_blocks(self, h, positions, cache=None, blocks=None, step=None):
    """The plain forward's blocks (`train_mode=pretrain`): prefix and suffix blocks in order.
    Streaming goes through `stream` and its `E2ECache` instead (with stacked prefix blocks there
    is no plain-LM streaming view: `LanguageModel.init_cache` would hold the prefix only)."""
    if not self.cfg.scan_layers or blocks is not None:
      return super().run_blocks(h, positions, cache, blocks, step)
    if cache is not None:
      raise ValueError("E2EModel.run_blocks runs whole sequences (cache=None); "
                       "E2EModel.stream streams")
    h, _ = super().run_blocks(h, positions, step=step)  # the prefix stack
    return super().run_blocks(h, positions, blocks=self.suffix_blocks(), step=step)

  # -- training ----------------------------------------------------------------------------------
  def meta_forward(self, inputs: jax.Array, targets: jax.Array, mask: jax.Array | None, lr,
                   second_order: bool = True, final_update: bool = False) -> E2EOutput:
    """The inner loop over a batch of whole sequences [B, T] (T a multiple of b).

    `final_update=True` also makes the last chunk's update (it changes no loss or output) and
    returns the final weights in `E2EOutput.inner` (None otherwise)."""
    e = self.cfg.e2e
    bsz, t = inputs.shape
    if t % e.mini_batch_size:
      raise ValueError(f"sequence length {t} must be a multiple of model.e2e.mini_batch_size="
                       f"{e.mini_batch_size}")
    runner, inner, outer = self.split_inner(mixed_first=e.hoist_first_attention)
    positions = jnp.arange(t, dtype=jnp.int32)
    h, _ = self.run_prefix(inputs, positions)
    looped = self.suffix_blocks()
    if e.hoist_first_attention:
      # the first suffix block's attention reads the prefix output only, not the inner weights:
      # it runs once over the whole sequence like the prefix blocks (model.attention_impl, whose
      # one-shot sliding window scores only the pairs it attends), not chunk by chunk in the loop
      first, looped = looped[0], looped[1:]
      h = constrain(remat_call(first, lambda blk, h: blk.mix(h, positions), self.cfg.remat, h),
                    ACT_AXES)
    kv0 = [fillable_window(blk.mixer.init_state(bsz), t - e.mini_batch_size) for blk in looped]
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    losses, hidden, nll, inner = inner_loop(
        runner, inner, outer, kv0, h, targets, mask, lr, chunk=e.mini_batch_size,
        clip=e.inner_clip, remat_chunks=e.remat_chunks, second_order=second_order,
        inner_axes=self.inner_axes(inner), final_update=final_update,
        remat_policy=e.remat_chunks_policy, window_residuals=window_residuals(self.cfg),
        group=chunk_group(e.remat_group, t // e.mini_batch_size))
    return E2EOutput(losses, hidden, nll, inner if final_update else None)

  def compute_loss(self, batch: dict, step: jax.Array | None = None):
    """meta: mean of the chunk losses (token-weighted mean NLL under a loss mask), second-order
    outer gradient; pretrain: the plain LM loss with the prime MLPs as ordinary weights.

    `batch['loss_mask']` [B, T] weights the outer loss and, by default, the inner loop's chunk
    losses too (padding is neither scored nor learned from). `batch['inner_loss_mask']` sets the
    inner loop's weights apart: a task that scores only its answer tokens (eval/needle_train.py)
    passes all ones, so the inner loop reads the whole prompt as it does at evaluation."""
    if self.cfg.e2e.train_mode == "pretrain":  # plain forward: no inner loop at all
      return super().compute_loss(batch, step)
    inputs, targets = split_batch(batch)
    mask = batch.get("loss_mask")
    lr = inner_lr(self.cfg.e2e, step)
    out = self.meta_forward(inputs, targets, batch.get("inner_loss_mask", mask), lr)
    loss = jnp.mean(out.losses) if mask is None else masked_mean(out.nll, mask)
    chunk = jnp.mean(out.losses, axis=1)
    return loss, {"loss": loss, "inner_lr": lr, "loss_first_chunk": chunk[0],
                  "loss_last_chunk": chunk[-1]}

  # -- inference ---------------------------------------------------------------------------------
  def init_cache(self, batch_size: int, capacity: int | None = None) -> E2ECache:
    """Fresh streaming state: the initial inner weights for every sequence, empty KV windows.

    `capacity` is ignored: every window is fixed by `model.window`.
    """
    del capacity
    b = self.cfg.e2e.mini_batch_size
    _, inner, _ = nnx.split(self, InnerParam, ...)
    inner = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch_size, *w.shape)), inner)
    if self.cfg.scan_layers:  # one stacked cache for the prefix stack
      prefix = LanguageModel.init_cache(self, batch_size)
    else:
      prefix = [blk.init_state(batch_size) for blk in list(self.blocks)[:self.n_prefix]]
    suffix = []
    for blk in self.suffix_blocks():
      att = blk.mixer
      shape = (batch_size, att.window + b, att.num_kv_heads, att.head_dim)
      zeros = jnp.zeros(shape, att.compute_dtype)
      suffix.append(KVCache(zeros, zeros, jnp.full((shape[1],), -1, jnp.int32)))
    return E2ECache(inner, prefix, suffix,
                    jnp.zeros((batch_size, b, self.cfg.d_model), self.compute_dtype),
                    jnp.zeros((batch_size, b), jnp.int32), jnp.zeros((), jnp.int32))

  def one_shot_logits(self, tokens: jax.Array) -> jax.Array:
    """Logits of whole sequences [B, T] (T a multiple of b) through the training inner loop."""
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)  # last one never used
    out = self.meta_forward(tokens, targets, None, inner_lr(self.cfg.e2e, None))
    return self.logits(out.hidden)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               cache: E2ECache | None = None):
    """tokens [B, T] -> (logits [B, T, V] fp32, new cache). No cache = a fresh sequence."""
    b = self.cfg.e2e.mini_batch_size
    bsz, t = tokens.shape
    if positions is None:
      positions = jnp.arange(t, dtype=jnp.int32)
    if cache is None:
      if t % b == 0:
        return self.one_shot_logits(tokens), None
      logits, _ = self.stream(tokens, positions, self.init_cache(bsz))
      return logits, None
    return self.stream(tokens, positions, cache)

  def stream(self, tokens: jax.Array, positions: jax.Array, cache: E2ECache):
    """Reads T more tokens of each sequence, learning as chunks complete (models/e2e_stream.py).

    `positions` must continue the cache's stream contiguously (checked: `StreamError`).
    """
    e = self.cfg.e2e
    check_continuation(cache, positions, e.mini_batch_size, self.cfg.window)
    runner, _, outer = self.split_inner()
    h, prefix = self.run_prefix(tokens, positions, cache.prefix)
    reader = ChunkReader(runner, outer, e, inner_lr(e, None), h, tokens, positions[0])
    hidden, new_cache = reader.run(cache, prefix)
    return self.logits(hidden), new_cache
