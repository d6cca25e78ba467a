"""Pallas (Triton) kernels for TTT-Linear over a whole sequence (`model.ttt.impl=pallas`).

The forward kernel runs one program per (sequence, head); it keeps W and b in registers and
walks the n mini-batches in order, writing each mini-batch's pre-LayerNorm output
z_i = XQ_i W_i + b_i - A_i G_i and the W_i it started from. The backward kernel walks them in
reverse, recomputing G_i from the stored W_i, and carries dW, db back through the updates.
Around the kernels, in batched XLA ops: A_i = tril(eta_i) * (XQ_i XK_i^T + 1), the update
weights -eta_i[b, :], the labels XV - XK, and the output XQ + LN_h(z).

`Tuning.linear_output='xla'` takes all but the W chain out of the kernels: they carry the chain
alone (two matmuls per mini-batch forward instead of four, two instead of nine backward). The
forward writes every W_i, b_i and G_i; z is then batched XLA matmuls over all mini-batches,
which XLA differentiates, handing the backward kernel the cotangents of W_i, b_i and G_i. That
kernel writes, per mini-batch, the cotangents of p_i = XK_i W_i + b_i and of W_{i+1}, b_{i+1},
and batched XLA matmuls make the cotangents of XK and the LRs from them. Neither kernel reads a
ref it writes, so Triton may pipeline their loops (`Tuning.num_stages`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from ttt_jax.layers import ttt_inner
from ttt_jax.layers.common import KERNEL_OUTPUTS, padded_dim
from ttt_jax.layers.ttt_pallas import (
  block_rows,
  current_tuning,
  dot,
  dot_t,
  f32,
  fit,
  from_sequence,
  launch_per_head,
  ln_l2_bwd,
  ln_spec,
  row,
  seq_spec,
  sequence_output,
  t_dot,
  to_sequence,
  update_rates,
)

# -- TTT-Linear over a whole sequence ------------------------------------------------------------
# Layout (per sequence and head): xq, xk, target [T, d]; attn [T, b] (rows of mini-batch i are
# its A_i); lr [T, 1] (-eta_i[b, s] of token s); w [d, d]; b [1, d]; n = T / b mini-batches.


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
  """Cotangent of lr [..., b, 1] in W' = W + (lr * k)^T g, b' = b + lr^T g (in a kernel, or
  batched over mini-batches)."""
  return jnp.sum(k * d_lk, axis=-1, keepdims=True) + jnp.sum(g * dbias, axis=-1, keepdims=True)


def _linear_fwd_kernel(w_ref, b_ref, s_ref, beta_ref, q_ref, k_ref, t_ref, a_ref, lr_ref,
                       wn_ref, bn_ref, z_ref, ws_ref, bs_ref, *, width=None):
  b = a_ref.shape[-1]
  n = q_ref.shape[0] // b
  scale, beta = s_ref[...], beta_ref[...]

  def body(i, carry):
    w, bias = carry
    rows = block_rows(i, b)
    q, k = q_ref[rows, :], k_ref[rows, :]
    g, _ = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta,
                                      width=width)
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
                       dw_ref, db_ref, ds_ref, dbeta_ref, dq_ref, dk_ref, dt_ref, da_ref, dlr_ref,
                       *, width=None):
  b = a_ref.shape[-1]
  n = q_ref.shape[0] // b
  scale, beta = s_ref[...], beta_ref[...]

  def step(i, dw, dbias):  # dw, dbias: cotangents of W_{i+1}, b_{i+1}
    rows = block_rows(i, b)
    w, bias = ws_ref[i], row(bs_ref, i)
    q, k, a, lr, dz = q_ref[rows, :], k_ref[rows, :], a_ref[rows, :], lr_ref[rows, :], dz_ref[
        rows, :]
    g, parts = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta,
                                          width=width)
    # W_{i+1} = W_i + (lr * k)^T g,  b_{i+1} = b_i + sum_s lr_s g_s
    lk = lr * k
    dg = dot(lk, dw) + lr * dbias - t_dot(a, dz)  # ... and z_i = q W_i + b_i - A_i g
    d_lk = dot_t(g, dw)
    dlr_ref[rows, :] = _lr_cotangent(k, d_lk, g, dbias)
    da_ref[rows, :] = -dot_t(dz, g)
    dp, dt, dsc, dbe = ln_l2_bwd(dg, g, scale, parts, width)  # g: LN-L2 grad at k W_i + b_i
    dt_ref[rows, :] = dt
    dq_ref[rows, :] = dot_t(dz, w)
    dk_ref[rows, :] = dot_t(dp, w) + lr * d_lk
    dw = dw + t_dot(q, dz) + t_dot(k, dp)
    dbias = dbias + jnp.sum(dz, axis=0, keepdims=True) + jnp.sum(dp, axis=0, keepdims=True)
    return dw, dbias, dsc, dbe

  _walk_back(n, step, scale, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref)


def _linear_forward(interpret, width, w, bias, scale, beta, xq, xk, target, attn, lr):
  bsz, heads, t, d = xq.shape
  n = t // attn.shape[-1]
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, t, d),
               f32(bsz, heads, n, d, d), f32(bsz, heads, n, d)]
  ins = [w, bias, scale, beta, xq, xk, target, attn, lr]
  specs = ([seq_spec(w.shape), seq_spec(bias.shape), ln_spec(scale.shape),
            ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[4:]])
  return launch_per_head(functools.partial(_linear_fwd_kernel, width=width), ins, specs,
                         out_shape, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def linear_sequence_core(interpret, width, w, bias, scale, beta, xq, xk, target, attn, lr):
  """(W_n, b_n, z [B, H, T, d] before the output LayerNorm) of TTT-Linear over a sequence
  (`width`: the head dim's features, the columns past them zero padding; None: no padding)."""
  wn, bn, z, _, _ = _linear_forward(interpret, width, w, bias, scale, beta, xq, xk, target, attn,
                                    lr)
  return wn, bn, z


def _core_fwd(interpret, width, w, bias, scale, beta, xq, xk, target, attn, lr):
  outs = _linear_forward(interpret, width, w, bias, scale, beta, xq, xk, target, attn, lr)
  # named, so a remat policy can keep them (`model.remat=kernels`): every output of the forward
  # kernel the backward pass reads is then saved, and the kernel is not run again there
  wn, bn, z, ws, bs = (checkpoint_name(x, KERNEL_OUTPUTS) for x in outs)
  return (wn, bn, z), (scale, beta, xq, xk, target, attn, lr, ws, bs)


def _core_bwd(interpret, width, res, cot):
  scale, beta, xq, xk, target, attn, lr, ws, bs = res
  dwn, dbn, dz = cot
  bsz, heads, t, d = xq.shape
  shapes = [(bsz, heads, d, d), (bsz, heads, 1, d), (bsz, heads, 1, d), (bsz, heads, 1, d),
            xq.shape, xk.shape, target.shape, attn.shape, lr.shape]
  out_shape = [f32(*s) for s in shapes]
  ins = [scale, beta, xq, xk, target, attn, lr, ws, bs, dz, dwn, dbn]
  specs = [ln_spec(scale.shape), ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[2:]]
  dw, db, ds, dbeta, dq, dk, dt, da, dlr = launch_per_head(
      functools.partial(_linear_bwd_kernel, width=width), ins, specs, out_shape, interpret)
  return dw, db, ds.sum(0), dbeta.sum(0), dq, dk, dt, da, dlr


linear_sequence_core.defvjp(_core_fwd, _core_bwd)


# -- TTT-Linear's W chain alone (`Tuning.linear_output='xla'`) ------------------------------------
# The kernels carry W_{i+1} = W_i + (lr XK_i)^T G_i, G_i = the LN-L2 gradient at XK_i W_i + b_i,
# and write every W_i, b_i and G_i; z_i = XQ_i W_i + b_i - A_i G_i is then batched XLA work
# (XLA also differentiates it, so the backward kernel receives the cotangents of W_i, b_i, G_i),
# and so is what the backward's outputs feed off the chain.


def _chain_fwd_kernel(w_ref, b_ref, s_ref, beta_ref, k_ref, t_ref, lr_ref,
                      wn_ref, bn_ref, g_ref, ws_ref, bs_ref, *, width=None):
  n = ws_ref.shape[0]
  b = k_ref.shape[0] // n
  scale, beta = s_ref[...], beta_ref[...]

  def body(i, carry):
    w, bias = carry
    rows = block_rows(i, b)
    k, lr = k_ref[rows, :], lr_ref[rows, :]
    g, _ = ttt_inner.ln_l2_grad_parts(dot(k, w) + bias, t_ref[rows, :], scale, beta,
                                      width=width)
    g_ref[rows, :] = g
    ws_ref[i] = w
    bs_ref[pl.ds(i, 1), :] = bias
    return w + t_dot(lr * k, g), bias + jnp.sum(lr * g, axis=0, keepdims=True)

  w, bias = jax.lax.fori_loop(0, n, body, (w_ref[...], b_ref[...]))
  wn_ref[...] = w
  bn_ref[...] = bias


def _chain_bwd_kernel(s_ref, beta_ref, k_ref, t_ref, lr_ref, p_ref, dg_ref, dws_ref, dbs_ref,
                      dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref, dp_ref, dt_ref,
                      dwnext_ref, dbnext_ref, *, width=None):
  """The reverse walk of the W chain alone: two matmuls per mini-batch. It writes, per mini-
  batch, the cotangents of p_i = XK_i W_i + b_i and of W_{i+1}, b_{i+1}; what reads them and
  is not on the chain (the cotangents of XK and the LRs) is batched XLA work (`_chain_bwd`)."""
  n = dwnext_ref.shape[0]
  b = k_ref.shape[0] // n
  scale, beta = s_ref[...], beta_ref[...]

  def step(i, dw, dbias):  # dw, dbias: cotangents of W_{i+1}, b_{i+1}
    rows = block_rows(i, b)
    k, lr = k_ref[rows, :], lr_ref[rows, :]
    g, parts = ttt_inner.ln_l2_grad_parts(p_ref[rows, :], t_ref[rows, :], scale, beta,
                                          width=width)
    dwnext_ref[i] = dw
    dbnext_ref[pl.ds(i, 1), :] = dbias
    # W_{i+1} = W_i + (lr k)^T G_i,  b_{i+1} = b_i + lr^T G_i; G_i is also an output
    dg = dot(lr * k, dw) + lr * dbias + dg_ref[rows, :]
    dp, dt, dsc, dbe = ln_l2_bwd(dg, g, scale, parts, width)  # G_i = LN-L2 gradient at p_i
    dp_ref[rows, :] = dp
    dt_ref[rows, :] = dt
    dw = dw + dws_ref[i] + t_dot(k, dp)
    dbias = dbias + row(dbs_ref, i) + jnp.sum(dp, axis=0, keepdims=True)
    return dw, dbias, dsc, dbe

  _walk_back(n, step, scale, dwn_ref, dbn_ref, dw_ref, db_ref, ds_ref, dbeta_ref)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def linear_chain(interpret, n, width, w, bias, scale, beta, xk, target, lr):
  """(W_n, b_n, W_i [B, H, n, d, d], b_i [B, H, n, d], G [B, H, T, d]) of TTT-Linear's W chain
  over a sequence of n mini-batches (`width` as `linear_sequence_core`'s)."""
  return _chain_launch(interpret, n, width, w, bias, scale, beta, xk, target, lr)


def _chain_launch(interpret, n, width, w, bias, scale, beta, xk, target, lr):
  bsz, heads, t, d = xk.shape
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, t, d),
               f32(bsz, heads, n, d, d), f32(bsz, heads, n, d)]
  ins = [w, bias, scale, beta, xk, target, lr]
  specs = ([seq_spec(w.shape), seq_spec(bias.shape), ln_spec(scale.shape),
            ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[4:]])
  wn, bn, g, ws, bs = launch_per_head(functools.partial(_chain_fwd_kernel, width=width), ins,
                                      specs, out_shape, interpret)
  return wn, bn, ws, bs, g


