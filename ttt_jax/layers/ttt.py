"""TTT-Linear / TTT-MLP sequence mixers (mini-batch TTT with a learnable token-dependent LR).

Per head the layer keeps an inner model (see layers/ttt_inner.py) whose weights W are the hidden
state: every mini-batch of b tokens takes one gradient step of the self-supervised inner loss on
its training view XK -> label view XV, and tokens read the test view XQ through the causally
updated W. Views come from learned projections (RoPE at position `t mod b` on XQ/XK):
  backbone 'mamba' (`ttt_*`): XQ, XK share one projection followed by their own causal depthwise
    convs; the output is gated by gelu_tanh(theta_G x).
  backbone 'base' (`ttt_*_base`): separate theta_Q/theta_K/theta_V, no conv, no gate.
Output: merge heads -> LayerNorm(D) -> [gate] -> theta_O.

A sequence mixer (layers/mixers.py: the `SequenceMixer` protocol); layers/ttt_variants.py
registers TTT-Linear and TTT-MLP as 'ttt_linear' / 'ttt_mlp'. Its knobs are one frozen
`TTTConfig`, so another NNX model can hold the layer without a ConfigDict:
  TTTMixer(TTTConfig(d_model=512, num_heads=8, inner="linear"), rngs=nnx.Rngs(0))
`step` is the outer training step: the inner LR is multiplied by
lr_mult = min(1, (step+1)/lr_warmup_steps)
(warm-up of the inner LR during training); without a step (evaluation, generation) lr_mult = 1.
`state=None` runs a fresh sequence in one shot (T must be a multiple of b). With a `TTTState`
any T works: the state holds W at the start of the current mini-batch plus the buffered views
and LR gates of its first `count` tokens, so chunked or token-by-token calls reproduce the
one-shot outputs exactly; the update of a mini-batch is applied once its b-th token arrives.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.config import ConfigError
from ttt_jax.layers import common, ttt_inner, ttt_pallas
from ttt_jax.layers.common import const_init, linear, normal_init, target_platform
from ttt_jax.layers.rope import apply_rope
from ttt_jax.sharding import per_shard

POST_NORM_EPS = 1e-6


@jax.custom_vjp
def causal_convs(xp: jax.Array, kernels: tuple) -> tuple:
  """Depthwise causal convs of one input: for each (w [W, D], bias [D]) of `kernels`,
  y_t = sum_j w_j * xp_{t+j} + bias, xp [B, T+W-1, D] (history first) -> a tuple of [B, T, D].

  Convs that read the same input (TTT's Q and K convs) share one pass over it each way. The
  backward pass is written out (`_convs_bwd`): every weight and bias cotangent of all the convs
  is one reduction over (batch, time) (XLA:GPU otherwise launches a two-stage reduction per tap
  and conv), and XLA:CPU differentiates the sum of shifted products into padded copies of the
  cotangent and layout changes that cost 2.4x the forward + backward time of this form
  (measured at [1, 2048, 256] after a projection).
  """
  width = _conv_width(kernels)
  t = xp.shape[1] - width + 1
  taps = [xp[:, j:j + t] for j in range(width)]
  return tuple(sum(x * w[j] for j, x in enumerate(taps)) + bias for w, bias in kernels)


def _conv_width(kernels: tuple) -> int:
  """The convs' common width W (ValueError if `kernels` is empty or their widths differ)."""
  widths = {w.shape[0] for w, _ in kernels}
  if len(widths) != 1:
    raise ValueError(f"causal_convs: kernels of one width expected, got widths "
                     f"{sorted(widths) or 'none'}")
  return widths.pop()


def _convs_fwd(xp, kernels):
  return causal_convs(xp, kernels), (xp, kernels)


def _convs_bwd(res, gs):
  xp, kernels = res
  ws = [w for w, _ in kernels]
  width, t, n = ws[0].shape[0], gs[0].shape[1], xp.shape[1]
  pads = [jnp.pad(g, ((0, 0), (width - 1, width - 1), (0, 0))) for g in gs]
  # dxp_s = sum over convs c and taps j of w_cj * g_c,s-j
  dxp = sum(p[:, width - 1 - j:width - 1 - j + n] * w[j]
            for p, w in zip(pads, ws, strict=True) for j in range(width))
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  taps = [f32(xp[:, j:j + t]) for j in range(width)]
  g32 = [f32(g) for g in gs]
  # rows: conv c's taps at c*W .. c*W+W-1, then one bias row per conv
  rows = [x * g for g in g32 for x in taps] + g32
  # side by side along the channels: one column reduction of [B*T, (C*W + C) * D]
  sums = jnp.sum(jnp.concatenate(rows, axis=-1), axis=(0, 1)).reshape(len(rows), -1)
  bias_row = len(gs) * width
  grads = tuple((sums[i * width:(i + 1) * width].astype(w.dtype),
                 sums[bias_row + i].astype(bias.dtype))
                for i, (w, bias) in enumerate(kernels))
  return dxp.astype(xp.dtype), grads


causal_convs.defvjp(_convs_fwd, _convs_bwd)


def causal_conv(xp: jax.Array, w: jax.Array, bias: jax.Array) -> jax.Array:
  """One depthwise causal conv (`causal_convs`): xp [B, T+W-1, D], w [W, D] -> [B, T, D]."""
  return causal_convs(xp, ((w, bias),))[0]


class CausalConv(nnx.Module):
  """Depthwise causal 1-D conv with bias: y_t = sum_j w_j * x_{t-width+1+j} + bias.

  Streaming state: the last `width - 1` inputs [B, width-1, D] (zeros at sequence start).
  """

  def __init__(self, dim: int, width: int, *, axis: str | None, compute_dtype, param_dtype,
               rngs: nnx.Rngs):
    self.width = width
    self.dim = dim
    self.compute_dtype = compute_dtype
    self.kernel = nnx.Param(normal_init(width ** -0.5, (None, axis))(
        rngs.params(), (width, dim), param_dtype))
    self.bias = nnx.Param(const_init(0.0, (axis,))(None, (dim,), param_dtype))

  def init_state(self, batch_size: int) -> jax.Array:
    return jnp.zeros((batch_size, self.width - 1, self.dim), self.compute_dtype)

  def history(self, x: jax.Array, state: jax.Array | None = None):
    """(xp [B, width-1+T, D]: `x` in the compute dtype after its history (zeros without a
    `state`), the new state (None without one))."""
    x = x.astype(self.compute_dtype)
    prev = self.init_state(x.shape[0]) if state is None else state.astype(x.dtype)
    xp = jnp.concatenate([prev, x], axis=1)
    return xp, None if state is None else xp[:, xp.shape[1] - (self.width - 1):]

  def weights(self) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) in the compute dtype: an entry of `causal_convs`' kernels."""
    return (self.kernel[...].astype(self.compute_dtype),
            self.bias[...].astype(self.compute_dtype))

  def __call__(self, x: jax.Array, state: jax.Array | None = None):
    xp, new_state = self.history(x, state)
    return causal_conv(xp, *self.weights()), new_state


