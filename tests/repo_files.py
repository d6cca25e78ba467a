"""The repository's files that are not in a package (scripts/, configs/) as modules."""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_file(relpath: str, name: str | None = None) -> ModuleType:
  """ROOT/`relpath` executed as a fresh module named `name` (by default from the path:
  'scripts/evaluate.py' -> 'scripts_evaluate'); each call loads it anew."""
  path = ROOT / relpath
  name = name or str(pathlib.PurePath(relpath).with_suffix("")).replace("/", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
