"""Lower, on any machine, the programs a GPU run compiles: every model kind's train step, its
streaming (prefill chunk) step and its decode step, and its evaluation, TLM and generation
programs (`eval_programs`), built with the GPU's default kernel choices
(cuDNN attention, Triton TTT kernels) and exported for `platforms=['cuda']`.

This catches on a CPU what only a GPU takes: a kernel without a batching rule under `jax.vmap`,
a missing second derivative, a Pallas body the Triton lowering rejects. Compilation of the
lowered kernels (PTX, shared memory, registers) happens on a GPU (`make gpu-check`) or, with
JAX's CUDA plugin installed, for an H200 target on any machine (`make gpu-census`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.benchmarks.common import Size, model_config
from ttt_jax.benchmarks.streaming import Streamer
from ttt_jax.eval.generate import Generator
from ttt_jax.eval.stream import make_one_shot_step
from ttt_jax.eval.tlm import TLM
from ttt_jax.eval.tlm import default_config as tlm_config
from ttt_jax.layers.common import building_for
from ttt_jax.models import abstract_model, build_model
from ttt_jax.sharding import make_mesh
from ttt_jax.train.trainer import Trainer

# The preset's structure (8 layers: E2E suffix of 2 blocks, head dim 64, TTT mini-batch 16,
# E2E chunks shorter than the sequence, window shorter than the context), narrow and short.
SIZE = Size(d_model=128, num_layers=8, num_heads=2, intermediate=256, seq_len=256, batch=2,
            window=64, ttt_mini_batch=16, e2e_chunk=64, lengths=(256,), matmul_n=128, repeats=1,
            warmup=0, decode_steps=1, dtype="bfloat16", remat="full")
# (name, benchmark kind, config overrides): every program family a GPU user meets by default
# (TTT-Linear: the Pallas kernels), plus the other TTT impls and the TTT kernels inside scanned
# layers (`model.scan_layers`), and E2E meta-learning with its prefix blocks scanned
TRAIN_CASES = (
    ("transformer", "transformer", {}), ("swa", "swa", {}), ("ttt_linear", "ttt_linear", {}),
    ("ttt_mlp", "ttt_mlp", {}), ("e2e-meta", "e2e-meta", {}),
    ("e2e-pretrain", "e2e-pretrain", {}),
    ("ttt_linear-dual", "ttt_linear", {"ttt.impl": "dual"}),
    ("ttt_mlp-pallas", "ttt_mlp", {"ttt.impl": "pallas"}),
    ("ttt_linear-scan", "ttt_linear", {"scan_layers": True}),
    ("ttt_mlp-pallas-scan", "ttt_mlp", {"ttt.impl": "pallas", "scan_layers": True}),
    ("e2e-meta-scan", "e2e-meta", {"scan_layers": True}),
)
STREAM_KINDS = ("transformer", "swa", "ttt_linear", "ttt_mlp", "e2e")
# custom calls of GPU kernels (cuDNN attention, Triton) carry no export compatibility
# guarantee; a lowering that is only inspected, never stored, may contain them
_TARGET = re.compile(r"custom_call @([^\s(]+)\(")


def triton_gpu_info():
  """JAX's module that Pallas' Triton lowering asks for the target GPU (JAX 0.11:
  jax._src.pallas.triton.gpu_info, 0.12: jax._src.gpu_info), or None where the lowering asks
  nothing (JAX 0.10)."""
  try:
    from jax._src.pallas.triton import pallas_call_registration as lowering_rule  # noqa: PLC0415
  except ImportError:
    return None
  for name in ("gpu_info_lib", "gpu_info"):
    module = getattr(lowering_rule, name, None)
    if hasattr(module, "get_gpu_info_from_version"):
      return module
  return None


@contextlib.contextmanager
def gpu_target() -> Iterator[None]:
  """Pallas kernels lowered inside target an H200 when JAX finds no GPU to target. The Triton
  lowering of JAX 0.11 and later asks the attached GPU for its compute capability, else the
  abstract device of the abstract mesh in context (a CPU inside a mesh of CPU devices), and
  without an answer refuses ("No supported GPU devices found"); inside, the question falls back
  to an H200. JAX 0.10's lowering asks nothing. The answer is patched into JAX for the whole
  process while the block runs: enter it from one thread at a time."""
  gpu_info = triton_gpu_info()
  if gpu_info is None:
    yield
    return
  h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
  asked = gpu_info.get_gpu_info

  def answer():
    try:
      return asked()
    except ValueError:  # no GPU (and no GPU abstract device) to ask
      return h200

  with mock.patch.object(gpu_info, "get_gpu_info", answer):
    yield


@contextlib.contextmanager
def for_gpu() -> Iterator[None]:
  """Models built and traced inside choose their GPU kernels. On a machine without a GPU the
  cuDNN availability checks answer as an H100/H200 with cuDNN 9.10 would, and the run-time
  input checks (host callbacks: the KV-cache overflow and stream-continuation errors, which JAX
  lowers only for the backend it runs on) are left out of the program; Pallas kernels are lowered
  for an H200 (`gpu_target`)."""
  with contextlib.ExitStack() as stack:
    stack.enter_context(building_for("gpu"))
    stack.enter_context(gpu_target())
    if jax.default_backend() != "gpu":
      from jax._src.cudnn import fused_attention_stablehlo as fa  # noqa: PLC0415
      stack.enter_context(mock.patch.object(fa, "check_cudnn_version", lambda: 91000))
      stack.enter_context(mock.patch.object(fa, "check_compute_capability", lambda c: True))
      stack.enter_context(mock.patch.object(jax.debug, "callback", lambda *a, **k: None))
    yield


# GPU kernels' custom-call targets whose export check is off: those of the default kernels, and
# any other the check names (learned once per process, so each program is traced once)
_UNCHECKED_TARGETS = {"__gpu$xla.gpu.triton", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}


def export_cuda(fn: Callable, *args, platform: str = "cuda") -> jax.export.Exported:
  """`jax.export` of `jax.jit(fn)` for CUDA (or `platform`; fn may already be jitted)."""
  fn = fn if hasattr(fn, "lower") else jax.jit(fn)
  for _ in range(4):
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in sorted(_UNCHECKED_TARGETS)]
    try:
      with gpu_target() if platform == "cuda" else contextlib.nullcontext():
        return jax.export.export(fn, platforms=[platform], disabled_checks=checks)(*args)
    except ValueError as e:
      targets = set(_TARGET.findall(str(e))) - _UNCHECKED_TARGETS
      if not targets or "compatibility" not in str(e):
        raise
      _UNCHECKED_TARGETS.update(targets)
  raise RuntimeError("export_cuda: custom-call checks did not settle")


@contextlib.contextmanager
def building(platform: str) -> Iterator[None]:
  """`for_gpu()` for 'cuda', `building_for(platform)` otherwise ('tpu': its Pallas kernels)."""
  with for_gpu() if platform == "cuda" else building_for(platform):
    yield


def kernels_in(exported: jax.export.Exported) -> set[str]:
  """The custom-call targets (cuDNN, Triton, ...) of a lowered program."""
  return set(_TARGET.findall(exported.mlir_module()))


def train_step_program(kind: str, overrides: dict | None = None,
                       size: Size = SIZE) -> tuple[Callable, tuple]:
  """(the train step `scripts/train.py` runs for benchmark kind `kind`, its abstract arguments
  (state, batch)). Build and trace it inside `for_gpu()` to get the GPU's program."""
  return train_step_of_config(model_config(kind, size, overrides=overrides))


