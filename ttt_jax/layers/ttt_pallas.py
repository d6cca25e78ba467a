"""Pallas kernels for the TTT inner loop (`model.ttt.impl=pallas`), written for GPUs (Triton):
what the kernels of every inner model share (launch parameters, dots, block specs, the sequence
layout). The kernels: layers/ttt_pallas_linear.py (TTT-Linear), layers/ttt_pallas_mlp.py
(TTT-MLP). Each runs a whole sequence in two launches, one program per (sequence, head): the
forward walks the n mini-batches in order and stores the inner weights each started from, the
backward walks them in reverse from those. XLA's scan of the dual form issues dozens of small
kernels per mini-batch (forward, remat recompute, backward). All work that does not depend on W
stays in batched XLA ops around the kernels, as in `ttt_dual`.

Sharding: a kernel call carries no partitioning rule, so in a program traced on a multi-device
mesh (the trainer's steps; evaluation, generation and TLM through `sharding.OnParamsMesh`) the
layer runs it per device on that device's sequences and heads (`sharding.per_shard` in
layers/ttt.py).

Memory: the forward kernels keep every W_i for the backward, O(n |W|) per layer instead of
remat's O(n / k |W|) (`model.ttt.remat_group` does not apply to this path).

Triton's constraints shape the code: block dimensions are powers of two (mini-batch size and
head dim), matmuls have every dimension >= 16, and kernel bodies index refs but never slice
values, so inputs are laid out so each mini-batch is one ref window. Another head dim (96 at
760m, 80 at 3b) runs zero-padded to `common.padded_dim`: the kernels' LayerNorms normalise over
the true width (`ttt_inner.ln_l2_grad_parts`' `width`), so the padding stays zero in the inner
weights' updates and outputs, and the results equal the unpadded ones
(tests/layers/test_ttt_pallas.py). TTT-Linear's W (d x d) and its products grow by up to
(padded / d)^2 (1.78x at 96, 2.56x at 80), TTT-MLP's (d x 4d, the hidden width unpadded) by
padded / d.

Dots take the caller's matmul precision, as XLA's dual form does: on a GPU the default is TF32
tensor cores, `jax.default_matmul_precision('highest')` gives IEEE fp32. Warps and pipeline
stages are `Tuning()` (`tuning(...)` overrides them while a step is traced; `make gpu-check`
sweeps them).
`interpret=True` runs the same kernels with the Pallas interpreter (CPU tests);
the CUDA lowering of both is tested on CPU (tests/test_gpu_lowering.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ttt_jax.layers import ttt_inner
from ttt_jax.layers.common import triton, triton_dim


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch parameters (Triton is chosen explicitly: JAX may default pallas_call to
  Mosaic GPU). Defaults from `make gpu-check`'s tune task on an H200 (TTT-Linear layer
  fwd+bwd at [8, 2048, 512], TF32): 4 warps with 3 stages 3.22 ms, 1 stage 3.58 ms, 8 warps
  3.24 ms, 2 warps 29 ms. TTT-MLP's kernels (layers/ttt_pallas_mlp.py) take their own warps,
  work on `mlp_block` hidden units at a time (a power of two >= 16 dividing the hidden width;
  the whole hidden layer where it is smaller) and always run one pipeline stage: each
  mini-batch reads blocks the one before wrote, which a software-pipelined loop would prefetch
  before they are written. Not yet timed on a GPU: their defaults (8 warps, 32-unit blocks,
  loops over the blocks) are, of the loop settings `make gpu-census` builds with blocks of 32
  units or more, the one ptxas spills least at in both kernels (docs/gpu_census.md)."""
  num_warps: int = 4
  num_stages: int = 3
  mlp_num_warps: int = 8
  mlp_block: int = 32
  # TTT-MLP's passes over the hidden blocks: loops in the kernels (False), or written out block
  # by block (True: about 4x the build time for an H200; ptxas spills less in the forward kernel and
  # more in the backward, docs/gpu_census.md). Not yet timed on a GPU (gpu-check's tune_mlp
  # times both).
  mlp_unroll: bool = False
  # where TTT-Linear's output z_i = XQ_i W_i + b_i - A_i G_i is made: 'kernel' (in the
  # sequential kernels, as measured on an H200) or 'xla' (batched XLA ops over the stored W_i
  # and G_i after them: the kernels then carry the W chain alone; not yet timed on a GPU)
  linear_output: str = "kernel"


_TUNING = contextvars.ContextVar("ttt_pallas_tuning", default=Tuning())  # noqa: B039 (frozen)


def current_tuning() -> Tuning:
  """The launch parameters kernels traced now get (`Tuning()` unless inside `tuning(...)`)."""
  return _TUNING.get()


@contextlib.contextmanager
def tuning(**changes):
  """Overrides `Tuning` fields for the kernels traced inside the block; the setting is local to
  this context (thread, task) and undone on exit.

  JAX caches traces by function and argument types (`jax.checkpoint`'s, among others), not by
  this setting, so a step traced inside the block could reuse kernels traced outside it, or
  the other way round. A block that changes the setting therefore clears JAX's caches, which
  are the whole process's, on entry and on exit (`jax.clear_caches`: functions jitted before
  trace and compile again; compiled executables are kept)."""
  before = _TUNING.get()
  after = dataclasses.replace(before, **changes)
  changed = after != before
  token = _TUNING.set(after)
  try:
    if changed:
      jax.clear_caches()
    yield after
  finally:
    _TUNING.reset(token)
    if changed:
      jax.clear_caches()


