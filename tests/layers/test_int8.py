"""8-bit decode weights (layers/int8.py) and their CPU kernel (layers/csrc/int8_matmul.cc):
reconstruction within half a step, GGUF blocks exactly, 4-bit codes exactly where the weights
are 16 levels a group (and only there), the kernel against a float64 product on
both sides of its row threshold, for every group path and every vector path (AVX-512, AVX2,
scalar), the thread split, gradients, LoRA-wrapped layers left float, the
kernel's build cache and what happens when it cannot be built. Tests that need the kernel skip
where no C++ compiler is found."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.layers import cpu_kernel
from ttt_jax.layers import int8 as Q
from ttt_jax.layers.common import building_for
from ttt_jax.layers.lora import LoRALinear, apply_lora


def _has_compiler() -> bool:
  try:
    return bool(cpu_kernel.compiler())
  except cpu_kernel.KernelUnavailable:
    return False


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler for the kernel")


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def product_kernels(fn, *args) -> str:
  """The lowered program's text, traced afresh (jit's trace cache does not key on the kernel's
  availability or the target platform)."""
  return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@pytest.mark.parametrize("k", [64, 37])  # groups of 32; one group per row (37 is not a multiple)
def test_quantize_reconstructs_every_weight_within_half_a_step(k):
  w = np.random.default_rng(k).standard_normal((3, k, 10)).astype(np.float32)  # leading axis
  q, scale, offset = Q.quantize(w)
  g = Q.group_size(k)
  assert q.dtype == np.uint8 and q.shape == (3, 10, k) and scale.shape == (3, 10, k // g)
  back = np.asarray(Q.dequantize(q, scale, offset))
  err = np.abs(back - w).reshape(3, k // g, g, 10)  # [.., group, in-group, N]
  bound = np.swapaxes(scale, -1, -2)[:, :, None, :] / 2
  assert np.all(err <= bound * (1 + 1e-5) + 1e-7)


def test_gguf_blocks_are_represented_exactly():
  """Affine 16-level blocks (GGUF Q4_1: d·k + m) and symmetric 8-bit ones (Q8_0: d·k with
  |k| <= 127 and the block's largest |k| = 127) come back to float rounding."""
  rng = np.random.default_rng(0)
  n, blocks = 12, 4
  d = rng.uniform(0.001, 0.05, (n, blocks, 1)).astype(np.float32)
  m = rng.uniform(-0.5, 0.1, (n, blocks, 1)).astype(np.float32)
  k4 = rng.integers(0, 16, (n, blocks, 32))
  k4[..., 0], k4[..., 1] = 0, 15  # the quantizer maps each block's min and max to 0 and 15
  k8 = rng.integers(-127, 128, (n, blocks, 32))
  k8[..., 0] = rng.choice([-127, 127], (n, blocks))
  for rows in (d * k4 + m, d * k8):
    w = rows.reshape(n, blocks * 32).astype(np.float32).T  # [K, N]
    back = np.asarray(Q.dequantize(*Q.quantize(w)))
    assert np.abs(back - w).max() <= 4e-7 * np.abs(w).max(), np.abs(back - w).max()


@needs_compiler
@pytest.mark.parametrize("lead,k,n", [
    ((1,), 576, 1536),    # a decode row of SmolLM2's MLP: AVX-512 groups of 32
    ((3,), 64, 9),        # N not a multiple of 4: the one-row tail
    ((2,), 37, 13),       # K not a multiple of 32: one group per row, the portable path
    ((2, 3), 96, 20),     # 6 rows in two leading axes
    ((5, 26), 64, 8),     # 130 rows > KERNEL_MAX_ROWS: XLA widens the weights instead
    ((7,), 64, 8),        # 4 + 3 rows: a tile of four and single rows
])
def test_product_equals_a_float64_product(lead, k, n):
  rng = np.random.default_rng(k + n)
  x = rng.standard_normal((*lead, k)).astype(np.float32)
  w = rng.standard_normal((k, n)).astype(np.float32)
  q = Q.quantize(w)
  want = x.astype(np.float64) @ np.asarray(Q.dequantize(*q), np.float64)
  got = jax.jit(Q.int8_matmul)(x, *q)
  assert got.shape == (*lead, n) and got.dtype == jnp.float32
  assert rel_err(got, want) < 2e-6
  uses_kernel = int(np.prod(lead)) <= Q.KERNEL_MAX_ROWS
  assert (cpu_kernel.TARGET in product_kernels(Q.int8_matmul, x, *q)) == uses_kernel


@needs_compiler
def test_the_row_threshold_and_the_platform_choose_the_path():
  x = np.ones((Q.KERNEL_MAX_ROWS, 64), np.float32)
  q = Q.quantize(np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
  assert cpu_kernel.TARGET in product_kernels(Q.int8_matmul, x, *q)
  over = np.ones((Q.KERNEL_MAX_ROWS + 1, 64), np.float32)
  assert cpu_kernel.TARGET not in product_kernels(Q.int8_matmul, over, *q)
  with building_for("gpu"):  # other platforms: XLA's own product
    assert cpu_kernel.TARGET not in product_kernels(Q.int8_matmul, x, *q)


def test_gradient_in_x_is_the_float_products():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1, 64)).astype(np.float32)
  q = Q.quantize(rng.standard_normal((64, 24)).astype(np.float32))
  w = np.asarray(Q.dequantize(*q))
  got = jax.grad(lambda x: jnp.sum(jnp.sin(Q.int8_matmul(x, *q))))(x)
  want = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w)))(x)
  assert rel_err(got, want) < 1e-5