def train_step_of_config(cfg, trainer: Trainer | None = None) -> tuple[Callable, tuple]:
  """`train_step_program` of a validated run config (and its trainer, if built already)."""
  trainer = Trainer.create(cfg) if trainer is None else trainer
  state = jax.eval_shape(lambda: trainer._init(cfg.seed))
  tokens = jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.data.seq_len + 1), jnp.int32)
  return trainer.pure_train_step, (state, {"tokens": tokens})


def stream_step_programs(kind: str, size: Size = SIZE,
                         length: int | None = None) -> dict[str, tuple[Callable, tuple]]:
  """{'prefill': a chunk of `size.e2e_chunk` tokens, 'decode': one token}: (the chunk step
  evaluation and generation stream with, its arguments) against the cache of context `length`
  (default `size.seq_len`); kinds as `streaming.Streamer` takes them."""
  streamer = Streamer(kind, size)
  cache = streamer.abstract_cache(size.seq_len if length is None else length)
  out = {}
  for name, width in (("prefill", size.e2e_chunk), ("decode", 1)):
    tokens = jax.ShapeDtypeStruct((1, width), jnp.int32)
    positions = jax.ShapeDtypeStruct((width,), jnp.int32)
    out[name] = (streamer._step, (streamer.params, cache, tokens, positions))
  return out


