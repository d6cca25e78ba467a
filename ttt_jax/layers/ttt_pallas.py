"""Pallas kernels for the TTT inner loop (`model.ttt.impl=pallas`), written for GPUs (Triton).

TTT-Linear: the whole sequence in two kernels. The forward kernel runs one program per
(sequence, head); it keeps W and b in registers and walks the n mini-batches in order, writing
each mini-batch's pre-LayerNorm output z_i = XQ_i W_i + b_i - A_i G_i and the W_i it started
from. The backward kernel walks them in reverse, recomputing G_i from the stored W_i, and
carries dW, db back through the updates. XLA's scan of the dual form issues dozens of small
kernels per mini-batch (forward, remat recompute, backward); here it is one launch each way.
All work that does not depend on W stays in batched XLA ops around the kernels, as in
`ttt_dual`: A_i = tril(eta_i) * (XQ_i XK_i^T + 1), the update weights -eta_i[b, :], the labels
XV - XK, and the output XQ + LN_h(z).

TTT-MLP: the same two launches, in layers/ttt_pallas_mlp.py (its W1/W2 live in memory, worked
on in blocks of the hidden layer); this module holds what both share (launch parameters, dots,
block specs).

Sharding: a kernel call carries no partitioning rule, so on a multi-device mesh XLA would
run it unsplit; `model.ttt.impl=auto` takes these kernels on a single GPU only.

Memory: the forward kernels keep every W_i for the backward, O(n |W|) per layer instead of
remat's O(n / k |W|) (`model.ttt.remat_group` does not apply to this path).

Triton's constraints shape the code: block dimensions are powers of two (mini-batch size and
head dim), matmuls have every dimension >= 16, and kernel bodies index refs but never slice
values, so inputs are laid out so each mini-batch is one ref window. Dots take the caller's
matmul precision, as XLA's dual form does: on a GPU the default is TF32 tensor cores,
`jax.default_matmul_precision('highest')` gives IEEE fp32. Warps and pipeline stages are
`Tuning()` (`tuning(...)` overrides them while a step is traced; `make gpu-check` sweeps them).
`interpret=True` runs the same kernels with the Pallas interpreter (CPU tests);
the CUDA lowering of both is tested on CPU (tests/test_gpu_lowering.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ttt_jax.layers import ttt_inner
from ttt_jax.layers.common import KERNEL_OUTPUTS, triton_dim


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch parameters (Triton is chosen explicitly: JAX may default pallas_call to
  Mosaic GPU). Defaults from `make gpu-check`'s tune task on an H200 (TTT-Linear layer
  fwd+bwd at [8, 2048, 512], TF32): 4 warps with 3 stages 3.22 ms, 1 stage 3.58 ms, 8 warps
  3.24 ms, 2 warps 29 ms. TTT-MLP's kernels (layers/ttt_pallas_mlp.py) take their own warps,
  work on `mlp_block` hidden units at a time (a power of two >= 16 dividing the hidden width;
  the whole hidden layer where it is smaller) and always run one pipeline stage: each
  mini-batch reads blocks the one before wrote, which a software-pipelined loop would prefetch
  before they are written. Not yet timed on a GPU; `make gpu-census` reports the registers and
  spills ptxas gives them at several settings (docs/benchmarks.md)."""
  num_warps: int = 4
  num_stages: int = 3
  mlp_num_warps: int = 8
  mlp_block: int = 64
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
  """Overrides `Tuning` fields for the kernels traced inside the block (a new jit traces); the
  setting is local to this context (thread, task) and undone on exit."""
  token = _TUNING.set(dataclasses.replace(_TUNING.get(), **changes))
  try:
    yield _TUNING.get()
  finally:
    _TUNING.reset(token)


