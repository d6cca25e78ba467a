"""The dual form over a whole sequence, with all work that does not depend on W out of the scan.

`ttt_inner.linear_dual` / `mlp_dual` state one mini-batch plainly; scanned as they are, every
mini-batch step recomputes per-mini-batch quantities that do not depend on the inner weights and
ends with the output LayerNorm, and on CPU a step of a few dozen small ops is dominated by the
per-op cost, not by FLOPs. Here (same math, same outputs to fp32 rounding; tests compare the two):

- Biases ride in the matrices: z·W + b = [z, 1]·[W; b]. The views get a column of ones once
  (X̃ = [X, 1]) and the scan carries W̃ = [W; b], so one matmul gives the prediction with bias,
  one outer product updates W and b together (W̃_{i+1} = W̃_i − (η[b,:] ⊙ X̃K)ᵀ·G), and the dual
  correction (η ⊙ tril(XQ·XKᵀ))·G + tril(η)·G is (η ⊙ X̃Q·X̃Kᵀ)·G (η is already causal).
- XQ·W and XK·W are one matmul over the stacked [X̃Q; X̃K].
- Before the scan, batched over all mini-batches: the first layer's causal attention matrix
  A = tril(η) ⊙ X̃Q·X̃Kᵀ, the LR-weighted keys η[b,:] ⊙ X̃K, the label XV − XK.
- After the scan: the output XQ + LN_h(z) of every token at once.

The step of one mini-batch is then a handful of matmuls and the LayerNorm gradient, and the
backward pass of the scan differentiates only those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt_jax.layers.ttt_inner import (
    InnerParams,
    gelu,
    gelu_grad,
    inner_model,
    layer_norm,
    ln_l2_grad,
    mm,
    mm_t,
    scan_minibatches,
    t_mm,
)


def with_ones(x: jax.Array) -> jax.Array:
  """[..., m] -> [..., m + 1] with a last column of ones (the bias input)."""
  return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


Pairs = tuple[tuple[str, str], ...]  # (weight key, bias key) per layer of the inner model
LINEAR: Pairs = (("w", "b"),)
MLP: Pairs = (("w1", "b1"), ("w2", "b2"))


def augment(pairs: Pairs, params: InnerParams) -> dict[str, jax.Array]:
  """{'w', 'b'} / {'w1', 'b1', 'w2', 'b2'} -> the bias-augmented matrices [W; b] (keyed by W)."""
  return {w: jnp.concatenate([params[w], params[b]], axis=-2) for w, b in pairs}


def split_augmented(pairs: Pairs, aug: dict[str, jax.Array]) -> InnerParams:
  """Inverse of `augment`."""
  out = {}
  for w, b in pairs:
    out[w], out[b] = aug[w][..., :-1, :], aug[w][..., -1:, :]
  return out


def _linear_step(aug, ln, qk, attn, k_last, target):
  b = attn.shape[-1]
  w = aug["w"]
  pred = mm(qk, w)  # [X̃Q; X̃K]·W̃
  grad = ln_l2_grad(pred[..., b:, :], target, *ln)
  z = pred[..., :b, :] - mm(attn, grad)
  return {"w": w + t_mm(k_last, grad)}, z  # k_last = -η[b,:] ⊙ X̃K


def _mlp_step(aug, ln, qk, attn, k_last, target, eta_c, last):
  b = attn.shape[-1]
  w1, w2 = aug["w1"], aug["w2"]
  pred1 = mm(qk, w1)
  zk1 = pred1[..., b:, :]
  x2 = with_ones(gelu(zk1))
  g2 = ln_l2_grad(mm(x2, w2), target, *ln)
  g1 = mm_t(g2, w2)[..., :-1] * gelu_grad(zk1)  # slice the product, not W̃2
  xq2 = with_ones(gelu(pred1[..., :b, :] - mm(attn, g1)))
  z = mm(xq2, w2) - mm(eta_c * mm_t(xq2, x2), g2)
  return {"w1": w1 + t_mm(k_last, g1), "w2": w2 + t_mm(last * x2, g2)}, z  # last = -η[b,:]


def _sequence(step, pairs: Pairs, needs_eta: bool, params: InnerParams, ln, xq, xk, xv, eta,
              remat_group: int, complete: jax.Array | None = None):
  """The dual form over mini-batches xq, xk, xv [n, B, H, b, d], eta [n, B, H, b, b].

  Same contract as `ttt_inner.scan_minibatches(<the model's dual step>, ...)`: returns (final
  params, outputs XQ + LN_h(z) [n, B, H, b, d]); `remat_group` and `complete` as there.
  """
  eta_c = jnp.tril(eta)
  q, k = with_ones(xq), with_ones(xk)
  attn = eta_c * mm_t(q, k)
  neg_last = -eta[..., -1, :, None]  # -eta[b, s] as a column: the update is W̃ + (...)ᵀ·G
  xs = (jnp.concatenate([q, k], axis=-2), attn, neg_last * k, xv - xk)
  if needs_eta:
    xs = (*xs, eta_c, neg_last)
  final, z = scan_minibatches(step, augment(pairs, params), ln, xs, remat_group, complete)
  return split_augmented(pairs, final), xq + layer_norm(z, *ln)


linear_sequence = functools.partial(_sequence, _linear_step, LINEAR, False)
mlp_sequence = functools.partial(_sequence, _mlp_step, MLP, True)


def dual_sequence(kind: str, params: InnerParams, ln, xq, xk, xv, eta, remat_group: int,
                  complete: jax.Array | None = None):
  """The whole-sequence dual form of the registered inner model `kind` (see `_sequence`)."""
  fn = inner_model(kind).dual_sequence
  return fn(params, ln, xq, xk, xv, eta, remat_group, complete)