def sharded_train_step(kind: str, overrides: dict | None, size: Size,
                       mesh: tuple[int, int, int], devices=None) -> tuple[Callable, tuple]:
  """(the trainer's jitted train step of benchmark kind `kind` on a (data, fsdp, tensor) mesh of
  sizes `mesh` over `devices` (default: all), its abstract arguments (state, batch) placed with
  the trainer's shardings). Build and trace it inside `for_gpu()` for a GPU's program."""
  cfg = model_config(kind, size, overrides=overrides)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  trainer = Trainer.create(cfg, None if devices is None else make_mesh(cfg.mesh, devices))
  _, (state, batch) = train_step_of_config(cfg, trainer)
  placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
  state = jax.tree.map(placed, state, trainer.state_shardings)
  batch = jax.tree.map(lambda a: placed(a, trainer.batch_sharding), batch)
  return trainer.train_step, (state, batch)


def eval_programs(kind: str, size: Size = SIZE) -> dict[str, tuple[Callable, tuple]]:
  """(function, abstract arguments) of the programs besides training and streaming that a GPU
  runs for benchmark kind `kind`: 'eval' (the trainer's evaluation step: validation and
  scripts/evaluate.py), 'one_shot' (per-position NLL from one forward pass, eval/stream.py),
  'tlm' (one update of TLM's LoRA adapters, eval/tlm.py) and 'generate' (eval/generate.py's
  loop: prefill, then sampling until the limit). Build and trace them inside `for_gpu()`."""
  cfg = model_config(kind, size)
  trainer = Trainer.create(cfg)
  _, (state, batch) = train_step_of_config(cfg, trainer)
  tokens = batch["tokens"]
  graphdef, params = abstract_model(cfg.model, cfg.seed)
  tlm, lora = TLM.create(build_model(cfg.model, cfg.seed), tlm_config(), log_p0=3.0)
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
  rows, slots = cfg.data.batch_size, cfg.data.seq_len
  gen = Generator(graphdef, params, cfg.model, chunk=size.e2e_chunk, max_len=slots)
  cache = jax.eval_shape(lambda p: nnx.merge(graphdef, p).init_cache(rows, slots), params)
  i32, f32 = scalar(jnp.int32), scalar(jnp.float32)
  knobs = (jax.random.key(0), f32, i32, f32, jax.ShapeDtypeStruct((8,), jnp.int32))
  programs = {
      "eval": (trainer.pure_eval_step, (state.params, batch)),
      "one_shot": make_one_shot_step(graphdef).prepare(params, tokens),
      "tlm": tlm._step_jit.prepare(tlm.base, lora, jax.eval_shape(tlm.optimizer.init, lora),
                                   tokens, f32),
      "generate": gen.loop.prepare(params, cache, jax.ShapeDtypeStruct((rows, slots), jnp.int32),
                                   i32, i32, i32, *knobs,
                                   jax.ShapeDtypeStruct((rows,), jnp.bool_))}
  return programs


def lower_eval_programs(kind: str, size: Size = SIZE) -> dict[str, jax.export.Exported]:
  """`eval_programs`, lowered for CUDA."""
  with for_gpu():
    return {name: export_cuda(fn, *args) for name, (fn, args) in eval_programs(kind, size).items()}


def lower_train_step(kind: str, overrides: dict | None = None, size: Size = SIZE,
                     mesh: tuple[int, int, int] | None = None,
                     platform: str = "cuda") -> jax.export.Exported:
  """The train step `scripts/train.py` runs for benchmark kind `kind`, lowered for CUDA (or
  `platform`). `mesh`: (data, fsdp, tensor) sizes over all devices; the step is then
  the trainer's, jitted with its shardings on that mesh (as on a multi-GPU node or TPU pod)."""
  with building(platform):
    if mesh is None:
      fn, args = train_step_program(kind, overrides, size)
    else:
      fn, args = sharded_train_step(kind, overrides, size, mesh)
    return export_cuda(fn, *args, platform=platform)


def lower_stream_steps(kind: str, size: Size = SIZE) -> dict[str, jax.export.Exported]:
  """`stream_step_programs` at context `size.seq_len`, lowered for CUDA."""
  with for_gpu():
    return {name: export_cuda(fn, *args)
            for name, (fn, args) in stream_step_programs(kind, size).items()}

