"""`make gpu-check`: on a machine with a GPU, check the GPU-only paths (cuDNN/XLA attention, the
Pallas TTT kernels, TTT-E2E meta-learning) and time every model kind; writes
<out_dir>/gpu_check.{md,jsonl}. Without a GPU it says so and exits 0."""

import sys

from ttt_jax.benchmarks.gpu_check import main

if __name__ == "__main__":
  sys.exit(main())
