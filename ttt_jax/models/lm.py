"""Decoder-only language model: embed -> N blocks (mixer + SwiGLU) -> RMSNorm -> head.

The sequence mixer of every block is chosen by `model.mixer` (see `make_mixer`). Blocks are a
Python list (`model.scan_layers=False`) or one stacked block applied with `jax.lax.scan` (TTT-E2E:
its prefix blocks stacked, its suffix blocks a list, models/e2e.py).
The model and its blocks take the frozen `ModelConfig` (models/config.py; `build_model` makes it
from the `config.model` ConfigDict).
All blocks follow the mixer contract of layers/attention.py, so the whole model streams:
`model(tokens, positions, cache) -> (logits, new_cache)` with `cache = model.init_cache(...)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ttt_jax.layers.attention import attention_algorithm
from ttt_jax.layers.common import KERNEL_OUTPUTS, dtype, normal_init
from ttt_jax.layers.int8 import Int8Embed, Int8Weight
from ttt_jax.layers.mixers import mixer_spec
from ttt_jax.layers.mlp import InnerParam, SwiGLU
from ttt_jax.layers.norms import RMSNorm
from ttt_jax.models.config import ModelConfig, model_config
from ttt_jax.sharding import constrain

VOCAB_MULTIPLE = 128
# logical axes of the residual stream [B, T, D] at block boundaries (see ttt_jax/sharding.py)
ACT_AXES = ("batch", "seq", None)


def padded_vocab(vocab_size: int) -> int:
  """Embedding rows: the vocab rounded up to a multiple of 128 (padding ids never predicted)."""
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


__all__ = ["attention_algorithm"]  # the attention of a model config (models/e2e.py)


def make_mixer(cfg: ModelConfig | ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The sequence mixer named by `cfg.mixer` (the registry: layers/mixers.py) for the model
  config `cfg` (a `ModelConfig`, or the `config.model` section it is made from)."""
  cfg = model_config(cfg)
  return mixer_spec(cfg.mixer).build(cfg, compute_dtype=dtype(cfg.compute_dtype),
                                     param_dtype=dtype(cfg.param_dtype), rngs=rngs)


