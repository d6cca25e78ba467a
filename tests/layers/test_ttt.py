"""TTT-Linear / TTT-MLP: dual == primal == autodiff references, learning, causality, streaming."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers import ttt_inner, ttt_variants
from ttt_jax.layers.ttt import TTTConfig, TTTMixer
from ttt_jax.models import build_model
from ttt_jax.models.config import model_config

BASE_LR = {"linear": 1.0, "mlp": 0.1}


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def tree_rel_err(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(rel_err, a, b)))


# -- inner loop on raw views ---------------------------------------------------------------------


def random_inputs(kind: str, batch: int, heads: int, length: int, d: int, b: int, seed: int):
  """Random views, gates, tau, inner LN params and initial inner weights (all non-trivial)."""
  rng = np.random.default_rng(seed)  # numpy: no per-op compilation for test inputs
  n = lambda s, std=1.0: jnp.asarray(std * rng.standard_normal(s), jnp.float32)  # noqa: E731
  views = [n((batch, heads, length, d)) for _ in range(3)]
  gate = jnp.asarray(rng.uniform(0.1, 0.9, (batch, heads, length)), jnp.float32)
  tau = n((b,), 0.1)
  ln = (1.0 + n((heads, 1, d), 0.1), n((heads, 1, d), 0.1))
  if kind == "linear":
    params = {"w": n((heads, d, d), 0.3), "b": n((heads, 1, d), 0.1)}
  else:
    params = {"w1": n((heads, d, 4 * d), 0.3), "b1": n((heads, 1, 4 * d), 0.1),
              "w2": n((heads, 4 * d, d), 0.3), "b2": n((heads, 1, d), 0.1)}
  params = jax.tree.map(lambda p: jnp.broadcast_to(p, (batch, *p.shape)), params)
  return params, ln, views, gate, tau


def run_inner(kind, impl, params, ln, xq, xk, xv, gate, tau, b, remat_group=0):
  """Sequence-level inner loop via ttt_inner (what the mixer calls). z [B,H,T,d]."""
  bsz, h, length, d = xq.shape
  n = length // b
  to_mb = lambda a: jnp.moveaxis(a.reshape(bsz, h, n, b, *a.shape[3:]), 2, 0)  # noqa: E731
  eta = ttt_inner.token_lr(to_mb(gate), tau, BASE_LR[kind], d)
  final, z = ttt_inner.scan_minibatches(ttt_inner.inner_model(kind).step(impl), params, ln,
                                        (to_mb(xq), to_mb(xk), to_mb(xv), eta), remat_group)
  return final, jnp.moveaxis(z, 0, 2).reshape(bsz, h, length, d)


def g_fn(kind, p, z):
  """The inner model's g(z; W) for one token (no batch/head axes)."""
  if kind == "linear":
    return z @ p["w"] + p["b"][0]
  return jax.nn.gelu(z @ p["w1"] + p["b1"][0], approximate=True) @ p["w2"] + p["b2"][0]


