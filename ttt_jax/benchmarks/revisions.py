"""Modules of another git revision in the running process, for side-by-side timing.

Timings on a shared machine drift by tens of percent between runs, so an old-vs-new speed
comparison is only trustworthy when both programs run in ONE process, alternating. `swapped(rev,
modules)` makes that possible: inside the `with` block the named package modules are replaced by
their source at `rev` (read with `git show`, executed as fresh module objects), and every name
other loaded package modules imported from them (`from ttt_jax.layers.ttt import TTTMixer`
binds the class in `ttt_jax.models.lm`) points at the old object. Models built and programs
traced inside the block therefore use the old code; compiled executables keep it after the block
exits, when everything is restored.

Modules are loaded in the given order, each seeing the earlier ones already swapped in, so list
dependencies first (ttt_inner before ttt). Models build their TTT layers through the registry
(layers/ttt_variants.py binds TTTMixer and the inner models' steps): list
ttt_jax.layers.ttt_variants after them so the registrations use the old code too; the
registries are restored on exit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import types
from collections.abc import Iterator

from ttt_jax.config import ConfigError
from ttt_jax.layers import mixers

PACKAGE = "ttt_jax"


def check_revision(rev: str, repo: str = ".") -> None:
  """ConfigError naming --baseline unless `rev` is a commit of the repository."""
  found = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet",
                          f"{rev}^{{commit}}"], capture_output=True, text=True)
  if found.returncode != 0:
    raise ConfigError(f"--baseline {rev}: no such git revision in {os.path.abspath(repo)} "
                      "(a commit, branch or tag, e.g. HEAD~1)")


def source_at(rev: str, module: str, repo: str = ".") -> str:
  """The source of package module `module` (dotted name) at git revision `rev` (ConfigError
  naming both when it is not there)."""
  check_revision(rev, repo)
  path = module.replace(".", "/") + ".py"
  shown = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True,
                         text=True)
  if shown.returncode != 0:
    raise ConfigError(f"--baseline {rev}: {path} does not exist at that revision (too old to "
                      "compare with this code)")
  return shown.stdout


def _rebind(old_to_new: dict[int, object]) -> list[tuple[object, str, object]]:
  """Points every loaded package module's attribute that is one of the replaced objects at its
  replacement; returns (module, name, previous value) to undo it."""
  undo = []
  for name, mod in list(sys.modules.items()):
    if not (name == PACKAGE or name.startswith(PACKAGE + ".")) or mod is None:
      continue
    for attr, value in list(vars(mod).items()):
      new = old_to_new.get(id(value))
      if new is not None and new is not value:
        undo.append((mod, attr, value))
        setattr(mod, attr, new)
  return undo


@contextlib.contextmanager
def swapped(rev: str, modules: list[str], repo: str = ".") -> Iterator[dict[str, object]]:
  """Within the block, package modules `modules` run their code at git revision `rev`.

  Yields {module name: the old module object}. Restores every binding on exit.
  """
  undo: list[tuple[object, str, object]] = []
  loaded: dict[str, object] = {}
  registries = [(live, dict(live)) for live in (mixers.MIXERS, mixers.INNER_MODELS)]
  try:
    for name in modules:
      current = importlib.import_module(name)
      old = types.ModuleType(name)
      old.__file__ = f"{rev}:{name.replace('.', '/')}.py"
      old.__package__ = name.rpartition(".")[0]
      exec(compile(source_at(rev, name, repo), old.__file__, "exec"), old.__dict__)  # noqa: S102
      mapping = {id(current): old}
      for attr, value in vars(current).items():
        if attr in vars(old) and getattr(value, "__module__", None) == name:
          mapping[id(value)] = vars(old)[attr]
      undo.extend(_rebind(mapping))
      undo.append((sys.modules, name, current))
      sys.modules[name] = old
      loaded[name] = old
    yield loaded
  finally:
    for target, attr, value in reversed(undo):
      if target is sys.modules:
        sys.modules[attr] = value
      else:
        setattr(target, attr, value)
    for live, saved in registries:  # swapped modules that register (layers/ttt_variants.py)
      live.clear()
      live.update(saved)
