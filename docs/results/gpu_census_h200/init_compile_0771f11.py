"""The init program compiled for H200s without a GPU: threefry inlined ('plain') or through
JAX's kernel ('kernel'). Usage: JAX_PLATFORMS=cpu python init_compile_0771f11.py MODE SPEC...,
SPEC a gpu-check train kind (gpu preset), S:K (model kind K at scale S, 8K) or NxSPEC (a
(1, N, 1) mesh over N H200s)."""

import sys
import time

import jax

from ttt_jax.benchmarks import gpu_census, gpu_variants, lowering
from ttt_jax.benchmarks.common import PRESETS
from ttt_jax.benchmarks.training import model_config
from ttt_jax.sharding import make_mesh
from ttt_jax.train.trainer import Trainer


def config(spec: str):
  scale, _, kind = spec.rpartition(":")
  if scale:
    return gpu_variants.pretrain_config(kind, scale)
  base, overrides = gpu_variants.train_kind(kind)
  return model_config(base, PRESETS["gpu"], overrides=overrides)


def main(mode: str, specs: list[str]) -> None:
  for spec in specs:
    head, _, rest = spec.partition("x")
    n, inner = (int(head), rest) if head.isdigit() and rest else (1, spec)
    with lowering.for_gpu():
      cfg = config(inner)
      cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, n, 1
      if "init_rng_kernel" in cfg.train:  # after 0771f11 auto leaves the kernel off on 8 GPUs
        cfg.train.init_rng_kernel = "on"
      tr = Trainer.create(cfg, make_mesh(cfg.mesh, gpu_census.gpu_devices(n)))
      with lowering.gpu_target():
        if mode == "kernel":
          lowered = tr.lower_init(cfg.seed, ("cuda",))
        else:
          with jax.set_mesh(tr.mesh):
            fn = jax.jit(tr._init, static_argnums=0, out_shardings=tr.state_shardings)
            lowered = fn.trace(cfg.seed).lower(lowering_platforms=("cuda",))
      t = time.perf_counter()
      compiled = lowered.compile()
      seconds = time.perf_counter() - t
      m = compiled.memory_analysis()
      print(f"INIT {spec} {mode} jax {jax.__version__} compile_s {seconds:.2f} temp_GB "
            f"{m.temp_size_in_bytes / 1e9:.3f} out_GB {m.output_size_in_bytes / 1e9:.3f}",
            flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