def ln_ref(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def token_grad(kind, scale, bias):
  """d/dW of one token's inner loss 0.5 * |LN(g(k; W)) - (v - k)|^2, by autodiff."""

  @jax.jit
  @jax.grad
  def grad(p, k, v):
    return 0.5 * jnp.sum((ln_ref(g_fn(kind, p, k), scale, bias) - (v - k)) ** 2)

  return grad


def reference_one_head(kind, params, ln, xq, xk, xv, gate, tau, b):
  """Mini-batch TTT from its definition, one sequence and one head, with autodiff gradients.

  params: inner weights for the head; xq/xk/xv [T, d]; gate [T]. Returns (z [T, d], final W).
  """
  d = xq.shape[-1]
  scale, bias = ln[0][0], ln[1][0]
  grad = token_grad(kind, scale, bias)

  out, w = [], params
  for i in range(xq.shape[0] // b):
    sl = slice(i * b, (i + 1) * b)
    grads = [grad(w, xk[s], xv[s]) for s in range(sl.start, sl.stop)]
    for t in range(b):  # token t of the mini-batch (1-based index t + 1)
      c = BASE_LR[kind] * max(0.0, 1.0 / (t + 1) + float(tau[t]))
      w_t = w
      for s in range(t + 1):
        eta = c * float(gate[i * b + s]) / d
        w_t = jax.tree.map(lambda a, g, e=eta: a - e * g, w_t, grads[s])
      q = xq[i * b + t]
      out.append(q + ln_ref(g_fn(kind, w_t, q), scale, bias))
    w = w_t  # W_{i+1} = W_{i, b}
  return jnp.stack(out), w


def online_gd_one_head(kind, params, ln, xq, xk, xv, gate, tau):
  """Textbook online GD: for each token, one gradient step on its loss, then read it out."""
  d = xq.shape[-1]
  scale, bias = ln[0][0], ln[1][0]
  grad = token_grad(kind, scale, bias)

  lr = BASE_LR[kind] * max(0.0, 1.0 + float(tau[0]))
  w, out = params, []
  for t in range(xq.shape[0]):
    g = grad(w, xk[t], xv[t])
    w = jax.tree.map(lambda a, gg, e=lr * float(gate[t]) / d: a - e * gg, w, g)
    out.append(xq[t] + ln_ref(g_fn(kind, w, xq[t]), scale, bias))
  return jnp.stack(out), w


def head_slice(tree, bi, hi):
  return jax.tree.map(lambda a: a[bi, hi], tree)


@pytest.mark.parametrize("kind,b,heads", [
    ("linear", 4, 3), ("mlp", 2, 2),
    pytest.param("linear", 1, 2, marks=pytest.mark.slow),
    pytest.param("mlp", 8, 1, marks=pytest.mark.slow)])
def test_dual_equals_primal_and_grads(kind, b, heads):
  """Outputs, final inner weights and gradients w.r.t. every input agree (fp32)."""
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 2, heads, 16, 8, b, seed=b + heads)
  probe = jnp.asarray(np.random.default_rng(7).standard_normal(xq.shape), jnp.float32)
  res = {}
  for impl in ("dual", "primal"):
    def objective(*args, impl=impl):
      final, z = run_inner(kind, impl, *args, b=b)
      value = jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(final))
      return value, (final, z)

    grad_fn = jax.value_and_grad(objective, argnums=tuple(range(7)), has_aux=True)
    res[impl] = jax.jit(grad_fn)(params, ln, xq, xk, xv, gate, tau)
  (_, (final_d, z_d)), grads_d = res["dual"]
  (_, (final_p, z_p)), grads_p = res["primal"]
  assert rel_err(z_d, z_p) <= 1e-5
  assert tree_rel_err(final_d, final_p) <= 1e-5
  assert tree_rel_err(grads_d, grads_p) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_matches_minibatch_definition_with_autodiff(kind):
  b = 4
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 1, 2, 12, 8, b, seed=3)
  final, z = run_inner(kind, "dual", params, ln, xq, xk, xv, gate, tau, b)
  for hi in range(2):
    ref_z, ref_w = reference_one_head(kind, head_slice(params, 0, hi), ln_slice(ln, hi), xq[0, hi],
                                      xk[0, hi], xv[0, hi], gate[0, hi], tau, b)
    assert rel_err(z[0, hi], ref_z) <= 1e-5
    assert tree_rel_err(head_slice(final, 0, hi), ref_w) <= 1e-5


