"""The README's `make demo`: tiny model on the embedded corpus, end to end."""

from ttt_jax.cli import ArgumentParser, user_errors
from ttt_jax.demo import run_demo

if __name__ == "__main__":
  parser = ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/demo")
  with user_errors():
    run_demo(parser.parse_args().workdir)