@needs_compiler
def test_one_thread_gives_the_same_bits_as_several(tmp_path):
  """The threads split the output columns; each column's arithmetic is unchanged."""
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 576)).astype(np.float32)
  q = Q.quantize(rng.standard_normal((576, 1000)).astype(np.float32))
  np.savez(tmp_path / "in.npz", x, *q)
  script = ("import sys, numpy as np, jax; from ttt_jax.layers import int8 as Q; "
            "a = np.load(sys.argv[1]); "
            "np.save(sys.argv[2], np.asarray(jax.jit(Q.int8_matmul)(*[a[f'arr_{i}'] for i in "
            "range(4)])))")
  outs = []
  for threads in ("1", "3"):
    env = {**os.environ, cpu_kernel.THREADS_ENV: threads, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / f"out{threads}.npy"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.npz"), str(out)], env=env,
                   check=True, capture_output=True)
    outs.append(np.load(out))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], jax.jit(Q.int8_matmul)(x, *q))  # this process's count


def test_bad_thread_count_names_the_variable(monkeypatch):
  for bad in ("0", "two", "-1"):
    monkeypatch.setenv(cpu_kernel.THREADS_ENV, bad)
    with pytest.raises(ValueError, match=f"TTT_JAX_CPU_THREADS={bad!r}"):
      cpu_kernel.threads()
  monkeypatch.setenv(cpu_kernel.THREADS_ENV, "5")
  assert cpu_kernel.threads() == 5
  monkeypatch.delenv(cpu_kernel.THREADS_ENV)
  assert 1 <= cpu_kernel.threads() <= cpu_kernel.MAX_DEFAULT_THREADS


@needs_compiler
def test_the_library_is_built_once_per_cache(monkeypatch, tmp_path):
  monkeypatch.setenv("TTT_JAX_CACHE", str(tmp_path))
  path = cpu_kernel.library_path()
  assert path.startswith(str(tmp_path / "kernels")) and os.path.exists(path)
  built = os.stat(path).st_mtime_ns
  calls = []
  monkeypatch.setattr(cpu_kernel.subprocess, "run", lambda *a, **kw: calls.append(a))
  assert cpu_kernel.library_path() == path and os.stat(path).st_mtime_ns == built
  assert calls == []  # found in the cache: no compiler run


