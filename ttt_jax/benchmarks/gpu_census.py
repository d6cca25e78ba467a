"""`make gpu-census`: how many kernels one train step launches on a GPU, counted on any machine.

XLA compiles each model kind's train step for an NVIDIA H200 target without a GPU (deviceless
ahead-of-time compilation: JAX's CUDA plugin is loaded, no driver is needed, and nothing runs),
with the kernels a GPU takes by default (cuDNN attention, the Triton TTT kernels). The
compiled program is then read: every fusion, library call (cuBLAS/cuDNN/Triton) and copy is one
kernel launch, a while loop's body counts once per trip (XLA records the trip count of the
scans) and its condition once more. So the count is what a GPU executes per step, before
CUDA-graph capture; it says nothing of each kernel's time. What the launches compute is counted
alongside: the FLOPs of their matmuls and of cuDNN's fused attention (`hlo_text.launch_flops`;
the Pallas kernels' are not counted), per phase and scope. Streaming programs (a prefill chunk
and a decode step) are counted too, and so are train steps on a node of 8 H200s (`node8:K`,
FSDP over them): one GPU's program, its NCCL collectives among the launches. Compiling needs
the CUDA plugin of the installed jax, for CUDA 12 or 13 (`pip install
'jax-cuda12-plugin[with-cuda]==<jax version>'`, or jax-cuda13-plugin, a CUDA 13 image's; `make
gpu-census` sets up .venv-cuda with the first, `make gpu-census CUDA_MAJOR=13` .venv-cuda13
with the second); counting (`census`) needs nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from ttt_jax.benchmarks.gpu_variants import TUNING_VARIANTS
from ttt_jax.benchmarks.hlo_text import census
from ttt_jax.config import SCALES

# Public figures of an H200 SXM (141 GB HBM3e, 4.8 TB/s, 132 SMs, 50 MB L2, Hopper sm_90).
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 150323855360
  shared_memory_per_block_optin: 232448 cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H200"
"""
# JAX's CUDA plugins, newest CUDA first: (module of the plugin, its pip package)
CUDA_PLUGINS = (("jax_plugins.xla_cuda13", "jax-cuda13-plugin"),
                ("jax_plugins.xla_cuda12", "jax-cuda12-plugin"))


def _find_spec(name: str):
  """importlib's spec of module `name`; None also where a package above it is missing."""
  try:
    return importlib.util.find_spec(name)
  except ModuleNotFoundError:
    return None


def cuda_plugin() -> str | None:
  """The pip name of the CUDA plugin installed beside this JAX (None: none)."""
  return next((package for module, package in CUDA_PLUGINS if _find_spec(module)), None)


def gpu_device():
  """The H200 of a deviceless topology (ImportError naming the plugin if it is missing)."""
  return gpu_devices(1)[0]


# a node of 8 H200s (`node8:K` kinds), FSDP over all of them, as docs/scaling.md advises within
# a node: the gpu preset's 8 sequences are one per GPU
NODE_GPUS, NODE_MESH = 8, (1, 8, 1)
NODE_KINDS = ("node8:transformer", "node8:ttt_linear", "node8:ttt_linear-dual", "node8:e2e-meta")


def gpu_devices(count: int) -> list:
  """`count` H200s in one host of a deviceless topology (ImportError naming the plugin if it is
  missing)."""
  from jax.experimental import topologies  # noqa: PLC0415

  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET,
                                           topology=f"1x1x{count}")
  except Exception as e:  # noqa: BLE001
    import jax  # noqa: PLC0415
    raise ImportError(f"no deviceless CUDA compilation here ({type(e).__name__}: "
                      f"{str(e)[:120]}); install jax-cuda12-plugin[with-cuda]=="
                      f"{jax.__version__} (make gpu-census does) or jax-cuda13-plugin[with-cuda]=="
                      f"{jax.__version__}") from None
  return list(topology.devices)


