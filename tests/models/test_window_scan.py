"""`window_scan` (models/window_scan.py) against the rematerialised `lax.scan` it replaces, and
`model.e2e.window_residuals` / the fillable KV window in the E2E inner loop: the same values and
derivatives, less memory."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers.attention import KVCache
from ttt_jax.models import build_model, e2e
from ttt_jax.models.config import model_config
from ttt_jax.models.e2e import fillable_window, window_residuals
from ttt_jax.models.e2e_inner import inner_loop
from ttt_jax.models.window_scan import window_scan
from ttt_jax.sharding import activation_sharding, current_sharding

from .test_e2e import fast_jit, rel_err, tiny_model_cfg

B, D = 2, 8


def toy_step(consts, w, windows, x):
  """A chunk step shaped like the E2E one: attention of the chunk over each window ++ its own
  keys (empty slots masked), an inner gradient step on W, the windows shifted by the chunk."""
  wk, lr = consts
  h, pos = x

  def loss(w):
    out, new = 0.0, []
    for win in windows:
      k = jnp.concatenate([win.k, jnp.tanh(h @ wk)], 1)
      v = jnp.concatenate([win.v, jnp.tanh(h @ w)], 1)
      kpos = jnp.concatenate([win.pos, pos])
      s = jnp.einsum("bqd,bkd->bqk", h, k)
      s = jnp.where((kpos >= 0) & (kpos <= pos[:, None]), s, -1e9)
      out = out + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, -1), v)
      cap = win.pos.shape[0]
      new.append(KVCache(k[:, -cap:], v[:, -cap:], kpos[-cap:]))
    return jnp.sum(out ** 2), (out, new)

  (_, (out, new)), g = jax.value_and_grad(loss, has_aux=True)(w)
  return w - lr * g, new, jnp.sum(out, -1)


def remat_scan(step, consts, carry, windows, xs):
  def body(c, x):
    carry, wins, y = step(consts, *c, x)
    return (carry, wins), y
  (carry, windows), ys = jax.lax.scan(jax.checkpoint(body), (carry, windows), xs)
  return carry, windows, ys


def toy_inputs(key, n, chunk, caps):
  ks = jax.random.split(key, 4 + 2 * len(caps))
  consts = (jax.random.normal(ks[0], (D, D)) / D ** 0.5, jnp.float32(0.05))
  w = jax.random.normal(ks[1], (B, D, D)) / D ** 0.5
  windows = []
  for i, cap in enumerate(caps):  # half-filled windows: real keys behind empty slots
    slot = jnp.arange(cap)
    pos = jnp.where(slot >= cap // 2, slot - cap // 2, -1).astype(jnp.int32)
    windows.append(KVCache(jax.random.normal(ks[4 + 2 * i], (B, cap, D)),
                           jax.random.normal(ks[5 + 2 * i], (B, cap, D)), pos))
  h = jax.random.normal(ks[2], (n, B, chunk, D))
  pos = max(caps) // 2 + jnp.arange(n * chunk, dtype=jnp.int32).reshape(n, chunk)
  return consts, w, windows, (h, pos)


@pytest.mark.parametrize("chunk,caps", [(4, (12,)), (4, (4, 6)), (6, (3,))])
def test_window_scan_equals_the_rematerialised_scan(chunk, caps):
  """Values and gradients (in the constants, the carry, the first windows and the inputs; the
  step takes an inner gradient, so these are second order) of windows larger than, equal to
  and smaller than a chunk."""
  consts, w, windows, xs = toy_inputs(jax.random.key(chunk + len(caps)), 5, chunk, caps)
  probe = jax.random.normal(jax.random.key(7), (5, B, chunk))

  def objective(scan, consts, w, ks, vs, h):
    wins = [KVCache(k, v, win.pos) for k, v, win in zip(ks, vs, windows, strict=True)]
    w, wins, ys = scan(toy_step, consts, w, wins, (h, xs[1]))
    tail = sum(jnp.sum(jnp.sin(win.k) * win.v) for win in wins)
    return jnp.sum(ys * probe) + jnp.sum(w ** 2) + tail, (w, wins, ys)

  args = (consts, w, [x.k for x in windows], [x.v for x in windows], xs[0])
  ours = functools.partial(window_scan, chunk=chunk)
  results = [jax.jit(jax.value_and_grad(functools.partial(objective, scan), (0, 1, 2, 3, 4),
                                        has_aux=True))(*args) for scan in (ours, remat_scan)]
  (value, aux), grads = results[0]
  (value_ref, aux_ref), grads_ref = results[1]
  assert rel_err(value, value_ref) < 1e-6
  for a, b in zip(jax.tree.leaves((aux, grads)), jax.tree.leaves((aux_ref, grads_ref)),
                  strict=True):
    assert rel_err(a, b) < 1e-5
  assert float(jnp.linalg.norm(grads[2][0])) > 0  # the first window's keys are used


def test_window_scan_keeps_only_each_chunks_new_slots():
  """What the backward pass keeps, read from XLA's buffer assignment: with windows of 64 slots
  and chunks of 4, the rematerialised scan keeps 16 windows, window_scan 16 chunks."""
  n, chunk, caps = 16, 4, (64, 64)
  consts, w, windows, xs = toy_inputs(jax.random.key(0), n, chunk, caps)

  def temp_bytes(scan):
    def loss(consts, w, h):
      return jnp.sum(scan(toy_step, consts, w, windows, (h, xs[1]))[2])
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(consts, w, xs[0]).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  kept_windows = n * 2 * len(caps) * B * 64 * D * 4  # k and v of every trip's windows, bytes
  ours, ref = temp_bytes(functools.partial(window_scan, chunk=chunk)), temp_bytes(remat_scan)
  assert ref - ours > 0.6 * kept_windows, (ours, ref, kept_windows)


# -- the E2E inner loop -----------------------------------------------------------------------
T = 48


def e2e_loss_and_grads(window: int, residuals: str, seqs):
  """(loss, gradients, whether the loss ran window_scan) of a tiny E2E model's meta step."""
  cfg = tiny_model_cfg(layers=3, suffix=2)
  cfg.window, cfg.e2e.window_residuals = window, residuals
  graphdef, params = nnx.split(build_model(cfg, 0))
  fn = lambda p: nnx.merge(graphdef, p).compute_loss({"tokens": seqs}, jnp.int32(0))[0]  # noqa: E731
  custom = "custom_vjp_call" in str(jax.make_jaxpr(fn)(params))
  return (*fast_jit(jax.value_and_grad(fn))(params), custom)


