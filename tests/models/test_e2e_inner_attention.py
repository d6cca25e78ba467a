"""model.e2e.inner_attention_impl: it sets the suffix blocks' attention inside the inner loop
(and nothing else), auto resolves per platform, and xla gives the same meta loss and second-order
gradients as the package's own attention."""

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import attention as A
from ttt_jax.layers.common import building_for
from ttt_jax.models import build_model
from ttt_jax.models.config import E2ESection, ModelConfig
from ttt_jax.models.e2e import inner_attention_block

from .test_e2e import tiny_model_cfg


def inner_impls(model):
  runner, inner, outer = model.split_inner()
  merged = runner.model(inner, outer)
  return ([b.mixer.algorithm.impl for b in merged.blocks],
          [b.mixer.algorithm.impl for b in model.blocks])


@pytest.mark.parametrize("platform,setting,want", [
    ("cpu", "auto", "blockwise"), ("gpu", "auto", "xla"), ("tpu", "auto", "xla"),
    ("cpu", "xla", "xla"), ("gpu", "blockwise", "blockwise"),
])
def test_the_knob_sets_only_the_inner_loops_suffix_attention(platform, setting, want):
  m = tiny_model_cfg(layers=3, suffix=2)
  m.e2e.inner_attention_impl = setting
  with building_for(platform):
    model = build_model(m, 0)
  in_loop, plain = inner_impls(model)
  assert in_loop == [plain[0], want, want]  # the prefix block keeps model.attention_impl
  assert plain == [plain[0]] * 3  # the plain forward (pretrain mode) is untouched


def test_xla_inner_attention_gives_the_same_meta_loss_and_gradients():
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(0, 256, (2, 49)).astype(np.int32)}
  out = {}
  for setting in ("blockwise", "xla"):
    m = tiny_model_cfg(layers=3, suffix=2)
    m.e2e.inner_attention_impl = setting
    graphdef, params = nnx.split(build_model(m, 0))

    def loss(p, graphdef=graphdef):
      return nnx.merge(graphdef, p).compute_loss(batch, None)[0]

    out[setting] = jax.jit(jax.value_and_grad(loss))(params)
  (v0, g0), (v1, g1) = out["blockwise"], out["xla"]
  assert float(v1) == pytest.approx(float(v0), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def meta_loss_and_grads(batch, **e2e):
  m = tiny_model_cfg(layers=3, suffix=2)
  for key, value in e2e.items():
    setattr(m.e2e, key, value)
  model = build_model(m, 0)
  graphdef, params = nnx.split(model)

  def loss(p):
    return nnx.merge(graphdef, p).compute_loss(batch, None)[0]

  return model, jax.jit(jax.value_and_grad(loss))(params)


def test_inner_attention_blocks_change_the_program_not_the_numbers(monkeypatch):
  """`model.e2e.inner_attention_block`: the inner loop's attention in rematerialised query
  blocks gives the meta loss and second-order gradients of one dense call per chunk (xla, the
  GPU's impl; tests/layers/test_attention_remat.py has both impls)."""
  impl = "xla"
  calls = []
  real = A.remat_blocked_attention
  monkeypatch.setattr(A, "remat_blocked_attention",
                      lambda *a, **kw: calls.append(kw["q_block"]) or real(*a, **kw))
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(0, 256, (2, 49)).astype(np.int32)}
  off, (v0, g0) = meta_loss_and_grads(batch, inner_attention_impl=impl, inner_attention_block=0)
  assert not calls
  on, (v1, g1) = meta_loss_and_grads(batch, inner_attention_impl=impl, inner_attention_block=4)
  assert off.inner_attention.remat_block == 0 and on.inner_attention.remat_block == 4
  assert calls and set(calls) == {4}  # traced: the suffix blocks after the hoisted first one
  assert float(v1) == pytest.approx(float(v0), rel=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("rows,chunk,window,want", [
    (-1, 1024, 8192, 256), (-1, 1024, 4096, 256), (-1, 1024, 2048, 0), (-1, 512, 1024, 0),
    (-1, 1000, 8192, 250), (-1, 1009, 8192, 0), (-1, 64, 1 << 16, 64), (0, 1024, 8192, 0),
    (32, 64, 256, 32)])
def test_auto_turns_blocks_on_past_the_score_threshold(rows, chunk, window, want):
  cfg = ModelConfig(kind="e2e", mixer="swa", window=window,
                    e2e=E2ESection(mini_batch_size=chunk, inner_attention_block=rows))
  assert inner_attention_block(cfg) == want
