"""Every program a GPU run compiles by default, lowered for CUDA on this (CPU) machine: the train
step of each model kind (E2E meta and pretrain; the Pallas TTT kernels), the streaming chunk
step and the decode step (full attention: the Triton cache-attention kernel). A kernel that
cannot be batched, differentiated twice or lowered by Triton fails here, not first on a GPU
(ttt_jax/benchmarks/lowering.py)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from ttt_jax.benchmarks import lowering
from ttt_jax.models import e2e

TRITON = "__gpu$xla.gpu.triton"


def has_cudnn_attention(kernels: set[str]) -> bool:
  return any(k.startswith("__cudnn$fmha") for k in kernels)


@pytest.mark.parametrize("name,kind,overrides", lowering.TRAIN_CASES,
                         ids=[c[0] for c in lowering.TRAIN_CASES])
def test_train_step_lowers_for_cuda(name, kind, overrides):
  exported = lowering.lower_train_step(kind, overrides)
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
    # reading only its filled blocks (model.cache_attention_impl=auto)
    assert has_cudnn_attention(kernels) == (kind in ("swa", "e2e")), kernels
    assert (TRITON in kernels) == (kind == "transformer"), kernels


def test_cudnn_in_the_e2e_inner_loop_is_caught(monkeypatch):
  """The class of bug this file exists for: cuDNN attention inside the per-sequence vmap and the
  second-order meta gradient does not lower (it did not run on a GPU either)."""
  monkeypatch.setattr(e2e, "resolve_inner_impl", lambda impl: "cudnn")
  with pytest.raises(Exception, match="reshape|Differentiation rule|not implemented"):
    lowering.lower_train_step("e2e-meta")


def test_gpu_target_names_an_h200_where_no_gpu_is_attached():
  """JAX 0.11's Pallas Triton lowering asks the attached GPU, else the abstract mesh's device,
  for the target's compute capability, and refuses on a machine without one, also inside a mesh
  of CPU devices: `gpu_target` answers as an H200 would (9.0). JAX 0.10's lowering asks nothing,
  so there the kernels lower with or without it."""
  mesh = jax.make_mesh((1,), ("data",))
  try:
    from jax._src.pallas.triton import gpu_info  # noqa: PLC0415

    assert callable(gpu_info.get_gpu_info_from_version)
  except (ImportError, AttributeError):  # JAX 0.10
    def double(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2.0

    kernel = lambda x: pl.pallas_call(  # noqa: E731
        double, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1))(x)
    x = jnp.ones((16, 16), jnp.float32)
    for context in (contextlib.nullcontext(), lowering.gpu_target()):
      with context:
        assert TRITON in lowering.export_cuda(kernel, x).mlir_module()
    return
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError):
      gpu_info.get_gpu_info()
  for context in (contextlib.nullcontext(), jax.set_mesh(mesh)):
    with context, lowering.gpu_target():
      assert gpu_info.get_gpu_info().compute_capability == 90