def _compiler_params(mlp: bool = False):
  t = _TUNING.get()
  if mlp:  # one stage: see `Tuning`
    return pltriton.CompilerParams(num_warps=t.mlp_num_warps, num_stages=1)
  return pltriton.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def check_geometry(mini_batch_size: int, head_dim: int) -> str | None:
  """Why the kernels cannot run this geometry on a GPU (None: they can)."""
  for name, n in (("model.ttt.mini_batch_size", mini_batch_size),
                  ("the head dim model.d_model / model.num_heads", head_dim)):
    if not triton_dim(n):
      return f"{name}={n} must be a power of two >= 16 for model.ttt.impl=pallas"
  return None


def dot(a, b):  # a @ b
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def dot_t(a, b):  # a @ b^T
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def t_dot(a, b):  # a^T @ b
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def ln_l2_bwd(u, g, scale, parts):
  """`ttt_inner.ln_l2_grad_cotangents` with scale's and bias's summed over the rows."""
  dz, dt, ds, db = ttt_inner.ln_l2_grad_cotangents(u, g, scale, parts)
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


# -- TTT-Linear over a whole sequence ------------------------------------------------------------
# Layout (per sequence and head): xq, xk, target [T, d]; attn [T, b] (rows of mini-batch i are
# its A_i); lr [T, 1] (-eta_i[b, s] of token s); w [d, d]; b [1, d]; n = T / b mini-batches.


def block_rows(i, b):
  return pl.ds(pl.multiple_of(i * b, b), b)


def _walk_back(n, step, scale, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref):
  """The backward kernels' reverse walk: step(i, dW_{i+1}, db_{i+1}) -> (dW_i, db_i, and mini-
  batch i's LayerNorm scale and bias cotangents) for i = n-1 .. 0, from dW_n, db_n; writes
  dW_0, db_0 and the LayerNorm cotangents' sums."""
  def body(j, carry):
    dw, dbias, dscale, dbeta = carry
    dw, dbias, dsc, dbe = step(n - 1 - j, dw, dbias)
    return dw, dbias, dscale + dsc, dbeta + dbe

  zeros = jnp.zeros_like(scale)
  out = jax.lax.fori_loop(0, n, body, (dwn_ref[...], dbn_ref[...], zeros, zeros))
  for ref, value in zip((dw_ref, db_ref, ds_ref, dbeta_ref), out, strict=True):
    ref[...] = value


def _lr_cotangent(k, d_lk, g, dbias):
  """Cotangent of lr [b, 1] in W' = W + (lr * k)^T g, b' = b + lr^T g."""
  return jnp.sum(k * d_lk, axis=-1, keepdims=True) + jnp.sum(g * dbias, axis=-1, keepdims=True)


def _linear_fwd_kernel(w_ref, b_ref, s_ref, beta_ref, q_ref, k_ref, t_ref, a_ref, lr_ref,
                       wn_ref, bn_ref, z_ref, ws_ref, bs_ref):
  b = a_ref.shape[-1]
  n = q_ref.shape[0] // b
  scale, beta = s_ref[...], beta_ref[...]

  def body(i, carry):
    w, bias = carry
    rows = block_rows(i, b)
    q, k = q_ref[rows, :], k_ref[rows, :]
    g, _ = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta)
    z_ref[rows, :] = dot(q, w) + bias - dot(a_ref[rows, :], g)
    ws_ref[i] = w
    bs_ref[pl.ds(i, 1), :] = bias
    lr = lr_ref[rows, :]
    return w + t_dot(lr * k, g), bias + jnp.sum(lr * g, axis=0, keepdims=True)

  w, bias = jax.lax.fori_loop(0, n, body, (w_ref[...], b_ref[...]))
  wn_ref[...] = w
  bn_ref[...] = bias