def _chain_fwd(interpret, n, width, w, bias, scale, beta, xk, target, lr):
  outs = tuple(checkpoint_name(x, KERNEL_OUTPUTS)  # as `_core_fwd`'s
               for x in _chain_launch(interpret, n, width, w, bias, scale, beta, xk, target, lr))
  return outs, (scale, beta, xk, target, lr, *outs[2:])


def _chain_bwd(interpret, n, width, res, cot):
  scale, beta, xk, target, lr, ws, bs, g = res
  dwn, dbn, dws, dbs, dg = cot
  bsz, heads, t, d = xk.shape
  per_mb = lambda x: x.reshape(bsz, heads, n, t // n, x.shape[-1])  # noqa: E731  [B, H, n, b, k]
  k_mb = per_mb(xk)
  # p_i = XK_i W_i + b_i, batched over [B, H, n] (the batch axes in one order on both sides)
  p = ttt_inner.mm(k_mb, ws) + bs[..., None, :]
  out_shape = [f32(bsz, heads, d, d), f32(bsz, heads, 1, d), f32(bsz, heads, 1, d),
               f32(bsz, heads, 1, d), f32(*xk.shape), f32(*target.shape), f32(*ws.shape),
               f32(*bs.shape)]
  ins = [scale, beta, xk, target, lr, p.reshape(xk.shape), dg, dws, dbs, dwn, dbn]
  specs = [ln_spec(scale.shape), ln_spec(beta.shape)] + [seq_spec(x.shape) for x in ins[2:]]
  dw, db, ds, dbeta, dp, dt, dwnext, dbnext = launch_per_head(
      functools.partial(_chain_bwd_kernel, width=width), ins, specs, out_shape, interpret)
  # off the chain, batched: with lk = lr XK_i, d(lk) = G_i dW_{i+1}^T; XK_i enters p_i and lk
  g_mb, lr_mb = per_mb(g), per_mb(lr)
  d_lk = ttt_inner.mm_t(g_mb, dwnext)
  dk = ttt_inner.mm_t(per_mb(dp), ws) + lr_mb * d_lk
  dlr = _lr_cotangent(k_mb, d_lk, g_mb, dbnext[..., None, :])
  return dw, db, ds.sum(0), dbeta.sum(0), dk.reshape(xk.shape), dt, dlr.reshape(lr.shape)


linear_chain.defvjp(_chain_fwd, _chain_bwd)


def linear_sequence(params, ln, xq, xk, xv, eta, complete=None, *, interpret: bool = False):
  """TTT-Linear over mini-batches xq, xk, xv [n, B, H, b, d], eta [n, B, H, b, b] with the two
  kernels. Same contract as `ttt_dual.dual_sequence('linear', ...)` without remat: returns
  (final params, outputs XQ + LN_h(z) [n, B, H, b, d]); `complete` [n] (streaming) as there.
  A head dim that is not a Triton block dimension runs zero-padded (`common.padded_dim`)."""
  attn = jnp.tril(eta) * (ttt_inner.mm_t(xq, xk) + 1.0)  # the bias's share of the correction: +1
  lr = update_rates(eta, complete)  # [n, B, H, b, 1]
  d = xq.shape[-1]
  size = padded_dim(d)
  width = None if size == d else d
  shapes = lambda dim: {"w": {-2: dim, -1: dim}, "b": {-1: dim}}  # noqa: E731
  w, bias = (fit(params[k], s) for k, s in shapes(size).items())
  xq_p, xk_p, target = (fit(x, {-1: size}) for x in (xq, xk, xv - xk))
  ln_in = tuple(fit(p, {-1: size}) for p in ln)
  where = current_tuning().linear_output
  if where == "xla":
    wn, bn, ws, bs, g = linear_chain(interpret, xq.shape[0], width, w, bias, *ln_in,
                                     *map(to_sequence, (xk_p, target, lr)))
    # XQ_i W_i + b_i with the batch axes leading and in one order on both sides ([B, H, n]):
    # XLA:GPU's compiler rejects the program it makes of the same product with them mixed
    qw = ttt_inner.mm(jnp.moveaxis(xq_p, 0, 2), ws) + bs[..., None, :]
    z = jnp.moveaxis(qw, 2, 0) - ttt_inner.mm(attn, from_sequence(g, xq.shape[0]))
    out = xq + ttt_inner.layer_norm(fit(z, {-1: d}), *ln)
  elif where == "kernel":
    wn, bn, z = linear_sequence_core(interpret, width, w, bias, *ln_in,
                                     *map(to_sequence, (xq_p, xk_p, target, attn, lr)))
    out = sequence_output(fit(z, {-1: d}), ln, xq)
  else:
    raise ValueError(f"ttt_pallas.Tuning.linear_output={where!r}: 'kernel' or 'xla'")
  final = {"w": wn, "b": bn}
  return {k: fit(final[k], s) for k, s in shapes(d).items()}, out
