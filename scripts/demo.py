"""The README's `make demo`: tiny model on the embedded corpus, end to end."""

import argparse

from ttt_jax.demo import run_demo

if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/demo")
  run_demo(parser.parse_args().workdir)