def test_no_compiler_and_a_failed_compile_say_why(monkeypatch, tmp_path):
  monkeypatch.setenv("TTT_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
  with pytest.raises(cpu_kernel.KernelUnavailable, match="no C.. compiler found"):
    cpu_kernel.library_path()
  failing = tmp_path / "cxx"
  failing.write_text("#!/bin/sh\necho 'int8_matmul.cc:1: error: made up' >&2\nexit 1\n")
  failing.chmod(0o755)
  monkeypatch.setenv("CXX", str(failing))
  monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: name if name == str(failing)
                      else None)
  with pytest.raises(cpu_kernel.KernelUnavailable, match="failed: int8_matmul.cc:1: error: made"):
    cpu_kernel.library_path()
  assert not [p for p in os.listdir(tmp_path / "kernels") if p.endswith((".so", ".tmp"))]


def test_an_unwritable_cache_names_the_folder_and_the_variable(monkeypatch, tmp_path):
  blocker = tmp_path / "not_a_folder"
  blocker.write_text("")
  monkeypatch.setenv("TTT_JAX_CACHE", str(blocker))
  with pytest.raises(cpu_kernel.KernelUnavailable,
                     match=f"cannot write the kernel cache {blocker}/kernels.*TTT_JAX_CACHE"):
    cpu_kernel.library_path()


@needs_compiler
@pytest.mark.parametrize("flags,lanes", [((), None), (("-mno-avx512f",), 8),
                                         (("-mno-avx512f", "-mno-avx2"), 0)])
def test_every_vector_path_equals_a_float64_product(flags, lanes):
  """The AVX2 and scalar paths, built here by switching the wider ones off."""
  lib = ctypes.CDLL(cpu_kernel.library_path(flags))
  if lanes is not None and lib.TttInt8VectorLanes() != lanes:
    pytest.skip(f"this CPU builds {lib.TttInt8VectorLanes()} lanes with {flags}")
  # one target per build: on a CPU without AVX-512 two of the builds have the same lanes
  build = "_".join(f.lstrip("-").replace("-", "_") for f in flags) or "native"
  target = f"{cpu_kernel.TARGET}_test_{build}_{lib.TttInt8VectorLanes()}"
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(lib.TttInt8Matmul), platform="cpu")
  rng = np.random.default_rng(len(flags))
  cases = [(1, 576, 1536, 8), (3, 96, 10, 8), (2, 37, 13, 8), (1, 576, 64, 4), (3, 96, 10, 4)]
  for m, k, n, bits in cases:
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = Q.quantize(w) if bits == 8 else Q.quantize4(q4_levels(w))
    got = jax.jit(jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32)))(x, *q)
    want = x.astype(np.float64) @ np.asarray(Q.dequantize(*q), np.float64)
    assert got.shape == (m, n) and rel_err(got, want) < 2e-6, (flags, m, k, n, bits)


def test_lora_wrapped_projections_stay_float():
  from flax import nnx

  from ttt_jax.config import build_config
  from ttt_jax.models import build_model

  m = build_config("model=transformer,ctx=32").model
  m.num_layers, m.d_model, m.num_heads, m.intermediate_size = 1, 32, 2, 64
  model = build_model(m)
  apply_lora(model, ["wq"], rank=2, alpha=4.0)
  replaced = Q.quantize_model(model)
  assert not any(p.endswith("wq") for p in replaced) and any(p.endswith("wk") for p in replaced)
  assert isinstance(model.blocks[0].mixer.wq, LoRALinear)
  assert isinstance(model.blocks[0].mixer.wk, Q.Int8Linear)
  assert nnx.state(model.blocks[0].mixer.wq, nnx.Param)  # float base and factors


@needs_compiler
def test_without_the_kernel_xla_gives_the_same_product_after_one_warning(monkeypatch):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((1, 64)).astype(np.float32)
  q = Q.quantize(rng.standard_normal((64, 16)).astype(np.float32))
  with_kernel = np.asarray(jax.jit(Q.int8_matmul)(x, *q))

  def unavailable():
    raise cpu_kernel.KernelUnavailable("no C++ compiler found ($CXX, g++, c++ or clang++)")

  monkeypatch.setattr(cpu_kernel, "library_path", unavailable)
  cpu_kernel.int8_matmul_target.cache_clear()
  try:
    with pytest.warns(RuntimeWarning, match="int8 CPU kernel is unavailable.*no C.. compiler"):
      text = product_kernels(Q.int8_matmul, x, *q)
    assert cpu_kernel.TARGET not in text
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # once only
      got = jax.jit(lambda x: Q.int8_matmul(x, *q) + 0.0)(x)
    assert rel_err(got, with_kernel) < 2e-6
  finally:
    monkeypatch.undo()
    cpu_kernel.int8_matmul_target.cache_clear()


