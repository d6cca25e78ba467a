"""Decode speed of an imported run beside llama.cpp on its GGUF file, side by side in one script
(ttt_jax/benchmarks/decode.py; llama.cpp from PyPI, benchmark-only). Example:
  python scripts/compare_decode.py --workdir runs/smollm2 --rounds 5 \\
      --variants "llama;ours-1t;ours;ours-1t,dtype=bfloat16"
"""

from ttt_jax.benchmarks.decode import build_parser, cli_main
from ttt_jax.cli import run_argparse_main

if __name__ == "__main__":
  run_argparse_main(cli_main, build_parser)
