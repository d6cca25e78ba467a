"""Pallas (Triton) kernels for TTT-MLP over a whole sequence (`model.ttt.impl=pallas`).

Two launches per layer, as TTT-Linear's (layers/ttt_pallas_linear.py): one program per
(sequence, head); the forward walks the n mini-batches in order, the backward walks them in reverse,
recomputing each mini-batch's forward from the W_i the forward stored. XLA's scan of the dual
form launches about 170 kernels per mini-batch and layer instead (`make gpu-census`).

The inner model is z = LN(gelu(x W1 + b1) W2 + b2) with W1 [d, 4d] and W2 [4d, d]: 32K floats
per head. Held in registers they spill (ptxas on the per-mini-batch kernel this replaces: 255
registers and 1,424 bytes of spill stores at 8 warps). So the kernels keep W in memory and
work on `Tuning.mlp_block` hidden units at a time (a block of W1's columns, b1 and W2's rows):
    z1 = XK W1 + b1, X2 = gelu(z1), P2 = X2 W2 + b2   (P2 summed over blocks)
    G2 = LN-L2 gradient at P2,  G1 = (G2 W2^T) * gelu'(z1)
    ZQ = XQ W1 + b1 - A G1 with A = tril(eta) * (XQ XK^T + 1),  XQ2 = gelu(ZQ)
    z = XQ2 W2 + b2 - (tril(eta) * (XQ2 X2^T + 1)) G2            (summed over blocks)
    W1 += (lr * XK)^T G1, b1 += lr^T G1, W2 += (lr * X2)^T G2, b2 += lr^T G2  (lr = -eta[b, :])
which is `ttt_inner.mlp_dual`. The forward writes W_{i+1} beside W_i (it keeps every W_i for
the backward), so no block is read after it is overwritten. The backward makes two passes over
the blocks per mini-batch (the second once G2's cotangent is complete) and moves the cotangents
of W1, W2 and b1 from one buffer to another and back, for the same reason. A barrier separates
a pass's writes from the next pass's reads (other threads of the program read them), and the
kernels run one pipeline stage, so no load is hoisted above the writes it must see. The
interpreter the tests run has one thread and cannot show a race; tests/layers/test_ttt_pallas.py
checks the rule on the kernels' jaxprs instead (the barriers each kernel has, that a loop with
barriers ends on one, and that no window is read and written between two barriers, windows told
apart by their index operands only). Blocks of
z1 and X2 are recomputed in each pass rather than kept (kept, they spilled more). Each pass
over the blocks is a loop in the kernel (`over_blocks`), so a kernel holds one copy of a
block's code whatever the number of blocks; the backward's first pass leaves its share of z1's
cotangent in a small buffer (`dz1_part_ref` [b, 4d]) for the second. Written out block by
block instead (`Tuning.mlp_unroll`), the two take about 4x as long to build for an H200, and ptxas
spills less in the forward kernel but more in the backward (docs/gpu_census.md). The backward
is written by hand (the derivation is in the comments) and checked against autodiff of the
primal form for every input, rolled and unrolled (tests/layers/test_ttt_pallas.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from ttt_jax.config import round_up
from ttt_jax.layers import ttt_dual, ttt_inner, ttt_pallas
from ttt_jax.layers.common import KERNEL_OUTPUTS, padded_dim, pltriton, triton_dim
from ttt_jax.layers.ttt_pallas import (
  block_rows,
  current_tuning,
  dot,
  dot_t,
  f32,
  launch_per_head,
  ln_l2_bwd,
  ln_spec,
  row,
  seq_spec,
  t_dot,
)

NAMES = tuple(n for pair in ttt_dual.MLP for n in pair)  # w1, b1, w2, b2

# Layout (per sequence and head): xq, xk, target [T, d]; eta [T, b] (rows of mini-batch i are
# tril(eta_i)); lr [T, 1]; stored weights w1s [n + 1, d, 4d], b1s [n + 1, 4d], w2s [n + 1, 4d, d],
# b2s [n + 1, d] (slot i: the weights mini-batch i starts from; slot n: the final ones).


def hidden_blocks(hidden: int) -> list:
  """The ref windows of the hidden layer the kernels work on, `Tuning.mlp_block` wide."""
  width = min(current_tuning().mlp_block, hidden)
  if not triton_dim(width) or hidden % width:
    raise ValueError(f"ttt_pallas.Tuning.mlp_block={width} must be a power of two >= 16 that "
                     f"divides TTT-MLP's hidden width {hidden}")
  return [pl.ds(s, width) for s in range(0, hidden, width)]


def over_blocks(hidden: int, body, carry=()):
  """carry = body(h, carry) for each hidden block's window h, in order: a loop in the kernel,
  or unrolled in its code under `Tuning.mlp_unroll` (each block's code then compiled apart:
  Triton's build time grows with it, docs/gpu_census.md)."""
  blocks = hidden_blocks(hidden)
  if current_tuning().mlp_unroll:
    for h in blocks:
      carry = body(h, carry)
    return carry
  width = blocks[0].size
  window = lambda j: pl.ds(pl.multiple_of(j * width, width), width)  # noqa: E731
  return jax.lax.fori_loop(0, len(blocks), lambda j, c: body(window(j), c), carry)


def _barrier(interpret: bool) -> None:
  if not interpret:  # the interpreter runs one thread
    pltriton.debug_barrier()


def _hidden(k, w1s_ref, b1s_ref, i, h):
  """(z1, X2) of hidden block h for mini-batch i's weights."""
  z1 = dot(k, w1s_ref[i, :, h]) + row(b1s_ref, i, h)
  return z1, ttt_inner.gelu(z1)


def _prediction(k, w1s_ref, b1s_ref, w2s_ref, b2s_ref, i):
  """P2 = X2 W2 + b2 for mini-batch i's weights (its blocks are recomputed where needed: kept,
  they would take registers the rest of the mini-batch needs)."""
  def add(h, p2):
    return p2 + dot(_hidden(k, w1s_ref, b1s_ref, i, h)[1], w2s_ref[i, h, :])

  b2 = row(b2s_ref, i)
  return over_blocks(w1s_ref.shape[-1], add, jnp.broadcast_to(b2, (k.shape[0], b2.shape[-1])))


def _mlp_fwd_kernel(interpret, width, s_ref, beta_ref, q_ref, k_ref, t_ref, e_ref, lr_ref,
                    w1_ref, b1_ref, w2_ref, b2_ref, z_ref, w1s_ref, b1s_ref, w2s_ref, b2s_ref):
  b = e_ref.shape[-1]
  n = q_ref.shape[0] // b
  hidden = w1_ref.shape[-1]
  scale, beta = s_ref[...], beta_ref[...]

  def initial(h, carry):  # W_0 into slot 0
    w1s_ref[0, :, h] = w1_ref[:, h]
    w2s_ref[0, h, :] = w2_ref[h, :]
    b1s_ref[pl.ds(0, 1), h] = b1_ref[:, h]
    return carry

  over_blocks(hidden, initial)
  b2s_ref[pl.ds(0, 1), :] = b2_ref[...]
  _barrier(interpret)

  def body(i, carry):
    rows = block_rows(i, b)
    q, k, e, lr = q_ref[rows, :], k_ref[rows, :], e_ref[rows, :], lr_ref[rows, :]
    p2 = _prediction(k, w1s_ref, b1s_ref, w2s_ref, b2s_ref, i)
    g2, _ = ttt_inner.ln_l2_grad_parts(p2, t_ref[rows, :], scale, beta, width=width)
    a = e * (dot_t(q, k) + 1.0)
    lk = lr * k
    b2 = row(b2s_ref, i)

    def block(h, acc):
      z, s = acc
      z1h, x2h = _hidden(k, w1s_ref, b1s_ref, i, h)
      w1h, w2h, b1h = w1s_ref[i, :, h], w2s_ref[i, h, :], row(b1s_ref, i, h)
      g1h = dot_t(g2, w2h) * ttt_inner.gelu_grad(z1h)
      xq2h = ttt_inner.gelu(dot(q, w1h) + b1h - dot(a, g1h))
      w1s_ref[i + 1, :, h] = w1h + t_dot(lk, g1h)
      w2s_ref[i + 1, h, :] = w2h + t_dot(lr * x2h, g2)
      b1s_ref[pl.ds(i + 1, 1), h] = b1h + jnp.sum(lr * g1h, axis=0, keepdims=True)
      return z + dot(xq2h, w2h), s + dot_t(xq2h, x2h)

    z, s = over_blocks(hidden, block, (jnp.broadcast_to(b2, q.shape), jnp.zeros_like(a)))
    z_ref[rows, :] = z - dot(e * (s + 1.0), g2)
    b2s_ref[pl.ds(i + 1, 1), :] = b2 + jnp.sum(lr * g2, axis=0, keepdims=True)
    _barrier(interpret)
    return carry

  jax.lax.fori_loop(0, n, body, 0)


def _mlp_bwd_kernel(interpret, width, s_ref, beta_ref, q_ref, k_ref, t_ref, e_ref, lr_ref,
                    w1s_ref, b1s_ref, w2s_ref, b2s_ref, dz_ref, dw1n_ref, db1n_ref, dw2n_ref,
                    db2n_ref, dq_ref, dk_ref, dt_ref, de_ref, dlr_ref, ds_ref, dbeta_ref,
                    dw1_ref, db1_ref, dw2_ref, db2_ref, db1_part_ref, dz1_part_ref):
  """Cotangents ("d" + name) of every input. dw1_ref/dw2_ref [2, ...]: buffer 0 holds the
  cotangent of W_{i+1} when mini-batch i starts and of W_i when it ends; a first pass over the
  hidden blocks writes its share to buffer 1, the second (once G2's cotangent is complete) adds
  the rest on the way back to buffer 0. b1's cotangent moves the same way between db1_ref and
  db1_part_ref [1, 4d] (no pass reads a window it writes: another thread could store before
  this one loads). dz1_part_ref [b, 4d]: the first pass's share of z1's cotangent, for the
  second. db2 and the LayerNorm's cotangents are carried in registers."""
  b = e_ref.shape[-1]
  n = q_ref.shape[0] // b
  hidden = w1s_ref.shape[-1]
  scale, beta = s_ref[...], beta_ref[...]

  def initial(h, carry):
    dw1_ref[0, :, h] = dw1n_ref[:, h]
    dw2_ref[0, h, :] = dw2n_ref[h, :]
    db1_ref[:, h] = db1n_ref[:, h]
    return carry

  over_blocks(hidden, initial)
  _barrier(interpret)

  def body(j, carry):
    db2, dscale, dbeta = carry  # cotangent of b2_{i+1}; sums
    i = n - 1 - j
    rows = block_rows(i, b)
    q, k, e, lr, dz = (r[rows, :] for r in (q_ref, k_ref, e_ref, lr_ref, dz_ref))
    p2 = _prediction(k, w1s_ref, b1s_ref, w2s_ref, b2s_ref, i)
    g2, parts = ttt_inner.ln_l2_grad_parts(p2, t_ref[rows, :], scale, beta, width=width)
    qk1 = dot_t(q, k) + 1.0
    a, lk = e * qk1, lr * k
    dm = -dot_t(dz, g2)  # z -= M G2 with M = e * (S + 1), S = XQ2 X2^T
    d_s = dm * e

    def first(h, acc):  # every block's share but G2's
      dq, dlk, da, s, dg2, dlr = acc
      z1h, x2h = _hidden(k, w1s_ref, b1s_ref, i, h)
      w1h, w2h, b1h = w1s_ref[i, :, h], w2s_ref[i, h, :], row(b1s_ref, i, h)
      dw1h, dw2h, db1h = dw1_ref[0, :, h], dw2_ref[0, h, :], db1_ref[:, h]
      gp, gpp = jax.jvp(ttt_inner.gelu_grad, (z1h,), (jnp.ones_like(z1h),))  # gelu', gelu''
      u = dot_t(g2, w2h)
      g1h = u * gp
      zq = dot(q, w1h) + b1h - dot(a, g1h)
      xq2h = ttt_inner.gelu(zq)
      s = s + dot_t(xq2h, x2h)
      # the updates: W2' = W2 + (lr X2)^T G2, W1' = W1 + (lr XK)^T G1, b1' = b1 + lr^T G1
      d_lx = dot_t(g2, dw2h)
      dg2 = dg2 + dot(lr * x2h, dw2h)
      dx2 = lr * d_lx + t_dot(d_s, xq2h)  # ... and S = XQ2 X2^T
      dg1 = lr * db1h + dot(lk, dw1h)
      dlk = dlk + dot_t(g1h, dw1h)
      dlr = dlr + jnp.sum(x2h * d_lx + g1h * db1h, axis=-1, keepdims=True)
      # the output: z = XQ2 W2 + ... - M G2, XQ2 = gelu(ZQ), ZQ = XQ W1 + b1 - A G1
      dzq = (dot_t(dz, w2h) + dot(d_s, x2h)) * ttt_inner.gelu_grad(zq)
      dq = dq + dot_t(dzq, w1h)
      da = da - dot_t(dzq, g1h)
      dg1 = dg1 - t_dot(a, dzq)
      du = dg1 * gp  # G1 = U * gelu'(z1), U = G2 W2^T
      dg2 = dg2 + dot(du, w2h)
      dz1_part_ref[:, h] = dg1 * u * gpp + dx2 * gp  # X2 = gelu(z1)
      dw1_ref[1, :, h] = dw1h + t_dot(q, dzq)
      dw2_ref[1, h, :] = dw2h + t_dot(xq2h, dz) + t_dot(du, g2)
      db1_part_ref[:, h] = db1h + jnp.sum(dzq, axis=0, keepdims=True)
      return dq, dlk, da, s, dg2, dlr

    dq, dlk, da, s, dg2, dlr = over_blocks(hidden, first, (
        jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(a), jnp.zeros_like(a),
        lr * db2,  # b2' = b2 + lr^T G2
        jnp.sum(g2 * db2, axis=-1, keepdims=True)))
    _barrier(interpret)
    dg2 = dg2 - t_dot(e * (s + 1.0), dz)
    dp2, dt, dsc, dbe = ln_l2_bwd(dg2, g2, scale, parts, width)  # G2: LN-L2 gradient at P2
    dt_ref[rows, :] = dt

    def second(h, dk):  # G2's share, now complete
      z1h, x2h = _hidden(k, w1s_ref, b1s_ref, i, h)
      w1h, w2h = w1s_ref[i, :, h], w2s_ref[i, h, :]
      dz1 = dz1_part_ref[:, h] + dot_t(dp2, w2h) * ttt_inner.gelu_grad(z1h)  # P2 = X2 W2 + b2
      dw1_ref[0, :, h] = dw1_ref[1, :, h] + t_dot(k, dz1)
      dw2_ref[0, h, :] = dw2_ref[1, h, :] + t_dot(x2h, dp2)
      db1_ref[:, h] = db1_part_ref[:, h] + jnp.sum(dz1, axis=0, keepdims=True)
      return dk + dot_t(dz1, w1h)  # z1 = XK W1 + b1

    dk = over_blocks(hidden, second, lr * dlk)
    dqk = da * e  # A = e * (XQ XK^T + 1)
    dq_ref[rows, :] = dq + dot(dqk, k)
    dk_ref[rows, :] = dk + t_dot(dqk, q)
    de_ref[rows, :] = dm * (s + 1.0) + da * qk1
    dlr_ref[rows, :] = dlr + jnp.sum(k * dlk, axis=-1, keepdims=True)
    _barrier(interpret)
    db2 = db2 + jnp.sum(dz + dp2, axis=0, keepdims=True)
    return db2, dscale + dsc, dbeta + dbe

  zeros = jnp.zeros_like(scale)
  db2, dscale, dbeta = jax.lax.fori_loop(0, n, body, (db2n_ref[...], zeros, zeros))
  db2_ref[...] = db2
  ds_ref[...] = dscale
  dbeta_ref[...] = dbeta


def _forward(interpret, width, ln, xq, xk, target, eta_c, lr, params):
  bsz, heads, t, d = xq.shape
  n, hidden = t // eta_c.shape[-1], params["w1"].shape[-1]
  ins = [*ln, xq, xk, target, eta_c, lr, *(params[k] for k in NAMES)]
  specs = [ln_spec(x.shape) for x in ln] + [seq_spec(x.shape) for x in ins[2:]]
  out_shape = [f32(bsz, heads, t, d), f32(bsz, heads, n + 1, d, hidden),
               f32(bsz, heads, n + 1, hidden), f32(bsz, heads, n + 1, hidden, d),
               f32(bsz, heads, n + 1, d)]
  kernel = functools.partial(_mlp_fwd_kernel, interpret, width)
  # z, w1s, b1s, w2s, b2s
  return launch_per_head(kernel, ins, specs, out_shape, interpret, mlp=True)


def _final(stored):
  """The weights after the last mini-batch (slot n), shaped as the parameters."""
  w1s, b1s, w2s, b2s = stored
  return {"w1": w1s[:, :, -1], "b1": b1s[:, :, -1:], "w2": w2s[:, :, -1], "b2": b2s[:, :, -1:]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def sequence_core(interpret, width, ln, xq, xk, target, eta_c, lr, params):
  """(final params, z [B, H, T, d] before the output LayerNorm) of TTT-MLP over a sequence
  (`width`: the head dim's features, the columns past them zero padding; None: no padding)."""
  z, *stored = _forward(interpret, width, ln, xq, xk, target, eta_c, lr, params)
  return _final(stored), z


def _core_fwd(interpret, width, ln, xq, xk, target, eta_c, lr, params):
  # named, so `model.remat=kernels` keeps them and the backward does not run the kernel again
  z, *stored = (checkpoint_name(x, KERNEL_OUTPUTS)
                for x in _forward(interpret, width, ln, xq, xk, target, eta_c, lr, params))
  return (_final(stored), z), (ln, xq, xk, target, eta_c, lr, stored)


def _core_bwd(interpret, width, res, cot):
  ln, xq, xk, target, eta_c, lr, stored = res
  dfinal, dz = cot
  bsz, heads, t, d = xq.shape
  hidden = stored[0].shape[-1]
  ins = [*ln, xq, xk, target, eta_c, lr, *stored, dz, *(dfinal[k] for k in NAMES)]
  specs = [ln_spec(x.shape) for x in ln] + [seq_spec(x.shape) for x in ins[2:]]
  out_shape = ([f32(*x.shape) for x in (xq, xk, target, eta_c, lr)]
               + [f32(bsz, heads, 1, d)] * 2
               + [f32(bsz, heads, 2, d, hidden), f32(bsz, heads, 1, hidden),
                  f32(bsz, heads, 2, hidden, d), f32(bsz, heads, 1, d)]
               # working memory: db1_part_ref, dz1_part_ref
               + [f32(bsz, heads, 1, hidden), f32(bsz, heads, eta_c.shape[-1], hidden)])
  kernel = functools.partial(_mlp_bwd_kernel, interpret, width)
  dq, dk, dt, de, dlr, ds, dbeta, dw1, db1, dw2, db2, _, _ = launch_per_head(
      kernel, ins, specs, out_shape, interpret, mlp=True)
  dparams = {"w1": dw1[:, :, 0], "b1": db1, "w2": dw2[:, :, 0], "b2": db2}  # buffer 0: W_0's
  return (ds.sum(0), dbeta.sum(0)), dq, dk, dt, de, dlr, dparams


sequence_core.defvjp(_core_fwd, _core_bwd)


def mlp_sequence(params, ln, xq, xk, xv, eta, complete=None, *, interpret: bool = False):
  """TTT-MLP over mini-batches xq, xk, xv [n, B, H, b, d], eta [n, B, H, b, b] with the two
  kernels. Same contract as `ttt_dual.dual_sequence('mlp', ...)` without remat: returns
  (final params, outputs XQ + LN_h(z) [n, B, H, b, d]); `complete` [n] (streaming) as there.
  A head dim that is not a Triton block dimension runs zero-padded (`common.padded_dim`), and
  a hidden width that is not whole `Tuning.mlp_block`s runs zero-padded to them: a padded
  hidden unit's pre-activation is 0, gelu(0) = 0, and its weights stay 0."""
  d, hidden = xq.shape[-1], params["w1"].shape[-1]
  size, block = padded_dim(d), min(current_tuning().mlp_block, hidden)
  wide = padded_dim(hidden) if hidden <= block else round_up(hidden, block)
  fit = ttt_pallas.fit
  views = map(ttt_pallas.to_sequence, (fit(xq, {-1: size}), fit(xk, {-1: size}),
                                       fit(xv - xk, {-1: size}), jnp.tril(eta),
                                       ttt_pallas.update_rates(eta, complete)))
  shapes = lambda dim, units: {"w1": {-2: dim, -1: units}, "b1": {-1: units},  # noqa: E731
                               "w2": {-2: units, -1: dim}, "b2": {-1: dim}}
  padded = {k: fit(params[k], s) for k, s in shapes(size, wide).items()}
  final, z = sequence_core(interpret, None if size == d else d,
                           tuple(fit(p, {-1: size}) for p in ln), *views, padded)
  final = {k: fit(final[k], s) for k, s in shapes(d, hidden).items()}
  return final, ttt_pallas.sequence_output(fit(z, {-1: d}), ln, xq, kernel_layout=True)