def ln_slice(ln, hi):
  return (ln[0][hi], ln[1][hi])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_b1_is_online_gradient_descent(kind):
  params, ln, (xq, xk, xv), gate, tau = random_inputs(kind, 1, 1, 10, 8, 1, seed=5)
  for impl in ("dual", "primal"):
    final, z = run_inner(kind, impl, params, ln, xq, xk, xv, gate, tau, 1)
    ref_z, ref_w = online_gd_one_head(kind, head_slice(params, 0, 0), ln_slice(ln, 0), xq[0, 0],
                                      xk[0, 0], xv[0, 0], gate[0, 0], tau)
    assert rel_err(z[0, 0], ref_z) <= 1e-5
    assert tree_rel_err(head_slice(final, 0, 0), ref_w) <= 1e-5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_update_is_a_descent_step_on_the_gated_inner_loss(kind):
  """A mini-batch's update W_{i+1} = W_i - sum_s eta[b, s] grad l_s(W_i) is one gradient step of
  size c_b / d on its gate-weighted inner loss L(W) = sum_s a_s l_s(W). So for a small inner LR,
  in every sequence and every head, L falls by (c_b / d) |grad L(W_i)|^2 to first order: checked
  with the test's own loss and its autodiff gradient (a wrong sign, row of eta, gate or inner
  gradient fails; the second-order term is < 1e-3 of it here)."""
  b, d, heads = 8, 16, 3
  params, ln, (_, xk, xv), gate, tau = random_inputs(kind, 2, heads, b, d, b, seed=11)
  base_lr = 0.01 * BASE_LR[kind]
  step = base_lr * max(0.0, 1.0 / b + float(tau[-1])) / d  # c_b / d
  assert step > 0
  eta = ttt_inner.token_lr(gate, tau, base_lr, d)
  new, _ = jax.jit(ttt_inner.inner_model(kind).step("dual"))(params, ln, xk, xk, xv, eta)

  def gated_loss(p, k, v, a, scale, bias):  # one sequence, one head
    def token(kk, vv):
      return 0.5 * jnp.sum((ln_ref(g_fn(kind, p, kk), scale, bias) - (vv - kk)) ** 2)
    return jnp.sum(a * jax.vmap(token)(k, v))

  def descent_over_predicted(p0, p1, k, v, a, scale, bias):
    l0, g = jax.value_and_grad(gated_loss)(p0, k, v, a, scale, bias)
    l1 = gated_loss(p1, k, v, a, scale, bias)
    return (l0 - l1) / (step * sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))

  per_head = jax.vmap(descent_over_predicted)  # every argument has the head axis first
  per_seq = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None, None))
  ratio = np.asarray(jax.jit(per_seq)(params, new, xk, xv, gate, *ln))
  assert ratio.shape == (2, heads)
  assert np.all(np.abs(ratio - 1) < 3e-3), ratio


# -- the mixer ---------------------------------------------------------------------------------


def mixer_cfg(mixer="ttt_linear", backbone="mamba", b=4, impl="dual", remat_group=0,
              heads=2) -> TTTConfig:
  """The TTT layer of the `model=mixer` preset at width 32 in a 2-layer model."""
  c = build_config(f"model={mixer}").model
  c.d_model, c.num_heads, c.num_layers = 32, heads, 2
  c.ttt.mini_batch_size, c.ttt.backbone, c.ttt.impl = b, backbone, impl
  c.ttt.remat_group = remat_group
  return ttt_variants.ttt_config(model_config(c), ttt_inner.inner_model_for_mixer(mixer).name)


def make_mixer(**kw):
  return TTTMixer(mixer_cfg(**kw), compute_dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(0))


