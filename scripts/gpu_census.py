"""`make gpu-census`: kernel launches per train step of every model kind on an H200, counted
without a GPU (XLA compiles for the GPU target; nothing runs). Writes
<out_dir>/gpu_census.{md,json}."""

import sys

from ttt_jax.benchmarks.gpu_census import main

if __name__ == "__main__":
  sys.exit(main())
