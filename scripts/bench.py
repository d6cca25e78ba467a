"""Benchmarks (`make bench`): matmul ceiling, train step MFU, TTT dual vs primal, prefill and
decode latency vs context length, memory. Writes docs/benchmarks.md (+ JSON, PNGs)."""

from ttt_jax.benchmarks.run import build_parser, main
from ttt_jax.cli import run_argparse_main

if __name__ == "__main__":
  run_argparse_main(main, build_parser)