def randomize(module, seed=1, std=0.3):
  """Perturbs every parameter (zeros/ones at init would hide errors in the biases and norms)."""
  graphdef, state = nnx.split(module)
  leaves, tree = jax.tree.flatten(state)
  rng = np.random.default_rng(seed)
  leaves = [x + jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def functional(module):
  """(graphdef, params, jitted f(params, x, positions, state) -> (y, state))."""
  graphdef, params = nnx.split(module)

  @jax.jit
  def f(p, x, positions, state):
    return nnx.merge(graphdef, p)(x, positions, state)

  return params, f


X = jnp.asarray(np.random.default_rng(42).standard_normal((2, 24, 32)), jnp.float32)
POS = jnp.arange(24, dtype=jnp.int32)


@pytest.mark.parametrize("mixer", ["ttt_linear", pytest.param("ttt_mlp", marks=pytest.mark.slow)])
def test_mixer_dual_equals_primal_grads_all_params(mixer):
  """model.ttt.impl dual and primal: the same values and gradients from different programs
  (the dual form's scan body has no inner gradient to transpose: fewer equations)."""
  outs, body = {}, {}
  for impl in ("dual", "primal"):
    m = randomize(make_mixer(mixer=mixer, impl=impl, heads=4), std=0.1)
    assert m.impl == impl
    params, _ = functional(m)
    graphdef = nnx.graphdef(m)

    def loss(p, x, graphdef=graphdef):
      y, _ = nnx.merge(graphdef, p)(x, POS, None)
      return jnp.sum(jnp.sin(y)), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, X)
    outs[impl] = (y, g)
    forward = jax.make_jaxpr(lambda p, x, graphdef=graphdef: loss(p, x, graphdef)[0])(params, X)
    body[impl] = max(len(e.params["jaxpr"].eqns) for e in forward.jaxpr.eqns
                     if e.primitive.name == "scan")
  assert rel_err(outs["dual"][0], outs["primal"][0]) <= 1e-5
  assert tree_rel_err(outs["dual"][1], outs["primal"][1]) <= 1e-5
  assert body["dual"] < body["primal"], body


@pytest.mark.parametrize("backbone", ["mamba", "base"])
def test_mixer_causal(backbone):
  m = randomize(make_mixer(mixer="ttt_mlp", backbone=backbone))
  params, f = functional(m)
  y, _ = f(params, X, POS, None)
  p = 13
  x2 = X.at[:, p].add(1.0)
  y2, _ = f(params, x2, POS, None)
  assert float(jnp.max(jnp.abs(y2[:, :p] - y[:, :p]))) == 0.0
  assert float(jnp.max(jnp.abs(y2[:, p] - y[:, p]))) > 1e-4


@pytest.mark.parametrize("mixer,backbone,chunks", [
    ("ttt_linear", "mamba", (1,) * 24), ("ttt_mlp", "base", (1,) * 24),
    ("ttt_linear", "base", (8, 8, 8)), ("ttt_mlp", "mamba", (5, 5, 5, 5, 4))])
def test_mixer_streaming_equals_one_shot(mixer, backbone, chunks):
  m = randomize(make_mixer(mixer=mixer, backbone=backbone))
  params, f = functional(m)
  y, _ = f(params, X, POS, None)
  state, ys, t = m.init_state(2), [], 0
  for c in chunks:
    yc, state = f(params, X[:, t:t + c], POS[t:t + c], state)
    ys.append(yc)
    t += c
  assert t == X.shape[1]
  assert rel_err(jnp.concatenate(ys, axis=1), y) <= 1e-5
  assert int(state.count) == 0


def test_one_shot_length_must_be_multiple_of_b():
  m = make_mixer(b=8)
  with pytest.raises(ValueError, match="multiple of model.ttt.mini_batch_size=8"):
    m(X[:, :20], POS[:20], None)


def test_config_rejects_seq_len_not_multiple_of_b():
  c = build_config("model=ttt_linear,ctx=100")
  with pytest.raises(ConfigError, match="data.seq_len=100"):
    validate(c)


# -- inner-LR warm-up --------------------------------------------------------------------------


def test_preset_inner_lr_warmup_and_validation():
  mlp, lin = build_config("model=ttt_mlp"), build_config("model=ttt_linear")
  assert mlp.model.ttt.lr_warmup_steps == mlp.train.warmup_steps > 0
  assert lin.model.ttt.lr_warmup_steps == 0
  mlp.model.ttt.lr_warmup_steps = -1
  with pytest.raises(ConfigError, match="model.ttt.lr_warmup_steps=-1"):
    validate(mlp)