def _compile(fn, device, *args) -> tuple[str, dict]:
  """(compiled HLO text, {'compile_s', 'temp_bytes', 'argument_bytes'}: XLA's buffer assignment
  for the device) of jit(fn) for `device`, args as shapes (or arrays); `device` None: args carry
  their shardings (and the text is one device's program)."""
  import jax  # noqa: PLC0415

  if device is not None:
    sharding = jax.sharding.make_single_device_sharding(device)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        args)
  from ttt_jax.benchmarks.lowering import gpu_target  # noqa: PLC0415

  fn = fn if hasattr(fn, "trace") else jax.jit(fn)
  with gpu_target():
    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
  t0 = time.perf_counter()
  compiled = lowered.compile()  # Triton kernels included: shared memory and registers checked
  info = {"compile_s": time.perf_counter() - t0}
  memory = compiled.memory_analysis()
  if memory is not None:
    info.update(temp_bytes=memory.temp_size_in_bytes,
                argument_bytes=memory.argument_size_in_bytes)
  return compiled.as_text(), info


def compile_train_step(kind: str, device, size_name: str = "gpu") -> tuple[str, dict]:
  """`_compile` of gpu-check's train kind `kind` at a bench preset, of 'S:K', the pretraining
  preset of model kind K at scale S (125m, 350m, ...: `config.SCALES`) and 8K context, batch 8,
  or of 'node8:K', train kind K on a node of 8 H200s (`compile_node_train_step`)."""
  if kind.startswith("node8:"):
    return compile_node_train_step(kind.split(":", 1)[1], size_name)
  from ttt_jax.benchmarks import gpu_variants, lowering  # noqa: PLC0415
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  with lowering.for_gpu(), ttt_pallas.tuning(**gpu_variants.variant_tuning(kind)):
    scale, _, model_kind = kind.rpartition(":")
    if scale:  # a pretraining preset at 8K (125m: gpu-check's train125m)
      fn, args = lowering.train_step_of_config(gpu_variants.pretrain_config(model_kind, scale))
    else:
      fn, args = lowering.train_step_program(*gpu_variants.train_kind(kind), PRESETS[size_name])
    return _compile(fn, device, *args)


def compile_node_train_step(kind: str, size_name: str = "gpu") -> tuple[str, dict]:
  """`_compile` of train kind `kind` at a bench preset on `NODE_GPUS` H200s, the trainer's
  shardings over the `NODE_MESH` (data, fsdp, tensor) mesh: one GPU's program, its collectives
  included, and the kernels XLA cannot split run per GPU (`sharding.per_shard`)."""
  from ttt_jax.benchmarks import lowering  # noqa: PLC0415
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415
  from ttt_jax.benchmarks.gpu_variants import train_kind, variant_tuning  # noqa: PLC0415
  from ttt_jax.layers import ttt_pallas  # noqa: PLC0415

  with lowering.for_gpu(), ttt_pallas.tuning(**variant_tuning(kind)):
    fn, args = lowering.sharded_train_step(*train_kind(kind), PRESETS[size_name], NODE_MESH,
                                           gpu_devices(NODE_GPUS))
    return _compile(fn, None, *args)


def compile_stream_steps(kind: str, device, length: int) -> dict[str, tuple[str, dict]]:
  """{'prefill': a 512-token chunk, 'decode': one token} of streaming kind `kind`
  (streaming.STREAM_ALIASES included) against the cache of context `length`, gpu preset."""
  from ttt_jax.benchmarks import lowering  # noqa: PLC0415
  from ttt_jax.benchmarks.common import PRESETS  # noqa: PLC0415

  with lowering.for_gpu():
    programs = lowering.stream_step_programs(kind, PRESETS["gpu"], length)
    return {name: _compile(fn, device, *args) for name, (fn, args) in programs.items()}


