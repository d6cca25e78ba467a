"""TTT-E2E inner loop as pure functions of (inner weights, outer weights, KV windows, chunk).

The model state is split by variable type: `inner` holds the prime MLPs' `InnerParam`s (w1, w2,
w3 of every suffix block), `outer` everything else. Each sequence of the batch has its own inner
weights (leading batch axis); the per-sequence functions here are `jax.vmap`ped over it.

One inner step on a chunk of `b` positions (one sequence):
  loss_i, (kv_{i+1}, h) = chunk_loss(W_i, outer, kv_i, chunk)        # logits made with W_i
  g_i = d loss_i / d W_i      (kv_i enters as an argument: constant for this gradient)
  W_{i+1} = W_i - lr * clip(g_i)                                     # one global norm over W
The outer gradient of mean_i loss_i flows through every W_i, g_i and kv_i (second order), unless
`second_order=False` (first-order approximation: the update is `stop_gradient`ed).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ttt_jax.layers.attention import AttentionAlgorithm, KVCache
from ttt_jax.models.lm import apply_block, masked_mean, remat_call
from ttt_jax.models.window_scan import window_scan
from ttt_jax.sharding import constrain, vmap_batch

# `model.e2e.remat_chunks_policy` -> jax.checkpoint policy of one chunk step. The step is vmapped
# over sequences, so its matmuls are batched: 'dots' keeps batched dot outputs too.
CHUNK_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_saveable}

# vmap axes of one KV window: keys/values per sequence, positions shared by the batch
KV_AXES = KVCache(k=0, v=0, pos=None)


def inner_lr(e2e_cfg, step) -> jax.Array:
  """ilr = ilr_init + (inner_lr - ilr_init) * min(1, (step+1)/ilr_warmup_steps); no step = full."""
  lr = jnp.float32(e2e_cfg.inner_lr)
  if step is None or e2e_cfg.ilr_warmup_steps <= 0:
    return lr
  progress = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / e2e_cfg.ilr_warmup_steps)
  return e2e_cfg.ilr_init + (lr - e2e_cfg.ilr_init) * progress


def clip_by_global_norm(grads, max_norm: float):
  """g * max_norm / max(|g|, max_norm) with one norm over every leaf; max_norm <= 0 = no clip."""
  if max_norm <= 0:
    return grads
  norm = optax.tree.norm(grads)
  scale = max_norm / jnp.maximum(norm, max_norm)
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


@jax.named_scope("inner_update")
def sgd_update(inner, grads, lr, clip: float, second_order: bool = True):
  """W - lr * clip(g); `second_order=False` hides the update from the outer gradient."""
  step = jax.tree.map(lambda g: lr * g, clip_by_global_norm(grads, clip))
  if not second_order:
    step = jax.tree.map(jax.lax.stop_gradient, step)
  return jax.tree.map(lambda w, s: w - s.astype(w.dtype), inner, step)


def constrain_inner(inner, logical_axes: list[tuple]):
  """Pins per-sequence inner weights [B, ...] to ('batch', <the parameter's logical axes>).

  `logical_axes` lists the axes of `inner`'s leaves in `jax.tree.leaves` order.
  """
  leaves, treedef = jax.tree.flatten(inner)
  leaves = [constrain(w, ("batch", *axes)) for w, axes in zip(leaves, logical_axes, strict=True)]
  return jax.tree.unflatten(treedef, leaves)


class SuffixRunner:
  """Applies the suffix blocks (+ final norm and head) of a model split as graphdef/inner/outer.

  All methods see ONE sequence: h [s, D], KV windows with k/v [C, H, d] and pos [C].
  `attention`: the suffix blocks' attention here (`model.e2e.inner_attention_impl`): this code
  is vmapped over sequences and, in meta-training, differentiated twice.
  """

  def __init__(self, graphdef, remat: str, attention: AttentionAlgorithm,
               mixed_first: bool = False):
    self.graphdef = graphdef
    self.remat = remat
    self.attention = attention
    # the first suffix block's mixer already ran over the whole sequence (its input, the prefix
    # output, does not depend on the inner weights): here only its per-token half runs, and
    # `kvs` holds the windows of the other suffix blocks
    self.mixed_first = mixed_first

  def model(self, inner, outer):
    model = nnx.merge(self.graphdef, inner, outer)
    for blk in model.suffix_blocks():  # a fresh object per merge: nothing else sees it
      blk.mixer.algorithm = self.attention
    return model

  def hidden(self, inner, outer, h, positions, kvs, valid: jax.Array | None = None):
    """(h_out [s, D] before the final norm, new KV windows).

    `valid=None`: every position is real and each window shifts by s (the block's own rule).
    `valid=n` (traced): only the first n positions are real (the rest have position -1); each
    window takes exactly those n keys, so a partly filled segment can be streamed.
    """
    model = self.model(inner, outer)
    x = h[None]
    new = []
    blocks = model.suffix_blocks()
    if self.mixed_first:
      if valid is not None:
        raise ValueError("SuffixRunner(mixed_first=True) runs whole chunks only (valid=None)")
      x = remat_call(blocks.pop(0), lambda blk, x: blk.branches(x), self.remat, x)
    for blk, kv in zip(blocks, kvs, strict=True):
      st = KVCache(kv.k[None], kv.v[None], kv.pos)
      if valid is None:
        x, st = apply_block(blk, x, positions, st, self.remat)
      else:
        s, cap = positions.shape[0], kv.pos.shape[0]
        pad = jnp.zeros((1, s, *kv.k.shape[1:]), kv.k.dtype)
        st = KVCache(jnp.concatenate([pad, st.k], 1), jnp.concatenate([pad, st.v], 1),
                     jnp.concatenate([jnp.full((s,), -1, jnp.int32), st.pos]))
        x, st = apply_block(blk, x, positions, st, self.remat)  # st = old window ++ segment
        st = KVCache(jax.lax.dynamic_slice_in_dim(st.k, valid, cap, axis=1),
                     jax.lax.dynamic_slice_in_dim(st.v, valid, cap, axis=1),
                     jax.lax.dynamic_slice_in_dim(st.pos, valid, cap, axis=0))
      new.append(KVCache(st.k[0], st.v[0], st.pos))
    return x[0], new

  def logits(self, inner, outer, h_out):
    return self.model(inner, outer).logits(h_out)

  def chunk_loss(self, inner, outer, kvs, h, positions, targets, mask):
    """Masked mean next-token NLL of one chunk with inner weights `inner`."""
    h_out, new_kvs = self.hidden(inner, outer, h, positions, kvs)
    logits = self.logits(inner, outer, h_out)
    with jax.named_scope("loss"):
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      loss = masked_mean(nll, mask)
    return loss, (new_kvs, h_out, nll)

  def inner_step(self, inner, outer, kvs, h, positions, targets, mask, lr, clip: float,
                 second_order: bool = True):
    """One chunk: loss and gradient from one forward pass, then the SGD update of `inner`."""
    grad_fn = jax.value_and_grad(self.chunk_loss, has_aux=True)
    (loss, (new_kvs, h_out, nll)), grads = grad_fn(inner, outer, kvs, h, positions, targets, mask)
    new_inner = sgd_update(inner, grads, lr, clip, second_order)
    return new_inner, new_kvs, loss, h_out, nll


def scan_chunks(step, consts, carry, windows: list[KVCache], xs, *, chunk: int, remat: bool,
                policy: str = "full", window_residuals: str = "windows"):
  """(carry, windows, ys): `step(consts, carry, windows, x)` scanned over the leading axis of
  `xs`, each trip appending `chunk` keys to every window; `remat`: each trip under
  `jax.checkpoint` with `policy`, its KV windows kept per trip ('windows') or rebuilt from each
  trip's new keys ('chunks': `window_scan`, which recomputes trips whole)."""
  if window_residuals == "chunks" and remat and windows and jax.tree.leaves(xs)[0].shape[0]:
    return window_scan(step, consts, carry, windows, xs, chunk=chunk)

  def body(c, x):
    carry, wins, ys = step(consts, *c, x)
    return (carry, wins), ys

  if remat:
    body = jax.checkpoint(body, policy=CHUNK_REMAT_POLICIES[policy])
  (carry, windows), ys = jax.lax.scan(body, (carry, windows), xs)
  return carry, windows, ys


def inner_loop(runner: SuffixRunner, inner0, outer, kv0, h, targets, mask, lr, *,
               chunk: int, clip: float, remat_chunks: bool, second_order: bool = True,
               inner_axes: Any = None, final_update: bool = False, remat_policy: str = "full",
               window_residuals: str = "windows", group: int = 1):
  """The inner loop over all chunks of a batch of sequences (training and one-shot inference).

  inner0: unbatched inner weights (broadcast to every sequence); kv0: batched empty KV windows
  of the suffix blocks; h [B, T, D] suffix inputs (prefix output); targets, mask [B, T].
  Returns (chunk losses [n, B], suffix outputs [B, T, D], nll [B, T], final inner weights).

  `remat_chunks`: each chunk step under `jax.checkpoint`; `remat_policy` 'full' recomputes the
  whole step in the backward pass, 'dots' keeps every matmul output of it (inner gradient
  included) and recomputes only the elementwise work. `window_residuals` (with remat_chunks and
  'full'): what the backward pass keeps of the KV windows, 'windows' every chunk's (the
  rematerialised scan's carry) or 'chunks' only each chunk's new keys, from which
  `window_scan` rebuilds the windows (same values and derivatives, less memory).

  The last chunk's update changes no loss and no output, so by default it is not made: the
  last chunk runs forward only and the returned weights are those its logits used (after n-1
  updates). `final_update=True` makes it and returns the weights after all n updates (what a
  stream that goes on reading needs); the losses, outputs and gradients are the same either way.

  `group` > 1 (a divisor of n; `model.e2e.remat_group`): remat through time. The loop runs as
  n / group checkpointed groups of `group` chunk steps, so the backward pass keeps the inner
  weights and windows at the start of each group only, and recomputes a group's chunk steps
  (keeping theirs) when it reaches that group: n / group + group copies of the per-sequence
  inner weights instead of n - 1, for one more forward pass of every chunk step. The loop is
  then uniform: the last chunk's update is always made and the weights after all n updates are
  returned (the losses, outputs and gradients are the same).
  """
  bsz, t, d = h.shape
  n = t // chunk
  inner = jax.tree.map(lambda w: jnp.broadcast_to(w, (bsz, *w.shape)), inner0)
  per_chunk = lambda x: x.reshape(bsz, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
  unchunk = lambda x: x.swapaxes(0, 1).reshape(bsz, t, *x.shape[3:])  # noqa: E731
  positions = jnp.arange(t, dtype=jnp.int32).reshape(n, chunk)
  xs = (per_chunk(h), positions, per_chunk(targets), per_chunk(mask))
  kv_axes = [KV_AXES] * len(kv0)

  def one(outer, lr, inner, kvs, h, pos, tgt, m):
    return runner.inner_step(inner, outer, kvs, h, pos, tgt, m, lr, clip, second_order)

  def last(inner, kvs, h, pos, tgt, m):  # forward only: loss, outputs and nll, no update
    loss, (_, h_out, nll) = runner.chunk_loss(inner, outer, kvs, h, pos, tgt, m)
    return loss, h_out, nll

  # on a mesh, the sequences stay split over the batch's mesh axes inside the vmap as well
  batched = vmap_batch(one, bsz, in_axes=(None, None, 0, kv_axes, 0, None, 0, 0),
                       out_axes=(0, kv_axes, 0, 0, 0))

  def step(consts, inner, kvs, x):  # one chunk of every sequence; closes over nothing traced
    inner, kvs, loss, h_out, nll = batched(*consts, inner, kvs, *x)
    if inner_axes is not None:
      inner = constrain_inner(inner, inner_axes)
    return inner, kvs, (loss, h_out, nll)

  if window_residuals == "chunks" and kv0 and not (remat_chunks and remat_policy == "full"):
    raise ValueError("window_residuals='chunks' recomputes each chunk step whole: it needs "
                     f"remat_chunks and remat_policy 'full' (got {remat_chunks}, "
                     f"{remat_policy!r})")
  consts = (outer, jnp.asarray(lr, jnp.float32))
  chunks = functools.partial(scan_chunks, chunk=chunk, remat=remat_chunks, policy=remat_policy,
                             window_residuals=window_residuals)
  if group > 1:
    if n % group:
      raise ValueError(f"group={group} must divide the {n} chunks")
    grouped = jax.tree.map(lambda x: x.reshape(n // group, group, *x.shape[1:]), xs)
    inner, _, ys = scan_chunks(functools.partial(chunks, step), consts, inner, kv0, grouped,
                               chunk=group * chunk, remat=True, window_residuals=window_residuals)
    losses, h_out, nll = jax.tree.map(lambda y: y.reshape(n, *y.shape[2:]), ys)
    return losses, unchunk(h_out), unchunk(nll), inner
  n_scan = n if final_update else n - 1
  inner, kvs, (losses, h_out, nll) = chunks(step, consts, inner, kv0,
                                            jax.tree.map(lambda x: x[:n_scan], xs))
  if not final_update:
    loss_n, h_n, nll_n = vmap_batch(last, bsz, in_axes=(0, kv_axes, 0, None, 0, 0))(
        inner, kvs, *jax.tree.map(lambda x: x[n - 1], xs))
    losses, h_out, nll = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]),
                                      (losses, h_out, nll), (loss_n, h_n, nll_n))
  return losses, unchunk(h_out), unchunk(nll), inner
