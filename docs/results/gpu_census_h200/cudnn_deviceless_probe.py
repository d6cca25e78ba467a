"""Does cuDNN's fused attention compile for an H200 without a GPU on this JAX? One causal
attention call (bf16, [2, 256, 4, 64]) through cuDNN, compiled deviceless for the census's H200
target, without and with `xla_gpu_cudnn_deviceless_compilation_mode`, and with the target's
`gpu_device_info` given a `dnn_version` (argv[1], e.g. '9.10.0'; none by default).
Run with JAX_PLATFORMS=cpu where a CUDA plugin is installed beside JAX."""
import sys

import jax
import jax.numpy as jnp

from ttt_jax.benchmarks import gpu_census
from ttt_jax.benchmarks.lowering import for_gpu

if len(sys.argv) > 1:
  limit = "registers_per_block_limit: 65536"
  gpu_census.H200_TARGET = gpu_census.H200_TARGET.replace(
      limit, f'{limit} dnn_version: "{sys.argv[1]}"')
print("jax", jax.__version__, gpu_census.cuda_plugin(), "dnn_version:", sys.argv[1:] or "none")
sharding = jax.sharding.make_single_device_sharding(gpu_census.gpu_device())
q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.bfloat16, sharding=sharding)
attend = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="cudnn"))
with for_gpu():
  lowered = attend.trace(q, q, q).lower(lowering_platforms=("cuda",))
for mode in (None, "CUDNN_DEVICELESS_COMPILATION_AUTO", "CUDNN_DEVICELESS_COMPILATION_ALWAYS"):
  options = {"xla_gpu_cudnn_deviceless_compilation_mode": mode} if mode else {}
  try:
    text = lowered.compile(compiler_options=options).as_text()
    print(f"mode {mode}: compiled, {text.count('__cudnn$fmha')} cuDNN attention call(s)")
  except Exception as e:  # noqa: BLE001
    print(f"mode {mode}: {type(e).__name__}: {' '.join(str(e).split())[:240]}")
