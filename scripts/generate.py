"""Continue a prompt with a trained run (prefill by streaming, then decode with carried state).

  python scripts/generate.py --workdir runs/swa --prompt "def main(" --max_new_tokens 200 \
      [--temperature 0.8 --top_k 40 --seed 0] [--step S]
"""

from __future__ import annotations

import argparse
import sys

from absl import logging as absl_logging

from ttt_jax.config import ConfigError
from ttt_jax.eval.generate import generate_text
from ttt_jax.eval.perplexity import load_run
from ttt_jax.train.checkpoint import CheckpointError


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--workdir", required=True, help="run directory (with checkpoints/)")
  ap.add_argument("--prompt", default="", help="text to continue (after BOS)")
  ap.add_argument("--max_new_tokens", type=int, default=200)
  ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  ap.add_argument("--top_k", type=int, default=0, help="sample from the k most likely (0 = all)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  args = ap.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only notices
  if args.max_new_tokens < 1:
    sys.exit(f"error: --max_new_tokens={args.max_new_tokens} must be >= 1")
  try:
    run = load_run(args.workdir, args.step)
  except (ConfigError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  text = generate_text(run, args.prompt, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, seed=args.seed)
  print(args.prompt + text)


if __name__ == "__main__":
  main()