def compile_cache_kernel(device, length: int, settings: dict,
                         queries: int = 512) -> tuple[str, dict]:
  """`_compile` of the cache-attention kernel alone (bf16, the gpu preset's 8 heads of 64):
  `queries` against `length` slots, with tile/launch `settings` (streaming.KERNEL_SETTINGS)."""
  import functools  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ttt_jax.layers.cache_attention import filled_attention_pallas  # noqa: PLC0415

  spec = jax.ShapeDtypeStruct
  kv = spec((1, length, 8, 64), jnp.bfloat16)
  args = (spec((1, queries, 8, 64), jnp.bfloat16), kv, kv, spec((queries,), jnp.int32),
          spec((length,), jnp.int32), spec((), jnp.int32))
  return _compile(functools.partial(filled_attention_pallas, **settings), device, *args)


# {label: (inner model, ttt_pallas.tuning overrides)}: the Pallas TTT kernels compiled alone,
# whose PTX ptxas reads (the label names the XLA module, so ptxas's rows can be told apart)
TTT_KERNEL_SETTINGS = {"linear": ("linear", {}), "linear_xla": ("linear", {"linear_output": "xla"}),
                       "mlp": ("mlp", {}),
                       # the hidden blocks written out (Tuning.mlp_unroll): train kind K+unrolled's
                       "mlp_unroll_b64": ("mlp", TUNING_VARIANTS["unrolled"]),
                       "mlp_w4": ("mlp", {"mlp_num_warps": 4}),
                       "mlp_w16": ("mlp", {"mlp_num_warps": 16}),
                       "mlp_b16": ("mlp", {"mlp_block": 16}),
                       "mlp_b64": ("mlp", {"mlp_block": 64}),
                       "mlp_b128": ("mlp", {"mlp_block": 128})}


def compile_ttt_kernels(device, label: str) -> tuple[str, dict]:
  """`_compile` of the Pallas TTT kernels of `TTT_KERNEL_SETTINGS[label]` alone, forward and
  backward, at the gpu preset's geometry (8 sequences of 2048, 8 heads of 64, mini-batches of
  16), in an XLA module named after `label`."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from ttt_jax.layers import ttt_inner, ttt_pallas  # noqa: PLC0415

  inner, tune = TTT_KERNEL_SETTINGS[label]
  model = ttt_inner.inner_model(inner)
  n, bsz, heads, b, d = 128, 8, 8, 16, 64
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  params = {k: spec(bsz, heads, *s) for k, s in model.param_shapes(d).items()}
  views = [spec(n, bsz, heads, b, d)] * 3 + [spec(n, bsz, heads, b, b)]

  def kernels(params, ln, *xs):
    return jnp.sum(model.pallas_sequence(params, ln, *xs)[1])

  kernels.__name__ = f"ttt_kernels_{label}"  # the module's name: jit_ttt_kernels_<label>
  with ttt_pallas.tuning(**tune):
    return _compile(jax.grad(kernels, argnums=(0, 2)), device, params,
                    (spec(heads, 1, d), spec(heads, 1, d)), *views)


_PTXAS = re.compile(r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) bytes "
                    r"spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)


def ptxas_resources(text: str) -> dict[str, dict]:
  """{kernel: registers and spill bytes per thread} from `ptxas -v` output."""
  keys = ("stack_bytes", "spill_store_bytes", "spill_load_bytes", "registers")
  return {m.group(1): dict(zip(keys, map(int, m.groups()[1:]), strict=True))
          for m in _PTXAS.finditer(text)}


def _ptxas() -> str | None:
  """The ptxas of the CUDA plugin's compiler package (CUDA 13's `nvidia.cu13`, CUDA 12's
  `nvidia.cuda_nvcc`), else one on PATH."""
  for package in ("nvidia.cu13", "nvidia.cuda_nvcc"):
    spec = _find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
      if os.path.exists(path := os.path.join(root, "bin", "ptxas")):
        return path
  return shutil.which("ptxas")


def triton_resources(dump_dir: str, ptxas: str) -> dict[str, dict]:
  """{'<label>: <kernel>': `ptxas_resources`} of every Pallas kernel (an entry named *_kernel)
  in XLA's PTX dumps of the `compile_ttt_kernels` modules."""
  out = {}
  for name in sorted(os.listdir(dump_dir)):
    module = re.search(r"jit_ttt_kernels_(\w+?)\.\d+\.ptx$", name)
    if not module:
      continue
    with open(os.path.join(dump_dir, name)) as f:
      if not re.search(r"\.entry \w+_kernel\(", f.read()):
        continue
    proc = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", os.path.join(dump_dir, name),
                           "-o", os.devnull], capture_output=True, text=True, check=True)
    found = ptxas_resources(proc.stdout + proc.stderr)
    out.update({f"{module.group(1)}: {k}": r for k, r in found.items() if k.endswith("_kernel")})
  return out


