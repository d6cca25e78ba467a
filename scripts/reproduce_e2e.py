"""Loss vs context length of full attention, SWA, TTT-Linear, TTT-MLP and TTT-E2E trained on
the same tokens at equal size; writes docs/results/e2e_small.md (+ PNG, JSON)."""

from ttt_jax.benchmarks.reproduce import build_parser, main
from ttt_jax.cli import run_argparse_main

if __name__ == "__main__":
  run_argparse_main(main, build_parser)
