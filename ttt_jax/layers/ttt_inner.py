"""The TTT inner loop: mini-batch gradient descent on a per-head inner model, dual and primal.

Shapes: B batch, H heads, b mini-batch size, d head dim, n mini-batches. Every function here is
pure JAX on fp32 arrays laid out [B, H, b, d] (one mini-batch) or [n, B, H, b, d] (a sequence).

Inner model f(z) = z + LN_h(g(z; W)) with
  TTT-Linear: g(z) = z W + b                       W (d, d), b (1, d)
  TTT-MLP:    g(z) = gelu_tanh(z W1 + b1) W2 + b2  W1 (d, 4d), W2 (4d, d)
and inner loss l_s(W) = 1/2 |LN_h(g(XK_s; W)) - (XV_s - XK_s)|^2. Inside mini-batch i every
gradient is taken at the mini-batch's initial weights W_i and token t sees
W_{i,t} = W_i - sum_{s<=t} eta[t, s] grad l_s(W_i); the output is XQ_t + LN_h(g(XQ_t; W_{i,t})).

`primal` materialises every W_{i,t} (the readable reference); `dual` gets the same outputs from
matmuls only (never forming a per-token W) and forms W_{i+1} = W_{i,b} once per mini-batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ttt_jax.layers.common import KERNEL_OUTPUTS
from ttt_jax.layers.mixers import INNER_MODELS

LN_EPS = 1e-6
_GELU_C = math.sqrt(2.0 / math.pi)

InnerParams = dict[str, jax.Array]  # each [B, H, ...]


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = LN_EPS):
  mu = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def _mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x, axis=-1, keepdims=True)


def _features(d: int, width: int | None):
  """(mean over the last axis, its column mask or None) for arrays of `d` columns of which the
  first `width` are features and the rest zero padding (None: no padding; the Pallas kernels
  pad a head dim to a power of two, layers/ttt_pallas.py)."""
  if width is None or width == d:
    return _mean, None
  mask = (jax.lax.broadcasted_iota(jnp.int32, (1, d), 1) < width).astype(jnp.float32)
  return (lambda x: jnp.sum(x, axis=-1, keepdims=True) / width), mask


def ln_l2_grad_parts(z, target, scale, bias, eps=LN_EPS, width: int | None = None):
  """(G, (x̂, 1/std, err, c)): the value of `ln_l2_grad` and what its backward needs (plain jnp;
  also the body of the Pallas kernels). `width`: the LayerNorm's features are the first `width`
  columns, the rest zero padding (z's, target's, scale's and bias's), and G is 0 there."""
  mean, mask = _features(z.shape[-1], width)
  mu = mean(z)
  zc = z - mu if mask is None else (z - mu) * mask
  inv_std = jax.lax.rsqrt(mean(jnp.square(zc)) + eps)
  xhat = zc * inv_std
  err = scale * xhat + bias - target
  g_xhat = err * scale
  c = mean(g_xhat * xhat)
  g = inv_std * (g_xhat - mean(g_xhat) - xhat * c)
  return (g if mask is None else g * mask), (xhat, inv_std, err, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def ln_l2_grad(z: jax.Array, target: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float = LN_EPS) -> jax.Array:
  """d/dz of 1/2 |LN(z) - target|^2 (LN over the last axis with scale/bias), written out.

  With x̂ = LN's normalised z, r = 1/std and J v = r (v - mean(v) - x̂ mean(v x̂)) (the
  Jacobian of x̂, symmetric), the value is G = J g with g = scale (scale x̂ + bias - target).
  Its backward pass is written out too (`_ln_l2_grad_bwd`): the TTT inner loop differentiates
  it once per mini-batch, and XLA:CPU runs the derivative of the plain formula as more,
  smaller ops.
  """
  return ln_l2_grad_parts(z, target, scale, bias, eps)[0]


def _ln_l2_grad_fwd(z, target, scale, bias, eps):
  g, (xhat, inv_std, err, c) = ln_l2_grad_parts(z, target, scale, bias, eps)
  return g, (xhat, inv_std, err, c, g, scale, jnp.shape(target), jnp.shape(bias))


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums a broadcast cotangent back to an operand's `shape`."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


def _ln_l2_grad_bwd(eps, res, u):
  """Cotangents of (z, target, scale, bias) for the cotangent u of G = J g (see ln_l2_grad):
  w = J u; g's path gives target -w scale, bias w scale, scale w (err + scale x̂) and z
  J(scale² w); J's own dependence on z gives -(r/d)(x̂ <G, u> + G <x̂, u>) - r c w with
  c = mean(g x̂)."""
  del eps
  xhat, inv_std, err, c, g, scale, t_shape, b_shape = res
  dz, dt, ds, db = ln_l2_grad_cotangents(u, g, scale, (xhat, inv_std, err, c))
  return dz, _sum_to(dt, t_shape), _sum_to(ds, jnp.shape(scale)), _sum_to(db, b_shape)


def ln_l2_grad_cotangents(u, g, scale, parts, width: int | None = None):
  """Per-row cotangents (z, target, scale, bias) of G = `ln_l2_grad(z, ...)` for the cotangent
  u, from G and `ln_l2_grad_parts`'s parts; scale's and bias's are not yet summed over rows.
  `width` as there: the cotangents are 0 in the padding columns."""
  mean, mask = _features(u.shape[-1], width)
  xhat, inv_std, err, c = parts
  if mask is not None:
    u = u * mask
  xu = mean(xhat * u)
  w = inv_std * (u - mean(u) - xhat * xu)
  if mask is not None:
    w = w * mask
  sw = scale * w
  v = scale * sw
  jv = inv_std * (v - mean(v) - xhat * mean(v * xhat))
  dz = jv - inv_std * (xhat * mean(g * u) + g * xu + c * w)
  return (dz if mask is None else dz * mask), -sw, w * (err + scale * xhat), sw


ln_l2_grad.defvjp(_ln_l2_grad_fwd, _ln_l2_grad_bwd)


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def gelu_grad(x: jax.Array) -> jax.Array:
  """Derivative of the tanh-approximated GELU."""
  th = jnp.tanh(_GELU_C * (x + 0.044715 * x ** 3))
  return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)


def mm(a, b):  # a @ b over the last two axes
  return jnp.einsum("...ij,...jk->...ik", a, b)


def mm_t(a, b):  # a @ b^T
  return jnp.einsum("...ik,...jk->...ij", a, b)


def t_mm(a, b):  # a^T @ b
  return jnp.einsum("...ki,...kj->...ij", a, b)


def _causal(m: jax.Array) -> jax.Array:
  return jnp.tril(m)


# -- one mini-batch --------------------------------------------------------------------------------
# Signature: step(params, ln, xq, xk, xv, eta) -> (params after the mini-batch, z [B,H,b,d]).
# ln = (scale, bias) each [H, 1, d]; eta [B, H, b, b] (entries above the diagonal are ignored).


def linear_dual(params: InnerParams, ln, xq, xk, xv, eta):
  w, b = params["w"], params["b"]
  grad = ln_l2_grad(mm(xk, w) + b, xv - xk, *ln)  # dl_s/d(z_s), [B,H,b,d]
  eta_c = _causal(eta)
  z = mm(xq, w) + b - mm(eta_c * _causal(mm_t(xq, xk)), grad) - mm(eta_c, grad)
  last = eta[..., -1, :, None]  # eta[b, s] as a column
  new = {"w": w - t_mm(last * xk, grad), "b": b - jnp.sum(last * grad, axis=-2, keepdims=True)}
  return new, xq + layer_norm(z, *ln)


def linear_primal(params: InnerParams, ln, xq, xk, xv, eta):
  w, b = params["w"], params["b"]
  grad = ln_l2_grad(mm(xk, w) + b, xv - xk, *ln)
  grad_w = jnp.einsum("...si,...sj->...sij", xk, grad)  # per-token dl_s/dW, [B,H,b,d,d]
  eta_c = _causal(eta)
  w_t = w[..., None, :, :] - jnp.einsum("...ts,...sij->...tij", eta_c, grad_w)
  b_t = b - jnp.einsum("...ts,...sj->...tj", eta_c, grad)  # [B,H,b,d]
  z = jnp.einsum("...ti,...tij->...tj", xq, w_t) + b_t
  new = {"w": w_t[..., -1, :, :], "b": b_t[..., -1:, :]}
  return new, xq + layer_norm(z, *ln)


def _mlp_grads(params, ln, xk, xv):
  z1 = mm(xk, params["w1"]) + params["b1"]
  x2 = gelu(z1)
  g2 = ln_l2_grad(mm(x2, params["w2"]) + params["b2"], xv - xk, *ln)
  g1 = mm_t(g2, params["w2"]) * gelu_grad(z1)
  return x2, g1, g2


def mlp_dual(params: InnerParams, ln, xq, xk, xv, eta):
  x2, g1, g2 = _mlp_grads(params, ln, xk, xv)
  eta_c = _causal(eta)
  z1 = (mm(xq, params["w1"]) + params["b1"] - mm(eta_c * _causal(mm_t(xq, xk)), g1)
        - mm(eta_c, g1))
  xq2 = gelu(z1)
  z2 = (mm(xq2, params["w2"]) + params["b2"] - mm(eta_c * _causal(mm_t(xq2, x2)), g2)
        - mm(eta_c, g2))
  last = eta[..., -1, :, None]
  new = {"w1": params["w1"] - t_mm(last * xk, g1),
         "b1": params["b1"] - jnp.sum(last * g1, axis=-2, keepdims=True),
         "w2": params["w2"] - t_mm(last * x2, g2),
         "b2": params["b2"] - jnp.sum(last * g2, axis=-2, keepdims=True)}
  return new, xq + layer_norm(z2, *ln)


def mlp_primal(params: InnerParams, ln, xq, xk, xv, eta):
  x2, g1, g2 = _mlp_grads(params, ln, xk, xv)
  eta_c = _causal(eta)

  def per_token(w, gw):  # w [B,H,i,j], gw [B,H,b,i,j] -> W_t [B,H,b,i,j]
    return w[..., None, :, :] - jnp.einsum("...ts,...sij->...tij", eta_c, gw)

  w1_t = per_token(params["w1"], jnp.einsum("...si,...sj->...sij", xk, g1))
  w2_t = per_token(params["w2"], jnp.einsum("...si,...sj->...sij", x2, g2))
  b1_t = params["b1"] - jnp.einsum("...ts,...sj->...tj", eta_c, g1)
  b2_t = params["b2"] - jnp.einsum("...ts,...sj->...tj", eta_c, g2)
  h = gelu(jnp.einsum("...ti,...tij->...tj", xq, w1_t) + b1_t)
  z = jnp.einsum("...ti,...tij->...tj", h, w2_t) + b2_t
  new = {"w1": w1_t[..., -1, :, :], "b1": b1_t[..., -1:, :],
         "w2": w2_t[..., -1, :, :], "b2": b2_t[..., -1:, :]}
  return new, xq + layer_norm(z, *ln)


def linear_predict(params: InnerParams, z: jax.Array) -> jax.Array:
  """g(z) = z W + b (TTT-Linear)."""
  return mm(z, params["w"]) + params["b"]


def mlp_predict(params: InnerParams, z: jax.Array) -> jax.Array:
  """g(z) = gelu_tanh(z W1 + b1) W2 + b2 (TTT-MLP)."""
  return mm(gelu(mm(z, params["w1"]) + params["b1"]), params["w2"]) + params["b2"]


def autodiff_primal(predict: Callable) -> Callable:
  """The primal mini-batch step of any inner model g = `predict`, by automatic differentiation:
  W_{i,t} = W_i - grad_W sum_s eta[t, s] l_s(W_i), z_t = XQ_t + LN_h(g(XQ_t; W_{i,t})). The
  reference form of an inner model that brings no hand-written step (a slow reference: one
  gradient per token position)."""

  def step(params: InnerParams, ln, xq, xk, xv, eta):
    def weighted_loss(p, weights):  # weights [B, H, b]; each (B, H) owns its own W
      err = layer_norm(predict(p, xk), *ln) - (xv - xk)
      return jnp.sum(weights * 0.5 * jnp.sum(jnp.square(err), axis=-1))

    grads = jax.vmap(lambda w: jax.grad(weighted_loss)(params, w), in_axes=2)(_causal(eta))
    w_t = jax.tree.map(lambda p, g: p[None] - g, params, grads)  # [b, B, H, ...] per token
    z = jax.vmap(predict, in_axes=(0, 2), out_axes=2)(w_t, xq[..., None, :])[..., 0, :]
    return jax.tree.map(lambda a: a[-1], w_t), xq + layer_norm(z, *ln)

  return step


Step = Callable  # step(params, ln, xq, xk, xv, eta) -> (params after the mini-batch, outputs)


@dataclasses.dataclass(frozen=True)
class InnerModel:
  """A TTT inner model g(z; W) and the forms the TTT layer can run it in.

  The layer keeps one (weight, bias) pair per layer of g as outer-loop parameters W0
  ([H, d_in, d_out] and [H, 1, d_out]) under the names of `layers` (checkpoints hold them so)
  and hands the inner loop their values under the same keys. Only `predict` is required: the
  primal step defaults to its automatic derivative (`autodiff_primal`), the dual step to the
  primal one.
  """

  name: str  # 'linear': selected by model.mixer = `mixer` (default 'ttt_' + name)
  layers: tuple[tuple[str, str], ...]  # (weight key, bias key) per layer of g, in order
  widths: Callable[[int], tuple[int, ...]]  # head dim d -> layer widths (d, ..., d)
  predict: Callable  # g(params, z [B, H, n, d]) -> [B, H, n, d]
  primal: Step | None = None  # mini-batch step materialising every W_{i,t}
  dual: Step | None = None  # mini-batch step from matmuls only
  dual_sequence: Callable | None = None  # whole-sequence dual form (layers/ttt_dual.py)
  pallas_sequence: Callable | None = None  # Pallas kernels over a sequence (model.ttt.impl=pallas)
  pallas_auto: bool = True  # model.ttt.impl=auto takes pallas_sequence on a GPU
  mixer: str = ""

  @property
  def mixer_name(self) -> str:
    return self.mixer or f"ttt_{self.name}"

  def param_shapes(self, head_dim: int) -> dict[str, tuple[int, int]]:
    """{name: shape} of one head's inner parameters: [d_in, d_out] weights, [1, d_out] biases."""
    widths = self.widths(head_dim)
    shapes = {}
    for (w, b), d_in, d_out in zip(self.layers, widths[:-1], widths[1:], strict=True):
      shapes[w], shapes[b] = (d_in, d_out), (1, d_out)
    return shapes

  @property
  def weight_names(self) -> frozenset[str]:
    """The layer's names of the inner weight matrices (weight decay applies to them)."""
    return frozenset(w for w, _ in self.layers)

  def step(self, impl: str) -> Step:
    """The plain mini-batch step of `impl` ('primal' or 'dual')."""
    primal = self.primal or autodiff_primal(self.predict)
    return (self.dual or primal) if impl == "dual" else primal