def _preset(kind: str) -> str:
  """'S:' for rows of kinds 'S:K' (S a scale or node8), else '': ratios stay within one."""
  head = kind.split(":", 1)[0]
  return head + ":" if ":" in kind and (head in SCALES or head == "node8") else ""


def markdown(rows: dict) -> str:
  out = ["| program (gpu preset unless named) | kernel launches | / transformer | matmul | cuDNN | "
         "Pallas | collectives | other | XLA temporaries | largest loops: trips x launches per "
         "trip |", "|---|---|---|---|---|---|---|---|---|---|"]
  for kind, r in rows.items():
    if kind == "triton resources":
      continue  # its own table below
    base = rows.get(_preset(kind) + "transformer", {}).get("launches")
    if "error" in r:
      out.append(f"| {kind} | error ({r['error']}) | | | | | | | | |")
      continue
    k = r["by_kind"]
    top = "; ".join(f"{x['trips']} x {x['per_trip']}" + (f" (x{x['runs']})" if x["runs"] > 1
                                                          else "") for x in r["loops"][:3])
    named = [k.get(n, 0) for n in ("matmul", "cudnn", "pallas", "collective")]
    ratio = f"{r['launches'] / base:.1f}x" if base and r.get("train_step", True) else ""
    temp = f"{r['temp_bytes'] / 1e9:.2f} GB" if "temp_bytes" in r else ""
    out.append(f"| {kind} | {r['launches']} | {ratio} | "
               + " | ".join(map(str, named)) + f" | {r['launches'] - sum(named)} | {temp} | "
               f"{top or '-'} |")
  scoped = {k: r for k, r in rows.items() if r.get("by_scope")}
  if scoped:
    share = lambda d, n: ", ".join(f"{k} {v}" for k, v in list(d.items())[:n])  # noqa: E731
    out += ["", "| program | launches by model scope (largest first) | by phase |", "|---|---|---|"]
    out += [f"| {k} | {share(r['by_scope'], 6)} | {share(r['by_phase'], None)} |"
            for k, r in scoped.items()]
  counted = {k: r for k, r in rows.items() if r.get("flops_by_phase")}
  if counted:
    out += ["", "| program | GFLOP per step: matmul + fused attention (Pallas kernels not counted) "
            "| / transformer | GFLOP by phase |", "|---|---|---|---|"]
    for k, r in counted.items():
      total = r["matmul_flops"] + r["attention_flops"]
      base = counted.get(_preset(k) + "transformer")
      base = base and base["matmul_flops"] + base["attention_flops"]
      ratio = f"{total / base:.2f}x" if base and r.get("train_step", True) else ""
      phases = ", ".join(f"{p} {v / 1e9:.0f}" for p, v in r["flops_by_phase"].items())
      out.append(f"| {k} | {r['matmul_flops'] / 1e9:.0f} + {r['attention_flops'] / 1e9:.0f} = "
                 f"{total / 1e9:.0f} | {ratio} | {phases} |")
  resources = rows.get("triton resources", {})
  if resources:
    out += ["", "| Triton kernel (H200, ptxas) | registers per thread | spill stores | spill loads "
            "| stack frame |", "|---|---|---|---|---|"]
    out += [f"| {k} | {r['registers']} | {r['spill_store_bytes']} B | {r['spill_load_bytes']} B "
            f"| {r['stack_bytes']} B |" for k, r in resources.items()]
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  from ttt_jax.benchmarks.gpu_variants import RUN_VARIANTS, TRAIN  # noqa: PLC0415

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kinds", default=",".join(TRAIN + RUN_VARIANTS + NODE_KINDS + (
                     "125m:transformer", "125m:e2e", "125m:e2e+innerdense")),
                 help="comma list of gpu-check train kinds (K or K+variant; S:K the "
                 "pretraining preset of model kind K at scale S (125m, 350m, ...) and 8K; "
                 "node8:K train kind K on a node of 8 H200s, FSDP over them)")
  p.add_argument("--stream", default="transformer,transformer-masked,e2e,ttt_linear",
                 help="comma list of streaming kinds whose prefill-chunk and decode steps are "
                 "counted ('' = none)")
  p.add_argument("--stream_len", type=int, default=131072, help="their context length")
  p.add_argument("--out_dir", default="runs/gpu_census")
  p.add_argument("--ttt_kernels", default=",".join(TTT_KERNEL_SETTINGS),
                 help="comma list of TTT_KERNEL_SETTINGS labels: Pallas TTT kernels compiled "
                 "alone and read by ptxas ('' = none)")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin registers; nothing runs on it
  saved = os.environ.get("XLA_FLAGS")
  with tempfile.TemporaryDirectory(prefix="gpu_census_ptx_") as dump:
    # the kernel-only modules' PTX, for ptxas (read when JAX starts its backends: a process
    # that already has them gets no dumps and no ptxas table); since JAX 0.11 XLA writes a
    # kernel's PTX only for emitters that --xla_dump_emitter_re names
    os.environ["XLA_FLAGS"] = (f"{saved or ''} --xla_dump_to={dump} --xla_dump_hlo_pass_re=^$ "
                               "--xla_dump_hlo_module_re=.*ttt_kernels.* "
                               "--xla_dump_emitter_re=.*").strip()
    try:
      return _census(args, dump)
    finally:
      if saved is None:
        os.environ.pop("XLA_FLAGS")
      else:
        os.environ["XLA_FLAGS"] = saved


