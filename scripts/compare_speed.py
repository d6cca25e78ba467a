"""Old vs new code of the TTT layer and the train steps, timed side by side in one process
(ttt_jax/benchmarks/step_speed.py). Example:
  scripts/compare_speed.py --baseline HEAD~1 --targets layer:ttt_mlp,train:ttt_mlp
"""

from ttt_jax.benchmarks.step_speed import build_parser, main
from ttt_jax.cli import run_argparse_main

if __name__ == "__main__":
  run_argparse_main(main, build_parser)
