"""Document sources. The default, `embedded`, exists on every machine: the CPython standard
library's own source files (long real documents), without its test folders.

A document is `(name, text)`. Train/validation split is a deterministic hash of the name.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "lib2to3", "turtledemo", "idlelib"}
SPLITS = ("train", "validation")


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def embedded_files() -> list[str]:
  """Sorted relative paths of the CPython stdlib .py files (test folders excluded)."""
  root = stdlib_dir()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith("test"))
    for f in filenames:
      if f.endswith(".py"):
        out.append(os.path.relpath(os.path.join(dirpath, f), root))
  return sorted(out)


def split_of(name: str, val_fraction: float) -> str:
  """'train' or 'validation', a pure function of the document name."""
  h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
  return "validation" if (h / 2**64) < val_fraction else "train"


def embedded_documents(split: str, val_fraction: float = 0.05) -> Iterator[tuple[str, str]]:
  """Yields (relative path, text) of the embedded corpus for one split, in sorted order.

  Files that are not valid UTF-8 are decoded with replacement characters.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r} unknown; allowed: {', '.join(SPLITS)}")
  root = stdlib_dir()
  for rel in embedded_files():
    if split_of(rel, val_fraction) != split:
      continue
    with open(os.path.join(root, rel), "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    if text.strip():
      yield rel, text


def get_documents(source: str, split: str, val_fraction: float = 0.05):
  if source == "embedded":
    return embedded_documents(split, val_fraction)
  raise ValueError(f"data.source={source!r} unknown; allowed: embedded")