def _census(args, dump: str) -> int:
  try:
    device = gpu_device()
  except ImportError as e:
    print(e)
    return 1
  os.makedirs(args.out_dir, exist_ok=True)
  rows = {}
  jobs = [(kind, lambda k=kind: {"": compile_train_step(k, device)}) for kind in
          args.kinds.split(",") if kind]
  jobs += [(f"stream:{kind}", lambda k=kind: compile_stream_steps(k, device, args.stream_len))
           for kind in args.stream.split(",") if kind]
  if args.stream:  # the cache kernel at each tile setting gpu-check times
    from ttt_jax.benchmarks.streaming import KERNEL_SETTINGS  # noqa: PLC0415
    jobs += [(f"cache kernel, {name}", lambda s=s: {
        f"{q} queries": compile_cache_kernel(device, args.stream_len, s, q) for q in (512, 1)})
        for name, s in KERNEL_SETTINGS.items()]
  jobs += [(f"TTT kernels alone, {label}", lambda k=label: {
      "fwd+bwd": compile_ttt_kernels(device, k)}) for label in args.ttt_kernels.split(",") if label]
  for i, (name, job) in enumerate(jobs):
    print(f"[{i + 1}/{len(jobs)}] compiling {name} for the H200", flush=True)
    try:
      done = {f"{name} {part}".strip(): dict(census(text), **info, train_step=not part)
              for part, (text, info) in job().items()}
    except Exception as e:  # noqa: BLE001
      from ttt_jax.benchmarks.common import error_record  # noqa: PLC0415

      done = {name: error_record(e, 200)}
    for row, r in done.items():
      print(f"  {row}: {json.dumps({k: v for k, v in r.items() if k != 'loops'})}", flush=True)
    rows.update(done)
  ptxas = _ptxas()
  if ptxas:
    rows["triton resources"] = triton_resources(dump, ptxas)
  with open(os.path.join(args.out_dir, "gpu_census.json"), "w") as f:
    json.dump(rows, f, indent=1)
  md = os.path.join(args.out_dir, "gpu_census.md")
  with open(md, "w") as f:
    f.write(markdown(rows))
  print(markdown(rows) + f"gpu-census: wrote {md}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