def _linear_bwd_kernel(s_ref, beta_ref, q_ref, k_ref, t_ref, a_ref, lr_ref, ws_ref, bs_ref,
                       dz_ref, dwn_ref, dbn_ref,
                       dw_ref, db_ref, ds_ref, dbeta_ref, dq_ref, dk_ref, dt_ref, da_ref, dlr_ref):
  b = a_ref.shape[-1]
  n = q_ref.shape[0] // b
  scale, beta = s_ref[...], beta_ref[...]

  def step(i, dw, dbias):  # dw, dbias: cotangents of W_{i+1}, b_{i+1}
    rows = block_rows(i, b)
    w, bias = ws_ref[i], bs_ref[pl.ds(i, 1), :]
    q, k, a, lr, dz = q_ref[rows, :], k_ref[rows, :], a_ref[rows, :], lr_ref[rows, :], dz_ref[
        rows, :]
    g, parts = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta)
    # W_{i+1} = W_i + (lr * k)^T g,  b_{i+1} = b_i + sum_s lr_s g_s
    lk = lr * k
    dg = dot(lk, dw) + lr * dbias - t_dot(a, dz)  # ... and z_i = q W_i + b_i - A_i g
    d_lk = dot_t(g, dw)
    dlr_ref[rows, :] = _lr_cotangent(k, d_lk, g, dbias)
    da_ref[rows, :] = -dot_t(dz, g)
    dp, dt, dsc, dbe = ln_l2_bwd(dg, g, scale, parts)  # g = LN-L2 gradient at p = k W_i + b_i
    dt_ref[rows, :] = dt
    dq_ref[rows, :] = dot_t(dz, w)
    dk_ref[rows, :] = dot_t(dp, w) + lr * d_lk
    dw = dw + t_dot(q, dz) + t_dot(k, dp)
    dbias = dbias + jnp.sum(dz, axis=0, keepdims=True) + jnp.sum(dp, axis=0, keepdims=True)
    return dw, dbias, dsc, dbe

  _walk_back(n, step, scale, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref)


