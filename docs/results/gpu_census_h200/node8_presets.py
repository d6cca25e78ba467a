"""The train step of pretraining presets compiled for a node of H200s without a GPU (FSDP over
them): compile time, XLA's temporaries and arguments per GPU, kernel launches. Usage:
JAX_PLATFORMS=cpu python node8_presets.py NxS:K..., N GPUs, S a scale (760m, 1b, 3b), K a
gpu-check train kind (K-dual, K-pallas force model.ttt.impl). The init programs' figures beside
these: init_compile_0771f11.py with the same specs."""

import sys
import time

import jax

from ttt_jax.benchmarks import gpu_census, gpu_variants, lowering
from ttt_jax.benchmarks.hlo_text import census
from ttt_jax.sharding import make_mesh
from ttt_jax.train.trainer import Trainer


def _placed(a, sharding):
  return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)


def main(specs: list[str]) -> None:
  for spec in specs:
    head, _, inner = spec.partition("x")
    scale, _, kind = inner.partition(":")
    with lowering.for_gpu():
      cfg = gpu_variants.pretrain_config(kind, scale)
      cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, int(head), 1
      tr = Trainer.create(cfg, make_mesh(cfg.mesh, gpu_census.gpu_devices(int(head))))
      _, (state, batch) = lowering.train_step_of_config(cfg, tr)
      state = jax.tree.map(_placed, state, tr.state_shardings)
      batch = jax.tree.map(_placed, batch, {"tokens": tr.batch_sharding})
      t = time.perf_counter()
      with lowering.gpu_target():
        lowered = tr.train_step.trace(state, batch).lower(lowering_platforms=("cuda",))
      traced_s = time.perf_counter() - t
      t = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t
      m = compiled.memory_analysis()
      c = census(compiled.as_text())
      print(f"STEP {spec} jax {jax.__version__} trace+lower_s {traced_s:.1f} compile_s "
            f"{compile_s:.1f} temp_GB {m.temp_size_in_bytes / 1e9:.2f} arg_GB "
            f"{m.argument_size_in_bytes / 1e9:.2f} launches {c['launches']} by_kind "
            f"{c['by_kind']}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