@pytest.mark.parametrize("mixer,backbone", [("ttt_linear", "mamba"), ("ttt_mlp", "base")])
def test_mixer_inner_lr_warmup_equals_scaled_base_lr(mixer, backbone):
  """At step s the layer equals the same layer with base_lr * min(1, (s+1)/W) and no warm-up;
  without a step it is the layer at full base_lr (evaluation / generation)."""
  warmup = 8

  def build(base_lr, lr_warmup_steps):
    cfg = dataclasses.replace(mixer_cfg(mixer=mixer, backbone=backbone), base_lr=base_lr,
                              lr_warmup_steps=lr_warmup_steps)
    m = randomize(TTTMixer(cfg, compute_dtype=jnp.float32, param_dtype=jnp.float32,
                           rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(m)
    run = jax.jit(lambda p, x, pos, st, step: nnx.merge(graphdef, p)(x, pos, st, step))
    return m, params, run

  base = BASE_LR[mixer[4:]]
  m, params, run = build(base, warmup)
  outs = {}
  for s in (0, 3, 20):
    scale = min(1.0, (s + 1) / warmup)
    _, ref_params, ref_run = build(base * scale, 0)
    y, _ = run(params, X, POS, None, jnp.int32(s))
    ref, _ = ref_run(ref_params, X, POS, None, None)
    assert rel_err(y, ref) <= 1e-5, s
    outs[s] = y
    if s == 3:  # streaming with a step uses the same multiplier
      state, ys = m.init_state(2), []
      for t0, t1 in ((0, 10), (10, 24)):
        yc, state = run(params, X[:, t0:t1], POS[t0:t1], state, jnp.int32(s))
        ys.append(yc)
      assert rel_err(jnp.concatenate(ys, axis=1), ref) <= 1e-5
  full, _ = run(params, X, POS, None, None)
  assert rel_err(full, outs[20]) <= 1e-6  # past the warm-up = no step = full base_lr
  assert rel_err(outs[0], full) > 1e-3  # the warm-up changes the output (the test can fail)


def lm_config(scan_layers=False, remat="none", warmup=4):
  c = build_config("model=ttt_mlp,ctx=16")
  m = c.model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 2, 32, 2, 64
  m.ttt.mini_batch_size, m.ttt.lr_warmup_steps = 4, warmup
  m.scan_layers, m.remat = scan_layers, remat
  c.data.batch_size = 2
  return c


@pytest.mark.parametrize("scan_layers,remat", [(False, "none"), (True, "full")])
def test_lm_loss_passes_the_step_to_the_mixers(scan_layers, remat):
  """compute_loss(batch, step) of the LM == the loss of the LM with the scaled base_lr."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
  batch = {"tokens": tokens}

  def loss_of(cfg, step):
    graphdef, params = nnx.split(build_model(cfg.model, seed=0))
    params = nnx.split(randomize(nnx.merge(graphdef, params)))[1]
    return jax.jit(lambda p, s: nnx.merge(graphdef, p).compute_loss(batch, s))(params, step)

  cfg = lm_config(scan_layers, remat)
  loss, metrics = loss_of(cfg, jnp.int32(1))
  assert float(metrics["ttt_lr_mult"]) == 0.5
  ref_cfg = lm_config(scan_layers, remat, warmup=0)
  ref_cfg.model.ttt.base_lr *= 0.5
  ref, ref_metrics = loss_of(ref_cfg, jnp.int32(1))
  assert float(ref_metrics["ttt_lr_mult"]) == 1.0
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
  full, _ = loss_of(cfg, jnp.int32(10))
  assert abs(float(full) - float(loss)) > 1e-6


def test_train_step_metrics_expose_ttt_lr_mult(train_steps):
  cfg = lm_config(warmup=4)
  cfg.train.warmup_steps = 2
  history, _ = train_steps(cfg, 3)
  assert [h["ttt_lr_mult"] for h in history] == [0.25, 0.5, 0.75]
