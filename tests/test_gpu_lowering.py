"""Every program a GPU run compiles by default, lowered for CUDA on this (CPU) machine: the train
step of each model kind (E2E meta and pretrain; the Pallas TTT kernels), the streaming chunk
step and the decode step (full attention: the Triton cache-attention kernel), and the programs
of evaluation, TLM and generation. A kernel that
cannot be batched, differentiated twice or lowered by Triton fails here, not first on a GPU
(ttt_jax/benchmarks/lowering.py)."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ttt_jax.benchmarks import lowering
from ttt_jax.benchmarks.common import model_config
from ttt_jax.models import config as model_cfg
from ttt_jax.models import e2e

from .tiers import core_and_extended

TRITON = "__gpu$xla.gpu.triton"


def lowered(kind: str, overrides: dict | None = None) -> jax.export.Exported:
  """`lowering.lower_train_step(kind, overrides)`, lowered once for the tests that read it."""
  return _lowered(kind, tuple(sorted((overrides or {}).items())))


@functools.cache
def _lowered(kind: str, overrides: tuple) -> jax.export.Exported:
  return lowering.lower_train_step(kind, dict(overrides))


def has_cudnn_attention(kernels: set[str]) -> bool:
  return any(k.startswith("__cudnn$fmha") for k in kernels)


@pytest.mark.parametrize("name,kind,overrides", lowering.TRAIN_CASES,
                         ids=[c[0] for c in lowering.TRAIN_CASES])
def test_train_step_lowers_for_cuda(name, kind, overrides):
  exported = lowered(kind, overrides)
  kernels = lowering.kernels_in(exported)
  attention = name in ("transformer", "swa") or name.startswith("e2e")
  assert has_cudnn_attention(kernels) == attention, kernels  # GPU default: cuDNN flash
  # Triton: TTT-Linear's GPU default (model.ttt.impl=auto) and the opt-in TTT-MLP kernels
  pallas = ("ttt_linear", "ttt_mlp-pallas", "ttt_linear-scan", "ttt_mlp-pallas-scan")
  assert (TRITON in kernels) == (name in pallas), kernels
  kernel = {"ttt_linear": "linear", "ttt_mlp-pallas": "mlp"}.get(name)
  if kernel:  # full remat (SIZE) runs the forward kernel again in the backward
    text, layers = exported.mlir_module(), lowering.SIZE.num_layers
    assert text.count(f'name = "_{kernel}_fwd_kernel"') == 2 * layers  # (remat=kernels: once,
    assert text.count(f'name = "_{kernel}_bwd_kernel"') == layers  # tests/models/test_remat_...)


@pytest.mark.parametrize("kind", lowering.STREAM_KINDS)
def test_stream_and_decode_steps_lower_for_cuda(kind):
  steps = lowering.lower_stream_steps(kind)
  assert set(steps) == {"prefill", "decode"}
  for exported in steps.values():
    assert exported.platforms == ("cuda",)
    kernels = lowering.kernels_in(exported)
    # window caches: cuDNN with the position mask; a full-attention cache: the Triton kernel
    # reading only its filled blocks (model.cache_attention_impl=auto); TTT-Linear: its
    # sequence kernels, the update of a partial mini-batch left out
    assert has_cudnn_attention(kernels) == (kind in ("swa", "e2e")), kernels
    assert (TRITON in kernels) == (kind in ("transformer", "ttt_linear")), kernels


@pytest.mark.parametrize("kind", core_and_extended(
    ("transformer", "e2e-meta", "ttt_linear", "swa", "ttt_mlp"),
    core=("transformer", "e2e-meta")))  # TTT-Linear's kernels: as in its train step
def test_eval_tlm_and_generation_programs_lower_for_cuda(kind):
  """The programs a GPU runs besides training and streaming: the evaluation step, the one-shot
  per-position NLL, one TLM update of the LoRA adapters (a gradient through the model, and for
  E2E through its inner loop: differentiated twice) and the generation loop."""
  programs = lowering.lower_eval_programs(kind)
  assert set(programs) == {"eval", "one_shot", "tlm", "generate"}
  attention = kind in ("transformer", "swa", "e2e-meta")
  for name, exported in programs.items():
    assert exported.platforms == ("cuda",), name
    kernels = lowering.kernels_in(exported)
    if name == "generate":  # Triton: full attention's cache kernel, TTT-Linear's kernels
      assert has_cudnn_attention(kernels) == (kind in ("swa", "e2e-meta")), kernels
      assert (TRITON in kernels) == (kind in ("transformer", "ttt_linear")), kernels
      continue
    assert has_cudnn_attention(kernels) == attention, (name, kernels)
    assert (TRITON in kernels) == (kind == "ttt_linear"), (name, kernels)  # the Pallas kernels
    # TLM's adapters sit in the attention projections: their gradient runs cuDNN's backward
    assert ("__cudnn$fmhaSoftmaxBackward" in kernels) == (attention and name == "tlm"), kernels


def test_cudnn_in_the_e2e_tlm_inner_loop_is_caught(monkeypatch):
  """TLM on an E2E model differentiates the inner loop (cuDNN there would not lower: no
  batching rule under the per-sequence vmap, no second derivative)."""
  monkeypatch.setattr(e2e, "resolve_inner_impl", lambda impl: "cudnn")
  with lowering.for_gpu():
    fn, args = lowering.eval_programs("e2e-meta")["tlm"]
    with pytest.raises(Exception, match="reshape|Differentiation rule|not implemented"):
      lowering.export_cuda(fn, *args)


def test_dual_stream_alias_streams_without_the_kernels():
  """gpu-check's `stream:ttt_linear/ttt_linear-dual` compares TTT-Linear streaming through its
  kernels (the GPU default) with the dual form: the alias's steps hold no Triton call."""
  steps = lowering.lower_stream_steps("ttt_linear-dual")
  assert set(steps) == {"prefill", "decode"}
  for exported in steps.values():
    assert TRITON not in lowering.kernels_in(exported)