@pytest.mark.parametrize("window", [16, pytest.param(T, marks=pytest.mark.extended)])
def test_window_residuals_change_the_memory_not_the_numbers(window):
  """model.e2e.window_residuals 'chunks' against 'windows', with windows smaller than the
  sequence (keys evicted) and as long as it (the fresh window cut to T - b slots): the same meta
  loss and second-order gradients."""
  seqs = jax.random.randint(jax.random.key(window), (2, T + 1), 0, 259)
  loss, grads, custom = e2e_loss_and_grads(window, "chunks", seqs)
  loss_ref, grads_ref, custom_ref = e2e_loss_and_grads(window, "windows", seqs)
  assert custom and not custom_ref  # the flag picks window_scan or the scan's own AD
  assert rel_err(loss, loss_ref) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
    assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("residuals",
                         [pytest.param("windows", marks=pytest.mark.extended), "chunks"])
def test_fillable_window_changes_the_work_not_the_numbers(residuals):
  """The inner loop from a window cut to the T - b slots the sequence can fill gives the losses
  and gradients of the full window (8K presets: 8K of 9K keys scored per chunk), with fewer
  FLOPs."""
  cfg = tiny_model_cfg(layers=2, suffix=1)
  cfg.window = T
  model = build_model(cfg, 0)
  runner, inner, outer = model.split_inner(mixed_first=False)
  blk = model.suffix_blocks()[0]
  h = jax.random.normal(jax.random.key(3), (2, T, cfg.d_model))
  tgt = jax.random.randint(jax.random.key(4), (2, T), 0, 259)
  chunk = cfg.e2e.mini_batch_size

  def run(trim):
    kv0 = blk.mixer.init_state(2)
    kv0 = [fillable_window(kv0, T - chunk) if trim else kv0]
    assert kv0[0].pos.shape[0] == (T - chunk if trim else T)

    def loss(inner, outer, h):
      losses, *_ = inner_loop(runner, inner, outer, kv0, h, tgt, jnp.ones(tgt.shape), 0.5,
                              chunk=chunk, clip=1.0, remat_chunks=True,
                              window_residuals=residuals)
      return jnp.mean(losses), losses
    compiled = fast_jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True)).lower(
        inner, outer, h).compile()
    cost = compiled.cost_analysis()
    return compiled(inner, outer, h), (cost[0] if isinstance(cost, list) else cost)["flops"]

  (out, flops), (out_ref, flops_ref) = run(True), run(False)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref), strict=True):
    assert rel_err(a, b) < 1e-5
  assert flops < 0.99 * flops_ref  # (2% here, where the widths are 32 and the keys 64 or 48)


