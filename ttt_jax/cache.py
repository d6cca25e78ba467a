"""Where the package keeps what it fetches or builds outside any repository or run."""

from __future__ import annotations

import os


def cache_dir() -> str:
  """Fetched models (interop/fetch.py) and built CPU kernels (layers/cpu_kernel.py):
  `$TTT_JAX_CACHE`, default ~/.cache/ttt_jax."""
  return os.path.expanduser(os.environ.get("TTT_JAX_CACHE", "~/.cache/ttt_jax"))