def _linear_forward(interpret, w, bias, scale, beta, xq, xk, target, attn, lr):
  bsz, heads, t, d = xq.shape
  n = t // attn.shape[-1]
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, t, d),
               f32(bsz, heads, n, d, d), f32(bsz, heads, n, d)]
  ins = [w, bias, scale, beta, xq, xk, target, attn, lr]
  specs = ([seq_spec(w.shape), seq_spec(bias.shape), ln_spec(scale.shape),
            ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[4:]])
  return launch_per_head(_linear_fwd_kernel, ins, specs, out_shape, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def linear_sequence_core(interpret, w, bias, scale, beta, xq, xk, target, attn, lr):
  """(W_n, b_n, z [B, H, T, d] before the output LayerNorm) of TTT-Linear over a sequence."""
  wn, bn, z, _, _ = _linear_forward(interpret, w, bias, scale, beta, xq, xk, target, attn, lr)
  return wn, bn, z


def _core_fwd(interpret, w, bias, scale, beta, xq, xk, target, attn, lr):
  outs = _linear_forward(interpret, w, bias, scale, beta, xq, xk, target, attn, lr)
  # named, so a remat policy can keep them (`model.remat=kernels`): every output of the forward
  # kernel the backward pass reads is then saved, and the kernel is not run again there
  wn, bn, z, ws, bs = (checkpoint_name(x, KERNEL_OUTPUTS) for x in outs)
  return (wn, bn, z), (scale, beta, xq, xk, target, attn, lr, ws, bs)


def _core_bwd(interpret, res, cot):
  scale, beta, xq, xk, target, attn, lr, ws, bs = res
  dwn, dbn, dz = cot
  bsz, heads, t, d = xq.shape
  shapes = [(bsz, heads, d, d), (bsz, heads, 1, d), (bsz, heads, 1, d), (bsz, heads, 1, d),
            xq.shape, xk.shape, target.shape, attn.shape, lr.shape]
  out_shape = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  ins = [scale, beta, xq, xk, target, attn, lr, ws, bs, dz, dwn, dbn]
  specs = [ln_spec(scale.shape), ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[2:]]
  dw, db, ds, dbeta, dq, dk, dt, da, dlr = launch_per_head(_linear_bwd_kernel, ins, specs,
                                                            out_shape, interpret)
  return dw, db, ds.sum(0), dbeta.sum(0), dq, dk, dt, da, dlr


linear_sequence_core.defvjp(_core_fwd, _core_bwd)


def to_sequence(x):
  """Mini-batches [n, B, H, b, k] as one sequence per (sequence, head): [B, H, n * b, k]."""
  n, bsz, heads, b = x.shape[:4]
  return jnp.moveaxis(x, 0, 2).reshape(bsz, heads, n * b, x.shape[-1])


def sequence_output(z, ln, xq):
  """XQ + LN_h(z) in mini-batches [n, B, H, b, d], from a kernel's z [B, H, n * b, d]."""
  n, bsz, heads, b, d = xq.shape
  z = jnp.moveaxis(z.reshape(bsz, heads, n, b, d), 2, 0)
  return xq + ttt_inner.layer_norm(z, *ln)


# -- TTT-Linear's W chain alone (`Tuning.linear_output='xla'`) ------------------------------------
# The kernels carry W_{i+1} = W_i + (lr XK_i)^T G_i, G_i = the LN-L2 gradient at XK_i W_i + b_i,
# and write every W_i, b_i and G_i; z_i = XQ_i W_i + b_i - A_i G_i is then batched XLA work
# (XLA also differentiates it, so the backward kernel receives the cotangents of W_i, b_i, G_i).


def _chain_fwd_kernel(w_ref, b_ref, s_ref, beta_ref, k_ref, t_ref, lr_ref,
                      wn_ref, bn_ref, g_ref, ws_ref, bs_ref):
  n = ws_ref.shape[0]
  b = k_ref.shape[0] // n
  scale, beta = s_ref[...], beta_ref[...]

  def body(i, carry):
    w, bias = carry
    rows = block_rows(i, b)
    k, lr = k_ref[rows, :], lr_ref[rows, :]
    g, _ = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta)
    g_ref[rows, :] = g
    ws_ref[i] = w
    bs_ref[pl.ds(i, 1), :] = bias
    return w + t_dot(lr * k, g), bias + jnp.sum(lr * g, axis=0, keepdims=True)

  w, bias = jax.lax.fori_loop(0, n, body, (w_ref[...], b_ref[...]))
  wn_ref[...] = w
  bn_ref[...] = bias


def _chain_bwd_kernel(s_ref, beta_ref, k_ref, t_ref, lr_ref, ws_ref, bs_ref, dg_ref, dws_ref,
                      dbs_ref, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref, dk_ref,
                      dt_ref, dlr_ref):
  n = ws_ref.shape[0]
  b = k_ref.shape[0] // n
  scale, beta = s_ref[...], beta_ref[...]

  def step(i, dw, dbias):  # dw, dbias: cotangents of W_{i+1}, b_{i+1}
    rows = block_rows(i, b)
    w, bias = ws_ref[i], bs_ref[pl.ds(i, 1), :]
    k, lr = k_ref[rows, :], lr_ref[rows, :]
    g, parts = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta)
    lk = lr * k  # W_{i+1} = W_i + lk^T G_i,  b_{i+1} = b_i + lr^T G_i; G_i is also an output
    dg = dot(lk, dw) + lr * dbias + dg_ref[rows, :]
    d_lk = dot_t(g, dw)
    dlr_ref[rows, :] = _lr_cotangent(k, d_lk, g, dbias)
    dp, dt, dsc, dbe = ln_l2_bwd(dg, g, scale, parts)  # G_i = LN-L2 gradient at XK_i W_i + b_i
    dt_ref[rows, :] = dt
    dk_ref[rows, :] = dot_t(dp, w) + lr * d_lk
    dw = dw + dws_ref[i] + t_dot(k, dp)
    dbias = dbias + dbs_ref[pl.ds(i, 1), :] + jnp.sum(dp, axis=0, keepdims=True)
    return dw, dbias, dsc, dbe

  _walk_back(n, step, scale, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def linear_chain(interpret, n, w, bias, scale, beta, xk, target, lr):
  """(W_n, b_n, W_i [B, H, n, d, d], b_i [B, H, n, d], G [B, H, T, d]) of TTT-Linear's W chain
  over a sequence of n mini-batches."""
  return _chain_launch(interpret, n, w, bias, scale, beta, xk, target, lr)


def _chain_launch(interpret, n, w, bias, scale, beta, xk, target, lr):
  bsz, heads, t, d = xk.shape
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, t, d),
               f32(bsz, heads, n, d, d), f32(bsz, heads, n, d)]
  ins = [w, bias, scale, beta, xk, target, lr]
  specs = ([seq_spec(w.shape), seq_spec(bias.shape), ln_spec(scale.shape),
            ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[4:]])
  wn, bn, g, ws, bs = launch_per_head(_chain_fwd_kernel, ins, specs, out_shape, interpret)
  return wn, bn, ws, bs, g