def test_meta_forward_starts_from_fillable_windows(monkeypatch):
  """meta_forward cuts its first windows with fillable_window to T - b slots."""
  calls = []

  def spy(window, keys):
    calls.append((window.pos.shape[0], keys))
    return fillable_window(window, keys)

  monkeypatch.setattr(e2e, "fillable_window", spy)
  cfg = tiny_model_cfg(layers=3, suffix=2)
  cfg.window = T
  seqs = jax.random.randint(jax.random.key(2), (2, T + 1), 0, 259)
  jax.eval_shape(lambda: build_model(cfg, 0).compute_loss({"tokens": seqs}, jnp.int32(0)))
  assert calls == [(T, T - cfg.e2e.mini_batch_size)]  # the one looped suffix block's window


@pytest.mark.parametrize("remat,policy,setting,want", [
    (True, "full", "auto", "chunks"), (True, "dots", "auto", "windows"),
    (False, "full", "auto", "windows"), (True, "dots", "windows", "windows"),
    (True, "full", "windows", "windows")])
def test_window_residuals_resolve(remat, policy, setting, want):
  cfg = model_config(build_config("model=e2e,scale=tiny,ctx=512").model)
  e2e = dataclasses.replace(cfg.e2e, remat_chunks=remat, remat_chunks_policy=policy,
                            window_residuals=setting)
  assert window_residuals(dataclasses.replace(cfg, e2e=e2e)) == want


@pytest.mark.parametrize("remat,policy", [(True, "dots"), (False, "full")])
def test_chunks_needs_whole_chunk_recomputation(remat, policy):
  c = build_config("model=e2e,scale=tiny,ctx=512")
  c.model.e2e.remat_chunks, c.model.e2e.remat_chunks_policy = remat, policy
  c.model.e2e.window_residuals = "chunks"
  with pytest.raises(ConfigError, match="model.e2e.window_residuals='chunks'"):
    validate(c)
  c.model.e2e.window_residuals = "sometimes"
  with pytest.raises(ConfigError, match="model.e2e.window_residuals='sometimes' not allowed"):
    validate(c)



@pytest.mark.parametrize("nested", [False, True])
def test_backward_pass_traces_in_the_callers_sharding_context(nested):
  """The backward pass is traced when the gradient is taken, after the loss function's
  `activation_sharding` context has closed; window_scan re-enters the context that was active
  at its call, so the recomputed step's constraints apply on a mesh as the forward's did. Also
  for a window_scan over groups of window_scans (`model.e2e.remat_group`), whose inner scans
  are traced again inside the outer backward pass."""
  consts, w, windows, xs = toy_inputs(jax.random.key(5), 4, 4, (8,))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  seen = []

  def step(consts, w, windows, x):
    seen.append(current_sharding()[0])
    return toy_step(consts, w, windows, x)

  def run(consts, w):
    if not nested:
      return window_scan(step, consts, w, windows, xs, chunk=4)
    groups = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), xs)
    group = lambda c, w, wins, xg: window_scan(step, c, w, wins, xg, chunk=4)  # noqa: E731
    return window_scan(group, consts, w, windows, groups, chunk=8)

  def loss(consts, w):
    with activation_sharding(mesh):
      return jnp.sum(run(consts, w)[2])

  grads = jax.grad(loss, (0, 1))(consts, w)
  assert len(seen) >= (3 if nested else 2), seen  # forward and backward (inner: both) traces
  assert all(m is mesh for m in seen), seen
  ref = jax.grad(lambda c, w: jnp.sum(remat_scan(toy_step, c, w, windows, xs)[2]), (0, 1))(
      consts, w)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
    assert rel_err(a, b) < 1e-5
  assert current_sharding()[0] is None  # and the context is left as it was
