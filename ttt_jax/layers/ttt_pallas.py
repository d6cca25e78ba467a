"""A fused Pallas kernel for one TTT mini-batch (`model.ttt.impl=pallas`).

One kernel launch per mini-batch: each program of the (batch, head) grid loads its head's inner
weights W_i, the mini-batch's views XQ/XK/XV and learning rates into on-chip memory, runs the
dual form there (the inner gradient, the causal corrections, the output and W_{i+1}) and writes
back only the output and W_{i+1}. The math is `ttt_inner`'s dual step itself, traced inside the
kernel on one head's blocks, so the two cannot drift apart.

The backward pass (`jax.custom_vjp`) recomputes the mini-batch with the XLA dual form and takes
its VJP: gradients are exact, and the kernel only replaces the forward. Remat through time
(`ttt_inner.scan_minibatches`) re-runs the kernel inside each checkpointed group.

`interpret=True` runs the kernel with the Pallas interpreter (any backend; tests on CPU).
Speed can only be measured on a GPU or TPU (docs/ttt.md).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from ttt_jax.layers import ttt_inner

PARAM_NAMES = {"linear": ("w", "b"), "mlp": ("w1", "b1", "w2", "b2")}


def _head_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
  """Block of one (batch, head) of an array [B, H, ...]."""
  rest = tuple(shape[2:])
  return pl.BlockSpec((None, None, *rest), lambda i, j: (i, j) + (0,) * len(rest))


def _ln_spec(shape: tuple[int, ...]) -> pl.BlockSpec:
  """Block of one head of a per-head LayerNorm parameter [H, 1, d]."""
  return pl.BlockSpec((None, *shape[1:]), lambda i, j: (j, 0, 0))


def _fused_forward(kind: str, interpret: bool, params, ln, xq, xk, xv, eta):
  names = PARAM_NAMES[kind]
  dual = ttt_inner.STEPS[(kind, "dual")]
  n_p = len(names)

  def kernel(*refs):
    p_refs, (s_ref, bias_ref, q_ref, k_ref, v_ref, eta_ref) = refs[:n_p], refs[n_p:n_p + 6]
    out_p_refs, z_ref = refs[n_p + 6:-1], refs[-1]
    new, z = dual({n: r[...] for n, r in zip(names, p_refs, strict=True)},
                  (s_ref[...], bias_ref[...]), q_ref[...], k_ref[...], v_ref[...], eta_ref[...])
    for n, r in zip(names, out_p_refs, strict=True):
      r[...] = new[n].astype(r.dtype)
    z_ref[...] = z.astype(z_ref.dtype)

  p_list = [params[n] for n in names]
  ins = [*p_list, ln[0], ln[1], xq, xk, xv, eta]
  in_specs = ([_head_spec(p.shape) for p in p_list] + [_ln_spec(ln[0].shape), _ln_spec(ln[1].shape)]
              + [_head_spec(x.shape) for x in (xq, xk, xv, eta)])
  out_shape = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in p_list]
  out_shape.append(jax.ShapeDtypeStruct(xq.shape, xq.dtype))
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=xq.shape[:2], in_specs=in_specs,
      out_specs=[_head_spec(s.shape) for s in out_shape], interpret=interpret)(*ins)
  return dict(zip(names, outs[:-1], strict=True)), outs[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_step(kind: str, interpret: bool, params, ln, xq, xk, xv, eta):
  """The dual step of `ttt_inner` for one mini-batch, forward fused in one Pallas kernel."""
  return _fused_forward(kind, interpret, params, ln, xq, xk, xv, eta)


def _fwd(kind, interpret, params, ln, xq, xk, xv, eta):
  out = _fused_forward(kind, interpret, params, ln, xq, xk, xv, eta)
  return out, (params, ln, xq, xk, xv, eta)


def _bwd(kind, interpret, residuals, cotangent):
  del interpret
  _, vjp = jax.vjp(ttt_inner.STEPS[(kind, "dual")], *residuals)
  return vjp(cotangent)


fused_step.defvjp(_fwd, _bwd)


def pallas_step(kind: str, interpret: bool):
  """A `ttt_inner.STEPS`-style step function `(params, ln, xq, xk, xv, eta)` for the kernel."""
  return functools.partial(fused_step, kind, interpret)