def _chain_fwd(interpret, n, w, bias, scale, beta, xk, target, lr):
  outs = tuple(checkpoint_name(x, KERNEL_OUTPUTS)  # as `_core_fwd`'s
               for x in _chain_launch(interpret, n, w, bias, scale, beta, xk, target, lr))
  return outs, (scale, beta, xk, target, lr, outs[2], outs[3])


def _chain_bwd(interpret, n, res, cot):
  scale, beta, xk, target, lr, ws, bs = res
  dwn, dbn, dws, dbs, dg = cot
  bsz, heads, t, d = xk.shape
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, 1, d),
               f32(bsz, heads, 1, d), f32(*xk.shape), f32(*target.shape), f32(*lr.shape)]
  ins = [scale, beta, xk, target, lr, ws, bs, dg, dws, dbs, dwn, dbn]
  specs = [ln_spec(scale.shape), ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[2:]]
  dw, db, ds, dbeta, dk, dt, dlr = launch_per_head(_chain_bwd_kernel, ins, specs, out_shape,
                                                   interpret)
  return dw, db, ds.sum(0), dbeta.sum(0), dk, dt, dlr


linear_chain.defvjp(_chain_fwd, _chain_bwd)


def linear_sequence(params, ln, xq, xk, xv, eta, *, interpret: bool = False):
  """TTT-Linear over mini-batches xq, xk, xv [n, B, H, b, d], eta [n, B, H, b, b] with the two
  kernels. Same contract as `ttt_dual.dual_sequence('linear', ...)` without remat or partial
  mini-batches: returns (final params, outputs XQ + LN_h(z) [n, B, H, b, d])."""
  attn = jnp.tril(eta) * (ttt_inner.mm_t(xq, xk) + 1.0)  # the bias's share of the correction: +1
  lr = -eta[..., -1, :, None]  # [n, B, H, b, 1]
  where = current_tuning().linear_output
  if where == "xla":
    wn, bn, ws, bs, g = linear_chain(interpret, xq.shape[0], params["w"], params["b"], *ln,
                                     *map(to_sequence, (xk, xv - xk, lr)))
    g = jnp.moveaxis(g.reshape(*g.shape[:2], *xq.shape[0:1], -1, g.shape[-1]), 2, 0)
    z = (jnp.einsum("nBHbd,BHnde->nBHbe", xq, ws) + jnp.moveaxis(bs, 2, 0)[..., None, :]
         - ttt_inner.mm(attn, g))
    return {"w": wn, "b": bn}, xq + ttt_inner.layer_norm(z, *ln)
  if where != "kernel":
    raise ValueError(f"ttt_pallas.Tuning.linear_output={where!r}: 'kernel' or 'xla'")
  wn, bn, z = linear_sequence_core(interpret, params["w"], params["b"], *ln,
                                   *map(to_sequence, (xq, xk, xv - xk, attn, lr)))
  return {"w": wn, "b": bn}, sequence_output(z, ln, xq)