def _compiler_params(mlp: bool = False):
  t, backend = _TUNING.get(), triton("model.ttt.impl")
  if mlp:  # one stage: see `Tuning`
    return backend.CompilerParams(num_warps=t.mlp_num_warps, num_stages=1)
  return backend.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def check_geometry(mini_batch_size: int) -> str | None:
  """Why the kernels cannot run this geometry on a GPU (None: they can). Any head dim runs,
  padded to `common.padded_dim` (and TTT-MLP's hidden width to whole `Tuning.mlp_block`s)."""
  if not triton_dim(mini_batch_size):
    return (f"model.ttt.mini_batch_size={mini_batch_size} must be a power of two >= 16 for "
            "model.ttt.impl=pallas")
  return None


def fit(x, sizes: dict[int, int]):
  """`x` zero-padded or cut to `sizes[axis]` along each axis (negative indices); `x` itself where
  it has those sizes. The kernels' inputs are padded to Triton block widths with it, and their
  outputs cut back."""
  if all(x.shape[a] == n for a, n in sizes.items()):
    return x
  cut, widths = [slice(None)] * x.ndim, [(0, 0)] * x.ndim
  for a, n in sizes.items():
    cut[a], widths[a] = slice(0, min(n, x.shape[a])), (0, max(0, n - x.shape[a]))
  x = x[tuple(cut)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def dot(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_t(a, b):  # a @ b^T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def t_dot(a, b):  # a^T @ b
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def ln_l2_bwd(u, g, scale, parts, width=None):
  """`ttt_inner.ln_l2_grad_cotangents` with scale's and bias's summed over the rows."""
  dz, dt, ds, db = ttt_inner.ln_l2_grad_cotangents(u, g, scale, parts, width)
  return dz, dt, jnp.sum(ds, axis=0, keepdims=True), jnp.sum(db, axis=0, keepdims=True)


# -- block specs ---------------------------------------------------------------------------------
def seq_spec(shape):
  """One (sequence, head) of an array [B, H, ...]: the kernel sees [...]."""
  rest = tuple(shape[2:])
  return pl.BlockSpec((None, None, *rest), lambda i, j: (i, j) + (0,) * len(rest))


def ln_spec(shape):
  """One head of a per-head LayerNorm parameter [H, 1, d]."""
  return pl.BlockSpec((None, *shape[1:]), lambda i, j: (j, 0, 0))


def f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def launch_per_head(kernel, ins, specs, out_shape, interpret, mlp: bool = False):
  """One program per (sequence, head): the grid is the leading two axes of the outputs."""
  return pl.pallas_call(kernel, out_shape=out_shape, grid=out_shape[0].shape[:2], in_specs=specs,
                        out_specs=[seq_spec(s.shape) for s in out_shape],
                        compiler_params=_compiler_params(mlp), interpret=interpret)(*ins)


def block_rows(i, b):
  return pl.ds(pl.multiple_of(i * b, b), b)


def row(ref, i, cols=slice(None)):
  """Row i of a [m, k] ref (columns `cols`), as [1, k]."""
  return ref[pl.ds(i, 1), cols]


def update_rates(eta, complete=None):
  """lr = -eta[b, :] [n, B, H, b, 1]: each mini-batch's update weights (the last row of its
  eta); `complete` [n] bool (streaming): 0 for an incomplete mini-batch, whose update is then
  exactly W + 0 (its outputs, made with W_i, need no update)."""
  lr = -eta[..., -1, :, None]
  if complete is None:
    return lr
  return lr * complete.astype(lr.dtype)[:, None, None, None, None]


def to_sequence(x):
  """Mini-batches [n, B, H, b, k] as one sequence per (sequence, head): [B, H, n * b, k]."""
  n, bsz, heads, b = x.shape[:4]
  return jnp.moveaxis(x, 0, 2).reshape(bsz, heads, n * b, x.shape[-1])


def from_sequence(x, n: int):
  """`to_sequence`'s inverse: [B, H, n * b, k] -> [n, B, H, b, k]."""
  bsz, heads, t, k = x.shape
  return jnp.moveaxis(x.reshape(bsz, heads, n, t // n, k), 2, 0)


def sequence_output(z, ln, xq, kernel_layout: bool = False):
  """XQ + LN_h(z) in mini-batches [n, B, H, b, d], from a kernel's z [B, H, n * b, d], the
  LayerNorm on the mini-batches or (`kernel_layout`) on z as the kernel wrote it. XLA:GPU makes
  each normalization a tiled fusion and, to fuse its neighbours, searches tilings over every
  axis of its shape, and which layout costs it less depends on the program: at the gpu preset
  TTT-MLP's step builds about 4 s faster on the kernel layout, TTT-Linear's slower
  (docs/gpu_census.md)."""
  if kernel_layout:
    return xq + from_sequence(ttt_inner.layer_norm(z, *ln), xq.shape[0])
  return xq + ttt_inner.layer_norm(from_sequence(z, xq.shape[0]), *ln)