# logical axes of the inner loop's arrays: per-sequence inner weights [B, H, ...], per-head
# inner LayerNorm [H, 1, d], mini-batched views and LRs [n, B, H, b, ...]
SEQ_AXES, HEAD_AXES, MB_AXES = ("batch", "heads"), ("heads",), (None, "batch", "heads")


class TTTState(NamedTuple):
  """Streaming state of one TTT mixer."""

  params: dict  # inner weights at the start of the current mini-batch, each [B, H, ...] fp32
  xk: jax.Array  # [B, H, b, d] training views of the current mini-batch's first `count` tokens
  xv: jax.Array  # [B, H, b, d] label views
  gate: jax.Array  # [B, H, b] LR gates
  count: jax.Array  # int32 scalar: tokens of the current mini-batch seen so far (0..b-1)
  conv: jax.Array | None  # [B, width-1, D] Q/K conv input history (mamba backbone)


def resolve_impl(impl: str, kind: str, mini_batch_size: int) -> str:
  """`model.ttt.impl` on this platform: auto = the Pallas sequence kernels of the inner model
  `kind` (TTT-Linear: one launch per sequence each way; a layer's fwd+bwd 4.6x faster than the
  dual form's scan on an H200, docs/benchmarks.md) on a GPU where their geometry allows, on one
  device or a mesh of them (each device runs the kernels on its shard of sequences and heads:
  `sharding.per_shard`), else the dual form: for inner models without kernels or that opt out
  (`pallas_auto=False`: TTT-MLP, whose kernels have not yet been timed on a GPU), or where
  this JAX has no Pallas Triton backend (`common.triton_missing`)."""
  if impl != "auto":
    return impl
  model = ttt_inner.inner_model(kind)
  gpu_kernel = (model.pallas_sequence is not None and model.pallas_auto
                and target_platform() == "gpu" and common.pltriton is not None
                and ttt_pallas.check_geometry(mini_batch_size) is None)
  return "pallas" if gpu_kernel else "dual"


