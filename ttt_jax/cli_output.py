"""Where the reading scripts (evaluate.py, read.py, needle.py, adapt.py) write, checked before
any work: a run's results go to `<workdir>/eval` (adapters to `<workdir>/adapters`), or with
`--out DIR` to DIR (one run) or `DIR/<run name>` (several, with --compare), so a run that is
read-only (a shared or archived workdir) can still be evaluated. A folder that cannot be written
fails in one line naming it and --out before a checkpoint is read; nothing is created by the
check.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from ttt_jax.config import ConfigError


class OutputError(ConfigError):
  """An output folder that cannot be written (one line: the folder, why, the way out)."""


def results_dirs(workdirs: Sequence[str], out: str | None, sub: str = "eval") -> list[str]:
  """Each run's results folder: `<workdir>/<sub>`, or with `out`: `out` itself for one run,
  `out/<run name>` for several (names made unique with -2, -3, ...)."""
  if out is None:
    return [os.path.join(w, sub) for w in workdirs]
  if len(workdirs) == 1:
    return [out]
  dirs, seen = [], set()
  for w in workdirs:
    name = os.path.basename(os.path.normpath(w)) or "run"
    unique, k = name, 1
    while unique in seen:
      k += 1
      unique = f"{name}-{k}"
    seen.add(unique)
    dirs.append(os.path.join(out, unique))
  return dirs


def unwritable(directory: str) -> str | None:
  """Why `directory` cannot be written (made where missing), or None if it can. Probes its
  nearest existing folder with a temporary file that is removed at once."""
  here = os.path.abspath(directory)
  while not os.path.exists(here):
    here = os.path.dirname(here)
  if not os.path.isdir(here):
    return f"{here} is not a folder"
  try:
    with tempfile.TemporaryFile(dir=here):
      pass
  except OSError as e:
    return f"{e.strerror or type(e).__name__} in {here}"
  return None


def check_writable(directories: Sequence[str], out: str | None) -> None:
  """Raises OutputError naming the first folder of `directories` that cannot be written:
  the way out is --out DIR (or another --out, when it was given)."""
  for directory in directories:
    why = unwritable(directory)
    if why is None:
      continue
    if out is not None:
      raise OutputError(f"--out {out}: cannot write {directory} ({why}); choose a writable "
                        "folder")
    raise OutputError(f"cannot write the results to {directory} ({why}); pass --out DIR to "
                      "write them to a writable folder (the run itself is only read)")