def test_xla_widens_inside_a_loop_not_before_it():
  """The widening is tied to the activations: the codes, not float32 copies of the weights, go
  into a while loop (XLA hoisted the loop-invariant widening out of generation's loops, where
  it ran at every call even when the loop body never did)."""
  q = Q.quantize(np.random.default_rng(8).standard_normal((64, 64)).astype(np.float32))
  x = np.ones((Q.KERNEL_MAX_ROWS + 1, 64), np.float32)  # XLA's path

  def loop(x, n, *q):
    body = lambda c: (c[0] + 1, jnp.tanh(Q.int8_matmul(c[1], *q)))  # noqa: E731
    return jax.lax.while_loop(lambda c: c[0] < n, body, (0, x))[1]

  text = jax.jit(loop).lower(x, 3, *q).compile().as_text()
  entry = text[text.index("ENTRY"):].split("\n}")[0].splitlines()
  loops = [line for line in entry if " while(" in line]
  assert loops and all("u8[" in line for line in loops), loops


def q4_levels(w: np.ndarray) -> np.ndarray:
  """w [..., K, N] snapped, per group of 32 input weights, to 16 evenly spaced levels from the
  group's minimum to its maximum: what a GGUF Q4_1 import holds."""
  g = np.swapaxes(w, -1, -2).reshape(*w.shape[:-2], w.shape[-1], -1, 32)
  lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
  d = np.where(hi > lo, (hi - lo) / 15, 1.0)
  snapped = np.rint((g - lo) / d) * d + lo
  return np.swapaxes(snapped.reshape(*w.shape[:-2], w.shape[-1], -1), -1, -2).astype(np.float32)


def test_4bit_only_where_every_group_is_16_levels():
  rng = np.random.default_rng(9)
  w = rng.standard_normal((2, 96, 10)).astype(np.float32)
  assert Q.quantize4(w) is None  # arbitrary floats: 8 bits
  assert Q.quantize4(q4_levels(w)[:, :80]) is None  # K = 80: no groups of 32
  almost = q4_levels(w)
  almost[0, 5, 3] += 1e-3 * np.abs(almost).max()  # one weight off its level
  assert Q.quantize4(almost) is None
  q, scale, offset = Q.quantize4(q4_levels(w))
  assert q.dtype == np.uint8 and q.shape == (2, 10, 3, 16) and scale.shape == (2, 10, 3)
  back = np.asarray(Q.dequantize(q, scale, offset))
  assert np.abs(back - q4_levels(w)).max() <= 4e-7 * np.abs(w).max()
  assert Q.Int8Weight(q4_levels(w)).q[...].ndim == 4 and Q.Int8Weight(w).q[...].ndim == 3


@needs_compiler
@pytest.mark.parametrize("rows", [1, 7, Q.KERNEL_MAX_ROWS + 2])
def test_4bit_product_equals_a_float64_product(rows):
  rng = np.random.default_rng(rows)
  x = rng.standard_normal((rows, 576)).astype(np.float32)
  q = Q.quantize4(q4_levels(rng.standard_normal((576, 42)).astype(np.float32)))  # N % 4 = 2
  want = x.astype(np.float64) @ np.asarray(Q.dequantize(*q), np.float64)
  assert rel_err(jax.jit(Q.int8_matmul)(x, *q), want) < 2e-6
  assert (cpu_kernel.TARGET in product_kernels(Q.int8_matmul, x, *q)) == (
      rows <= Q.KERNEL_MAX_ROWS)


def test_nan_or_infinite_weights_never_pass_as_4_bit():
  w = q4_levels(np.random.default_rng(10).standard_normal((64, 8)).astype(np.float32))
  for bad in (np.nan, np.inf):
    broken = w.copy()
    broken[3, 2] = bad
    assert Q.quantize4(broken) is None