def test_cudnn_in_the_e2e_inner_loop_is_caught(monkeypatch):
  """The class of bug this file exists for: cuDNN attention inside the per-sequence vmap and the
  second-order meta gradient does not lower (it did not run on a GPU either)."""
  monkeypatch.setattr(e2e, "resolve_inner_impl", lambda impl: "cudnn")
  with pytest.raises(Exception, match="reshape|Differentiation rule|not implemented"):
    lowering.lower_train_step("e2e-meta")


def test_gpu_target_names_an_h200_where_no_gpu_is_attached():
  """A Triton kernel lowers for CUDA inside `gpu_target`, also inside a mesh of CPU devices.
  The Triton lowering of JAX 0.11 and later asks for the target's compute capability and,
  without a GPU, refuses outside it; JAX 0.10's asks nothing."""
  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0

  kernel = jax.jit(lambda x: pl.pallas_call(
      double, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(x))
  x = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  lower = lambda: kernel.trace(x).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
  asks = lowering.triton_gpu_info() is not None  # JAX 0.10's lowering asks nothing
  for context in (contextlib.nullcontext, lambda: jax.set_mesh(jax.make_mesh((1,), ("data",)))):
    with context():
      if asks and jax.default_backend() != "gpu":
        with pytest.raises(RuntimeError, match="No supported GPU"):
          lower()
      with lowering.gpu_target():
        assert TRITON in lower()


def test_e2e_meta_step_with_inner_attention_blocks_lowers_for_cuda():
  """`model.e2e.inner_attention_block` (auto: on at the 125m+ presets): the rematerialised query
  blocks (a custom_vjp under the per-sequence vmap, differentiated twice) lower for CUDA, as a
  loop over the blocks that the step without them does not have."""
  # the default at SIZE (below auto's threshold): one attention call per chunk
  run_cfg = model_config("e2e-meta", lowering.SIZE)
  assert e2e.inner_attention_block(model_cfg.model_config(run_cfg.model)) == 0
  plain = lowered("e2e-meta")
  blocks = lowered("e2e-meta", {"e2e.inner_attention_block": 16})
  assert blocks.platforms == ("cuda",)
  assert has_cudnn_attention(lowering.kernels_in(blocks))  # the prefix keeps cuDNN
  loops = lambda exported: exported.mlir_module().count("stablehlo.while")  # noqa: E731
  assert loops(blocks) > loops(plain)


def test_e2e_meta_step_in_checkpointed_groups_lowers_for_cuda():
  """`model.e2e.remat_group` (remat through time for E2E): the loop over checkpointed groups of
  chunk steps (window_scan in window_scan, differentiated twice) lowers for CUDA, with loops
  over the chunks inside the loops over the groups."""
  plain = lowered("e2e-meta")
  grouped = lowered("e2e-meta", {"e2e.remat_group": 2})
  assert grouped.platforms == ("cuda",)
  assert has_cudnn_attention(lowering.kernels_in(grouped))  # the prefix keeps cuDNN
  loops = lambda exported: exported.mlir_module().count("stablehlo.while")  # noqa: E731
  assert loops(grouped) > loops(plain)