def register_inner_model(model: InnerModel) -> InnerModel:
  """Adds `model` to the registry (layers/ttt_variants.py registers the built-in ones)."""
  INNER_MODELS[model.name] = model
  return model


def inner_model(name: str) -> InnerModel:
  if name not in INNER_MODELS:
    raise ValueError(f"TTT inner model {name!r} unknown; registered: {', '.join(INNER_MODELS)}")
  return INNER_MODELS[name]


def inner_model_for_mixer(mixer: str) -> InnerModel:
  """The inner model that `model.mixer=mixer` selects."""
  for model in INNER_MODELS.values():
    if model.mixer_name == mixer:
      return model
  raise ValueError(f"model.mixer={mixer!r} names no TTT inner model; registered: "
                   f"{', '.join(m.mixer_name for m in INNER_MODELS.values())}")


def inner_loss(kind: str, params: InnerParams, ln, xk, xv) -> jax.Array:
  """Per-token inner loss [B, H, b] of the mini-batch (xk, xv) at `params`."""
  pred = inner_model(kind).predict(params, xk)
  return 0.5 * jnp.sum(jnp.square(layer_norm(pred, *ln) - (xv - xk)), axis=-1)


# -- a sequence of mini-batches -------------------------------------------------------------------


def warmup_lr_mult(step: int | jax.Array | None, warmup_steps: int) -> jax.Array:
  """Inner-LR multiplier lr_mult = min(1, (step + 1) / warmup_steps) at outer step `step`
  (0-based: the number of completed optimizer updates). No step (evaluation, generation,
  streaming) or warmup_steps = 0 gives 1."""
  if step is None or warmup_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)


