"""Benchmarks (`make bench`): matmul ceiling, train step MFU, TTT dual vs primal, prefill and
decode latency vs context length, memory. Writes docs/benchmarks.md (+ JSON, PNGs)."""

from ttt_jax.benchmarks.run import main

if __name__ == "__main__":
  main()
