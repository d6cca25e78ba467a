"""`model.e2e.remat_group`: the E2E inner loop checkpointed every g chunks (remat through time)
gives the meta loss, outputs and second-order gradients of the loop without groups, and keeps
fewer copies of the per-sequence inner weights for the backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ttt_jax.config import ConfigError, build_config, validate
from ttt_jax.layers.mlp import InnerParam
from ttt_jax.models import build_model
from ttt_jax.models.e2e import chunk_group
from ttt_jax.models.e2e_inner import inner_loop

from .test_e2e import fast_jit, rel_err, tiny_model_cfg

pytestmark = pytest.mark.extended  # `model.e2e.remat_group` is opt-in

CHUNK = 8


def meta_step(group: int, residuals: str, window: int, seqs, policy: str = "full",
              suffix: int = 2):
  """(loss, per-chunk losses, gradients, compiled temp bytes) of a tiny E2E meta step with
  `suffix` looped suffix blocks (KV windows carried) and wide prime MLPs (their weights
  dominate); `suffix=1`: one suffix block whose attention runs before the loop, no windows."""
  cfg = tiny_model_cfg(layers=3, suffix=suffix)
  cfg.window, cfg.e2e.mini_batch_size = window, CHUNK
  cfg.e2e.prime_intermediate_size = 256
  cfg.e2e.hoist_first_attention = suffix == 1
  cfg.e2e.remat_group, cfg.e2e.window_residuals = group, residuals
  cfg.e2e.remat_chunks_policy = policy
  graphdef, params = nnx.split(build_model(cfg, 0))

  def fn(p):
    loss, metrics = nnx.merge(graphdef, p).compute_loss({"tokens": seqs}, jnp.int32(0))
    return loss, (metrics["loss_first_chunk"], metrics["loss_last_chunk"])

  compiled = fast_jit(jax.value_and_grad(fn, has_aux=True)).lower(params).compile()
  (loss, chunks), grads = compiled(params)
  return loss, chunks, grads, compiled.memory_analysis().temp_size_in_bytes


def inner_bytes(seqs) -> int:
  """Bytes of one copy of every sequence's inner weights (meta_step's model)."""
  cfg = tiny_model_cfg(layers=3, suffix=2)
  cfg.e2e.prime_intermediate_size = 256
  state = nnx.state(build_model(cfg, 0), InnerParam)
  return seqs.shape[0] * sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize("residuals,window,group,n,suffix", [
    ("chunks", 12, 4, 16, 2),  # window < a group's keys: every group evicts
    ("chunks", 40, 2, 8, 2),  # window > a group's keys (and than a chunk's)
    ("windows", 12, 4, 16, 2),
    ("chunks", 12, 2, 8, 1),  # no KV window in the loop: checkpointed scans of scans
])
def test_groups_change_the_memory_not_the_numbers(residuals, window, group, n, suffix):
  """Groups of g chunks against no groups, for KV windows rebuilt from each chunk's keys
  (`window_scan` at both levels), kept per chunk, and none carried: the same meta loss, first
  and last chunk losses and second-order gradients, and less memory for the backward pass (16
  chunks in groups of 4: 8 copies of the inner weights instead of 15)."""
  seqs = jax.random.randint(jax.random.key(n + window), (2, n * CHUNK + 1), 0, 259)
  loss, chunks, grads, temp = meta_step(group, residuals, window, seqs, suffix=suffix)
  loss_ref, chunks_ref, grads_ref, temp_ref = meta_step(0, residuals, window, seqs,
                                                        suffix=suffix)
  assert rel_err(loss, loss_ref) < 1e-6
  assert rel_err(jnp.stack(chunks), jnp.stack(chunks_ref)) < 1e-6
  for path, a in jax.tree_util.tree_leaves_with_path(grads):
    b = dict(jax.tree_util.tree_leaves_with_path(grads_ref))[path]
    assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)
  if n == 16:  # 7 copies fewer (XLA's buffer assignment on CPU: 7.2 of them here)
    assert temp_ref - temp > 0.9 * 7 * inner_bytes(seqs), (temp, temp_ref)


def test_groups_with_the_dots_policy_give_the_same_numbers():
  """Chunk steps that keep their matmul outputs (`remat_chunks_policy='dots'`) inside the
  checkpointed groups: the same loss and gradients."""
  seqs = jax.random.randint(jax.random.key(5), (2, 8 * CHUNK + 1), 0, 259)
  loss, _, grads, _ = meta_step(2, "windows", 12, seqs, policy="dots")
  loss_ref, _, grads_ref, _ = meta_step(0, "windows", 12, seqs, policy="dots")
  assert rel_err(loss, loss_ref) < 1e-6
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
    assert rel_err(a, b) < 1e-5


def test_grouped_loop_returns_the_weights_after_every_update():
  """With groups the loop is uniform: it returns the weights after all n updates, those of the
  loop without groups under `final_update=True`, and the same losses and outputs."""
  cfg = tiny_model_cfg(layers=2, suffix=1)
  cfg.e2e.mini_batch_size, cfg.e2e.hoist_first_attention = CHUNK, False
  model = build_model(cfg, 0)
  runner, inner, outer = model.split_inner()
  kv0 = [model.suffix_blocks()[0].mixer.init_state(2)]
  h = jax.random.normal(jax.random.key(3), (2, 4 * CHUNK, cfg.d_model))
  tgt = jax.random.randint(jax.random.key(4), (2, 4 * CHUNK), 0, 259)

  def run(group, final):
    return fast_jit(lambda inner, outer, h: inner_loop(
        runner, inner, outer, kv0, h, tgt, jnp.ones(tgt.shape), 0.5, chunk=CHUNK, clip=1.0,
        remat_chunks=True, final_update=final, group=group))(inner, outer, h)

  grouped, ref = run(2, False), run(1, True)
  for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(ref), strict=True):
    assert rel_err(a, b) < 1e-6
  with pytest.raises(ValueError, match="group=3 must divide the 4 chunks"):
    run(3, False)


@pytest.mark.parametrize("setting,n,want", [
    (0, 128, 1), (1, 128, 1), (4, 128, 4), (6, 128, 4), (200, 128, 128), (4, 7, 1),
    (-1, 128, 8), (-1, 32, 4), (-1, 16, 4), (-1, 8, 2), (-1, 4, 1), (-1, 127, 1), (-1, 1, 1)])
def test_chunk_group_resolution(setting, n, want):
  """n: the largest divisor of the chunk count up to n; -1: the divisor with the fewest kept
  copies (n/g + g), only where that beats the n - 1 copies without groups; 0: off."""
  assert chunk_group(setting, n) == want


def test_the_setting_reaches_the_loop(monkeypatch):
  """meta_forward passes the resolved group of `model.e2e.remat_group` to the inner loop."""
  from ttt_jax.models import e2e  # noqa: PLC0415

  seen = []
  real = e2e.inner_loop

  def spy(*args, **kw):
    seen.append(kw["group"])
    return real(*args, **kw)

  monkeypatch.setattr(e2e, "inner_loop", spy)
  seqs = jax.random.randint(jax.random.key(2), (2, 16 * CHUNK + 1), 0, 259)
  for setting in (0, 2, -1):
    cfg = tiny_model_cfg(layers=2, suffix=1)
    cfg.e2e.mini_batch_size, cfg.e2e.remat_group = CHUNK, setting
    jax.eval_shape(lambda c=cfg: build_model(c, 0).compute_loss({"tokens": seqs}, jnp.int32(0)))
  assert seen == [1, 2, 4]


def test_config_rejects_a_negative_group_below_auto():
  c = build_config("model=e2e,scale=tiny")
  c.model.e2e.remat_group = -2
  with pytest.raises(ConfigError, match="model.e2e.remat_group=-2 must be >= -1"):
    validate(c)