def token_lr(gate: jax.Array, tau: jax.Array, base_lr: float, head_dim: int,
             lr_mult: float | jax.Array = 1.0) -> jax.Array:
  """eta[t, s] = lr_mult * base_lr * max(0, 1/t + tau_t) * gate_s / d, t = 1..b.

  gate [..., b] (sigmoid outputs) -> eta [..., b, b].
  """
  b = tau.shape[-1]
  c = base_lr * jnp.maximum(0.0, 1.0 / jnp.arange(1, b + 1, dtype=jnp.float32) + tau)
  return lr_mult * c[:, None] * gate[..., None, :] / head_dim


def scan_minibatches(step: Callable, params: InnerParams, ln, xs, remat_group: int,
                     complete: jax.Array | None = None):
  """Runs `step` over mini-batches xs = (xq, xk, xv, eta), each with a leading axis n.

  `remat_group` k > 0: scan over groups of k mini-batches, each group under `jax.checkpoint`
  (remat through time: only the W at group boundaries is kept for the backward pass, and one
  group is recomputed at a time); k = 0: a plain scan. `complete` [n] bool (streaming): the
  update of an incomplete (partial) mini-batch is not applied. Returns (final params, z [n,...]).
  """

  # the inner LayerNorm per sequence, like the inner weights: its gradient then sums over the
  # batch once, after the loop (on a mesh that splits the batch, the sum of each trip's share
  # was an all-reduce per trip)
  ln = tuple(jnp.broadcast_to(a, (xs[0].shape[1], *a.shape)) for a in ln)

  def body(p, inp):
    x, ok = inp
    new, z = step(p, ln, *x)
    if ok is not None:
      new = jax.tree.map(lambda a, c: jnp.where(ok, a, c), new, p)
    return new, z

  n = xs[0].shape[0]
  inp = (xs, complete)
  if remat_group <= 0:
    return jax.lax.scan(body, params, inp)

  @jax.checkpoint
  def inner(p, g):
    return jax.lax.scan(body, p, g)

  def group(p, g):
    # the weights entering each group and its outputs: what the backward pass needs of the
    # loop, kept under `model.remat=kernels` (the block's recomputation then skips the loop)
    p = jax.tree.map(lambda a: checkpoint_name(a, KERNEL_OUTPUTS), p)
    new, z = inner(p, g)
    return new, checkpoint_name(z, KERNEL_OUTPUTS)

  k = min(remat_group, n)
  n_full = n // k
  head = jax.tree.map(lambda a: a[: n_full * k].reshape(n_full, k, *a.shape[1:]), inp)
  params, z = jax.lax.scan(group, params, head)
  z = z.reshape(n_full * k, *z.shape[2:])
  if n % k:
    params, z_tail = group(params, jax.tree.map(lambda a: a[n_full * k:], inp))
    z = jnp.concatenate([z, z_tail], axis=0)
  return params, z