class Block(nnx.Module):
  """h += mixer(norm(h)); [h += prime_mlp(norm(h))]; h += mlp(norm(h)) (optional post-norms).

  `prime=True` adds TTT-E2E's prime SwiGLU MLP, whose weights are `InnerParam`s.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, prime: bool = False):
    pdt = dtype(cfg.param_dtype)
    d = cfg.d_model
    mlp_kw = dict(std=cfg.init_std, out_std=cfg.out_std, compute_dtype=dtype(cfg.compute_dtype),
                  param_dtype=pdt, rngs=rngs)
    norm = lambda: RMSNorm(d, eps=cfg.norm_eps, param_dtype=pdt)  # noqa: E731
    self.post_norm = cfg.post_norm
    # the mixer's own branch before it, if it has one (TTT "Mamba backbone": h += conv(norm(h)),
    # with its own streaming state)
    conv = mixer_spec(cfg.mixer).pre_conv(cfg, compute_dtype=dtype(cfg.compute_dtype),
                                          param_dtype=pdt, rngs=rngs)
    if conv is not None:
      self.conv_norm = norm()
    self.conv = conv
    self.mixer_norm = norm()
    self.mixer = make_mixer(cfg, rngs)
    self.mixer_post_norm = norm() if cfg.post_norm else None
    if prime:
      self.prime_norm = norm()
      self.prime_mlp = SwiGLU(d, cfg.e2e.prime_intermediate_size, param_type=InnerParam,
                              **mlp_kw)
      self.prime_post_norm = norm() if cfg.post_norm else None
    else:
      self.prime_mlp = None
    self.mlp_norm = norm()
    self.mlp = SwiGLU(d, cfg.intermediate_size, **mlp_kw)
    self.mlp_post_norm = norm() if cfg.post_norm else None

  def init_state(self, batch_size: int, capacity: int | None = None):
    state = self.mixer.init_state(batch_size, capacity)
    if self.conv is not None:
      return {"conv": self.conv.init_state(batch_size), "mixer": state}
    return state

  @staticmethod
  def _branch(h, pre, fn, post, scope: str):
    with jax.named_scope(scope):
      y = fn(pre(h))
      return h + (post(y) if post is not None else y).astype(h.dtype)

  def __call__(self, h: jax.Array, positions: jax.Array, state=None, step=None):
    """`step`: the outer training step, passed to the mixer (TTT warms up its inner LR)."""
    with jax.named_scope("mixer"):  # scopes: what benchmarks/kernel_profile.py attributes to
      h, state = self._mix(h, positions, state, step)
    return self.branches(h), state

  def mix(self, h, positions):
    """The token-mixing half alone, one-shot (no streaming state): h += mixer(norm(h))."""
    with jax.named_scope("mixer"):
      return self._mix(h, positions, None, None)[0]

  def branches(self, h):
    """The per-token half: [h += prime_mlp(norm(h))]; h += mlp(norm(h))."""
    if self.prime_mlp is not None:
      h = self._branch(h, self.prime_norm, self.prime_mlp, self.prime_post_norm, "prime_mlp")
    return self._branch(h, self.mlp_norm, self.mlp, self.mlp_post_norm, "mlp")

  def _mix(self, h, positions, state, step):
    if self.conv is not None:
      y, conv_state = self.conv(self.conv_norm(h), None if state is None else state["conv"])
      h = h + y.astype(h.dtype)
      y, mixer_state = self.mixer(self.mixer_norm(h), positions,
                                  None if state is None else state["mixer"], step)
      state = None if state is None else {"conv": conv_state, "mixer": mixer_state}
    else:
      y, state = self.mixer(self.mixer_norm(h), positions, state, step)
    if self.mixer_post_norm is not None:
      y = self.mixer_post_norm(y)
    return h + y.astype(h.dtype), state


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # full, except the outputs of sequential kernels (the TTT forward kernels; the dual and
    # primal forms' inner loop at each remat group): models without TTT layers as under full
    "kernels": jax.checkpoint_policies.save_only_these_names(KERNEL_OUTPUTS),
}


def apply_block(block: Block, h, positions, state, remat: str, step=None):
  """Runs one block, under `jax.checkpoint` unless remat == 'none' (functional split/merge).

  Measured on XLA:CPU: a Python loop of checkpointed blocks saves no memory, while the scanned
  stack (`model.scan_layers=True`) does (docs/scaling.md).
  """
  run = lambda blk, h, state, step: blk(h, positions, state, step)  # noqa: E731
  return remat_call(block, run, remat, h, state, step)


def remat_call(module: nnx.Module, fn, remat: str, *args):
  """fn(module, *args), under `jax.checkpoint` with `remat`'s policy unless remat == 'none'
  (the module split into graph and parameters, merged again inside)."""
  if remat == "none":
    return fn(module, *args)
  graphdef, params = nnx.split(module)

  def run(params, *args):
    return fn(nnx.merge(graphdef, params), *args)

  return jax.checkpoint(run, policy=_REMAT_POLICIES[remat])(params, *args)


def stacked_blocks(cfg: ModelConfig, n: int, rngs: nnx.Rngs) -> Block:
  """`n` blocks as one module whose parameters have a leading `layers` axis (`run_blocks`
  scans over it)."""
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_stack(rngs):
    return Block(cfg, rngs=rngs)

  return make_stack(rngs)


class LanguageModel(nnx.Module):
  """The decoder-only LM shared by every model kind."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"{type(self).__name__} takes a ModelConfig (models/config.py: "
                      "model_config(config.model)), or use build_model(config.model)")
    self.cfg = cfg
    self.vocab_size = cfg.vocab_size
    vocab = padded_vocab(cfg.vocab_size)
    pdt, cdt = dtype(cfg.param_dtype), dtype(cfg.compute_dtype)
    self.compute_dtype = cdt
    self.embed = nnx.Embed(vocab, cfg.d_model, dtype=cdt, param_dtype=pdt, rngs=rngs,
                           embedding_init=normal_init(cfg.init_std, ("vocab", "embed")))
    n_suffix = cfg.e2e.suffix_len if cfg.kind == "e2e" else 0
    if cfg.scan_layers:  # E2E: the prefix blocks stacked, its suffix blocks (prime) apart
      self.blocks = stacked_blocks(cfg, cfg.num_layers - n_suffix, rngs)
      if n_suffix:
        self.suffix = nnx.List([Block(cfg, rngs=rngs, prime=True) for _ in range(n_suffix)])
    else:
      self.blocks = nnx.List([
          Block(cfg, rngs=rngs, prime=i >= cfg.num_layers - n_suffix)
          for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = nnx.Param(normal_init(cfg.init_std, ("embed", "vocab"))(
          rngs.params(), (cfg.d_model, vocab), pdt))

  # -- pieces (models/e2e.py composes them) ------------------------------------------------------
  @jax.named_scope("embed")
  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    if isinstance(self.embed, Int8Embed):  # decode-time 8-bit copy (layers/int8.py)
      return constrain(self.embed.lookup(tokens).astype(self.compute_dtype), ACT_AXES)
    # gather the table's width shards (FSDP) first: a lookup into a width-sharded table cannot
    # be resharded to the batch-sharded residual stream efficiently
    table = constrain(self.embed.embedding[...], ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0).astype(self.compute_dtype), ACT_AXES)

  @jax.named_scope("head")
  def logits(self, h: jax.Array) -> jax.Array:
    """fp32 logits; padded vocabulary rows are masked so they are never predicted."""
    h = self.final_norm(h)
    if isinstance(self.head, Int8Weight):  # decode-time 8-bit copies (layers/int8.py)
      logits = self.head(h)
    elif self.head is None and isinstance(self.embed, Int8Embed):
      logits = self.embed.attend(h)
    elif self.head is None:  # tied: contract the table's model axis in place (a transposed
      table = self.embed.embedding[...].astype(h.dtype)  # table would be copied at every call)
      logits = jax.lax.dot_general(h, table, (((h.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    else:
      logits = jnp.dot(h, self.head[...].astype(h.dtype), preferred_element_type=jnp.float32)
    # axes named from the last: one sequence's [T, V] has no batch axis (E2E's inner loop)
    logits = constrain(logits, ("batch", "seq", "vocab")[-logits.ndim:])
    if logits.shape[-1] > self.vocab_size:
      valid = jnp.arange(logits.shape[-1]) < self.vocab_size
      logits = jnp.where(valid, logits, -1e9)
    return logits

  def init_cache(self, batch_size: int, capacity: int | None = None):
    """Per-block streaming state (KV windows, TTT hidden states, ...)."""
    if self.cfg.scan_layers:
      graphdef, params = nnx.split(self.blocks)
      one = lambda p: nnx.merge(graphdef, p).init_state(batch_size, capacity)  # noqa: E731
      return jax.vmap(one)(params)
    return [blk.init_state(batch_size, capacity) for blk in self.blocks]

  def run_blocks(self, h, positions, cache=None, blocks=None, step=None):
    """The model's blocks in order (`model.scan_layers`: its stack, scanned), or the list
    `blocks` instead; `cache` holds one state per block (stacked for the stack) or is None."""
    remat = self.cfg.remat
    if self.cfg.scan_layers and blocks is None:
      graphdef, params = nnx.split(self.blocks)

      def body(h, xs):
        p, st = xs
        h, st = apply_block(nnx.merge(graphdef, p), h, positions, st, remat, step)
        return constrain(h, ACT_AXES), st

      return jax.lax.scan(body, constrain(h, ACT_AXES), (params, cache))
    blocks = self.blocks if blocks is None else blocks
    new_cache = []
    h = constrain(h, ACT_AXES)
    for i, blk in enumerate(blocks):
      h, st = apply_block(blk, h, positions, None if cache is None else cache[i], remat, step)
      h = constrain(h, ACT_AXES)
      new_cache.append(st)
    return h, (None if cache is None else new_cache)

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None, cache=None,
              step=None):
    """The plain forward pass (no test-time learning): tokens [B, T] -> (logits, new cache).
    `step` (training) reaches the mixers that warm up an inner LR; None = no warm-up."""
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    h, cache = self.run_blocks(self.embed_tokens(tokens), positions, cache, step=step)
    return self.logits(h), cache

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, cache=None):
    """tokens [B, T] -> (logits [B, T, V] fp32, new cache). Models that learn at test time
    (models/e2e.py) override this; `forward` stays the plain pass."""
    return self.forward(tokens, positions, cache)

  def compute_loss(self, batch: dict, step: jax.Array | None = None):
    """Mean next-token cross-entropy of the plain forward pass over `batch['tokens']` [B, T+1].
    Returns (loss, metrics); TTT mixers' inner-LR multiplier at `step` is `ttt_lr_mult`."""
    inputs, targets = split_batch(batch)
    logits, _ = self.forward(inputs, step=step)
    loss = token_nll(logits, targets, batch)
    metrics = {"loss": loss, **mixer_spec(self.cfg.mixer).metrics(self.cfg, step)}
    return loss, metrics


def split_batch(batch: dict):
  tokens = batch["tokens"]
  return tokens[:, :-1], tokens[:, 1:]


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x` over the positions `mask` weights (0 where it weights none)."""
  m = mask.astype(x.dtype)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


@jax.named_scope("loss")
def token_nll(logits: jax.Array, targets: jax.Array, batch: dict | None = None,
              reduce: bool = True) -> jax.Array:
  """Next-token NLL; `batch['loss_mask']` [B, T] (optional) weights the mean."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if not reduce:
    return nll
  mask = None if batch is None else batch.get("loss_mask")
  return jnp.mean(nll) if mask is None else masked_mean(nll, mask)
