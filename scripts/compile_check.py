"""Compile-only check of paper-scale train steps: per-device memory and compile time.

  python scripts/compile_check.py --scales 125m,350m --kinds transformer,swa,ttt_linear,ttt_mlp,e2e

Each preset (configs/pretrain.py:model=KIND,scale=SCALE,ctx=8k; configs/e2e.py:scale=SCALE for
e2e) is AOT-compiled on 8 forced CPU devices (mesh data=1, fsdp=-1) without allocating weights;
the table of XLA's per-device buffer sizes is printed and written to --json. `--target h200`
compiles for 8 H200s instead (XLA:GPU without a GPU; needs JAX's CUDA plugin, e.g.
.venv-cuda/bin/python after `make gpu-census`).
"""

from ttt_jax.benchmarks.compile_check import main
from ttt_jax.cli import run_absl, user_errors


def checked_main(argv) -> None:
  with user_errors():  # a flag out of its range: one line naming it
    main(argv)


if __name__ == "__main__":
  run_absl(checked_main)