@dataclasses.dataclass(frozen=True)
class TTTConfig:
  """The TTT layer's knobs (the model's `model.ttt` section plus the widths it runs at)."""

  d_model: int
  num_heads: int  # head dim d = d_model / num_heads
  inner: str = "linear"  # the registered inner model (layers/ttt_inner.py): 'linear', 'mlp', ...
  mini_batch_size: int = 16  # b: tokens per inner gradient step
  base_lr: float = 1.0  # inner LR scale (TTT-Linear 1.0, TTT-MLP 0.1 in the paper)
  lr_warmup_steps: int = 0  # inner-LR multiplier min(1, (step+1)/n) over the first n steps
  backbone: str = "mamba"  # 'mamba': shared Q/K projection + convs, output gate | 'base'
  conv_width: int = 4  # the Mamba backbone's Q/K causal convs
  impl: str = "auto"  # auto | dual | primal | pallas (see `resolve_impl`)
  remat_group: int = 4  # mini-batches per jax.checkpoint group (remat through time); 0 = off
  rope_theta: float = 10000.0  # RoPE on XQ/XK at position t mod b
  init_std: float = 0.02  # projections, LR gate and initial inner weights
  out_std: float | None = None  # the output projection theta_O; None = init_std


class TTTMixer(nnx.Module):
  """Multi-head TTT layer running the registered inner model `cfg.inner` (layers/ttt_inner.py:
  `InnerModel`)."""

  def __init__(self, cfg: TTTConfig, *, rngs: nnx.Rngs, compute_dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.kind = cfg.inner
    model = ttt_inner.inner_model(self.kind)
    self.num_heads, d_model = cfg.num_heads, cfg.d_model
    self.head_dim = d = d_model // cfg.num_heads
    self.mini_batch_size = cfg.mini_batch_size
    self.base_lr = float(cfg.base_lr)
    self.lr_warmup_steps = int(cfg.lr_warmup_steps)
    self.impl = resolve_impl(cfg.impl, self.kind, cfg.mini_batch_size)
    if self.impl == "pallas":
      platform = target_platform()
      why = ttt_pallas.check_geometry(cfg.mini_batch_size) if platform == "gpu" else None
      if platform == "tpu":
        why = "model.ttt.impl=pallas has GPU (Triton) kernels only; use dual on a TPU"
      if not model.pallas_sequence:
        why = f"model.ttt.impl=pallas: the TTT inner model {self.kind!r} has no Pallas kernel"
      why = common.triton_missing("model.ttt.impl") or why
      if why:
        raise ConfigError(why)
    self.remat_group = int(cfg.remat_group)
    self.mamba = cfg.backbone == "mamba"
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = compute_dtype
    h, std = self.num_heads, cfg.init_std
    out_std = std if cfg.out_std is None else cfg.out_std
    kw = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)
    self.wq = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wk = None if self.mamba else linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wv = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    self.wo = linear(d_model, d_model, ("heads", "embed"), std=out_std, **kw)
    if self.mamba:
      self.conv_q = CausalConv(d_model, cfg.conv_width, axis="heads", **kw)
      self.conv_k = CausalConv(d_model, cfg.conv_width, axis="heads", **kw)
      self.wg = linear(d_model, d_model, ("embed", "heads"), std=std, **kw)
    else:
      self.conv_q = self.conv_k = self.wg = None
    # Token-dependent inner LR: gate_s = sigmoid(x_s . lr_w[h] + lr_b[h]); per-position tau.
    key = rngs.params
    self.lr_w = nnx.Param(normal_init(std, ("heads", "embed"))(key(), (h, d_model), param_dtype))
    self.lr_b = nnx.Param(const_init(0.0, ("heads",))(None, (h,), param_dtype))
    self.tau = nnx.Param(const_init(0.0, (None,))(None, (cfg.mini_batch_size,), param_dtype))
    # Initial inner weights W0 (outer-loop parameters) and the per-head inner LayerNorm.
    w_axes = ("heads", "head_dim", "head_dim")
    b_axes = ("heads", None, "head_dim")
    shapes = model.param_shapes(d)
    for w, b in model.layers:
      setattr(self, w, nnx.Param(normal_init(std, w_axes)(key(), (h, *shapes[w]), param_dtype)))
      setattr(self, b, nnx.Param(const_init(0.0, b_axes)(None, (h, *shapes[b]), param_dtype)))
    self.ln_scale = nnx.Param(const_init(1.0, b_axes)(None, (h, 1, d), param_dtype))
    self.ln_bias = nnx.Param(const_init(0.0, b_axes)(None, (h, 1, d), param_dtype))
    self.post_scale = nnx.Param(const_init(1.0, ("heads",))(None, (d_model,), param_dtype))
    self.post_bias = nnx.Param(const_init(0.0, ("heads",))(None, (d_model,), param_dtype))

  # -- state --------------------------------------------------------------------------------------
  def initial_params(self, batch_size: int) -> dict:
    """W0 broadcast over the batch, fp32."""
    model = ttt_inner.inner_model(self.kind)
    keys = [key for pair in model.layers for key in pair]
    return {k: jnp.broadcast_to(getattr(self, k)[...].astype(jnp.float32),
                                (batch_size, *getattr(self, k).shape))
            for k in keys}

  def init_state(self, batch_size: int, capacity: int | None = None) -> TTTState:
    """Fresh streaming state (`capacity` is unused: the TTT state has constant size)."""
    del capacity
    shape = (batch_size, self.num_heads, self.mini_batch_size, self.head_dim)
    return TTTState(
        params=self.initial_params(batch_size), xk=jnp.zeros(shape, jnp.float32),
        xv=jnp.zeros(shape, jnp.float32), gate=jnp.zeros(shape[:3], jnp.float32),
        count=jnp.zeros((), jnp.int32),
        conv=self.conv_q.init_state(batch_size) if self.mamba else None)

  # -- views --------------------------------------------------------------------------------------
  def _views(self, x, positions, conv_state):
    """(xq, xk, xv [B,H,T,d] fp32, gate [B,H,T] fp32, new conv state)."""
    bsz, t, _ = x.shape
    new_conv = None
    if self.mamba:
      # Q and K convs of one projection: one pass over it each way (`causal_convs`)
      xp, new_conv = self.conv_q.history(self.wq(x), conv_state)
      xq, xk = causal_convs(xp, (self.conv_q.weights(), self.conv_k.weights()))
    else:
      xq, xk = self.wq(x), self.wk(x)
    xv = self.wv(x)
    split = lambda a: a.reshape(bsz, t, self.num_heads, self.head_dim)  # noqa: E731
    rope_pos = positions % self.mini_batch_size
    xq = apply_rope(split(xq), rope_pos, self.rope_theta)
    xk = apply_rope(split(xk), rope_pos, self.rope_theta)
    heads_first = lambda a: jnp.swapaxes(a, 1, 2).astype(jnp.float32)  # noqa: E731
    logit = jnp.einsum("btc,hc->bht", x.astype(jnp.float32), self.lr_w[...].astype(jnp.float32))
    gate = jax.nn.sigmoid(logit + self.lr_b[...].astype(jnp.float32)[:, None])
    return heads_first(xq), heads_first(xk), heads_first(split(xv)), gate, new_conv

  def _run(self, params, xq, xk, xv, gate, lr_mult, complete=None):
    """Mini-batch TTT over [B,H,n*b,d] views. Returns (final params, z [B,H,n*b,d])."""
    bsz, h, length, d = xq.shape
    b, n = self.mini_batch_size, xq.shape[2] // self.mini_batch_size
    to_mb = lambda a: jnp.moveaxis(a.reshape(bsz, h, n, b, *a.shape[3:]), 2, 0)  # noqa: E731
    eta = ttt_inner.token_lr(to_mb(gate), self.tau[...].astype(jnp.float32), self.base_lr, d,
                             lr_mult)
    ln = (self.ln_scale[...].astype(jnp.float32), self.ln_bias[...].astype(jnp.float32))
    xs = (to_mb(xq), to_mb(xk), to_mb(xv), eta)
    interpret = target_platform() != "gpu"  # Pallas kernels: compiled on a GPU only
    model = ttt_inner.inner_model(self.kind)
    with jax.named_scope("ttt_inner"):  # the inner loop, apart from the projections
      params, z = self._inner(model, params, ln, xs, interpret, complete)
    return params, jnp.moveaxis(z, 0, 2).reshape(bsz, h, length, d)

  def _inner(self, model, params, ln, xs, interpret: bool, complete):
    pallas = self.impl == "pallas"
    if pallas and model.pallas_sequence:
      # one kernel program per sequence and head: on a mesh, each device runs the kernels on
      # its own sequences and heads (XLA cannot split a kernel call itself); streaming calls
      # pass `complete` (whole on every device): a partial mini-batch makes no update
      extra = () if complete is None else (complete,)
      kernel = per_shard(lambda *a: model.pallas_sequence(*a, interpret=interpret),
                         [SEQ_AXES, HEAD_AXES] + [MB_AXES] * len(xs) + [(None,)] * len(extra),
                         [SEQ_AXES, MB_AXES])
      return kernel(params, ln, *xs, *extra)
    if model.dual_sequence and self.impl == "dual":
      # dual: W-independent work hoisted out of the scan (layers/ttt_dual.py)
      return model.dual_sequence(params, ln, *xs, self.remat_group, complete)
    step = model.step("primal" if pallas else self.impl)
    return ttt_inner.scan_minibatches(step, params, ln, xs, self.remat_group, complete)

  def _stream(self, state: TTTState, xq, xk, xv, gate, lr_mult):
    """Prepends the buffered partial mini-batch, runs, and re-buffers the new partial one."""
    bsz, h, t, d = xq.shape
    b, m = self.mini_batch_size, state.count
    length = b * (-(-t // b) + 1)  # room for the buffered tokens (< b) plus the new ones

    def place(buf, new):  # buffer at slots [0, b), new tokens at [m, m + t)
      pad = jnp.zeros((*buf.shape[:2], length - b, *buf.shape[3:]), buf.dtype)
      full = jnp.concatenate([buf, pad], axis=2)
      start = (0, 0, m) + (0,) * (buf.ndim - 3)
      return jax.lax.dynamic_update_slice(full, new.astype(buf.dtype), start)

    zero_q = jnp.zeros_like(state.xk)
    xq_all, xk_all, xv_all = place(zero_q, xq), place(state.xk, xk), place(state.xv, xv)
    gate_all = place(state.gate, gate)
    end = m + t
    complete = (jnp.arange(length // b) + 1) * b <= end
    params, z = self._run(state.params, xq_all, xk_all, xv_all, gate_all, lr_mult, complete)
    z = jax.lax.dynamic_slice_in_dim(z, m, t, axis=2)
    start = (end // b) * b
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, b, axis=2)  # noqa: E731
    new = TTTState(params=params, xk=take(xk_all), xv=take(xv_all), gate=take(gate_all),
                   count=(end % b).astype(jnp.int32), conv=state.conv)
    return z, new

  def __call__(self, x: jax.Array, positions: jax.Array, state: TTTState | None = None,
               step: jax.Array | int | None = None):
    """x [B,T,D] -> (y [B,T,D], new state). `step`: the outer training step (inner-LR warm-up);
    None = lr_mult 1."""
    x = x.astype(self.compute_dtype)
    bsz, t, d_model = x.shape
    if state is None and t % self.mini_batch_size:
      raise ValueError(f"TTT layer: sequence length {t} must be a multiple of "
                       f"model.ttt.mini_batch_size={self.mini_batch_size} (or pass a state from "
                       "init_state to stream any length)")
    xq, xk, xv, gate, new_conv = self._views(x, positions, None if state is None else state.conv)
    lr_mult = ttt_inner.warmup_lr_mult(step, self.lr_warmup_steps)
    if state is None:
      _, z = self._run(self.initial_params(bsz), xq, xk, xv, gate, lr_mult)
      new_state = None
    else:
      z, new_state = self._stream(state, xq, xk, xv, gate, lr_mult)
      new_state = new_state._replace(conv=new_conv)
    y = jnp.swapaxes(z, 1, 2).reshape(bsz, t, d_model)
    y = ttt_inner.layer_norm(y, self.post_scale[...].astype(jnp.float32),
                             self.post_bias[...].astype(jnp.float32), POST_NORM_EPS)
    y = y.astype(self.compute_dtype)
    if self.mamba:
      y = y * ttt_inner.gelu(self.wg(x))
    return self.wo(y), new_state
