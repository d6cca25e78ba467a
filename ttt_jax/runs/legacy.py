"""Checkpoints written by earlier versions: parameters since renamed, restored under today's names.

Orbax restores a tree only into a target of the same structure as the one on disk, so a restore
first asks which renamed parameters the checkpoint still holds under their former names
(`former_names`), writes the target with those names (`rename_keys`, also inside the optimizer
state, whose moments are trees of the parameters' names) and renames the restored arrays back.
"""

from __future__ import annotations

from typing import Any

import jax

# (the key of the holding module, former name) -> today's name
RENAMED_PARAMS = {
    ("mixer", "w0"): "w",  # TTT-Linear's initial inner weights W0 (named as its inner model's
    ("mixer", "b0"): "b",  # keys since, like TTT-MLP's w1/b1/w2/b2)
}

Renames = dict[tuple[str, str], str]  # (holding key, name) -> name to give it


def rename_keys(tree: Any, renames: Renames) -> Any:
  """`tree` with the key `name` of every dict held under the key `holder` renamed to
  `renames[(holder, name)]`, at any depth (through lists, tuples and pytree nodes too)."""
  if not renames:
    return tree

  def walk(node, holder=None):
    if isinstance(node, dict):
      return {renames.get((str(holder), str(k)), k): walk(v, k) for k, v in node.items()}
    return jax.tree.map(lambda x: walk(x) if isinstance(x, dict) else x, node,
                        is_leaf=lambda x: isinstance(x, dict))

  return walk(tree)


def _holder_and_name(path: str) -> tuple[str, str]:
  parts = path.split("/")
  return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def former_names(saved_names) -> Renames:
  """For the parameter names of a checkpoint ('blocks/0/mixer/w0', ...): the renames
  (holder, today's name) -> former name that give a target the names the checkpoint holds."""
  found = {}
  for path in saved_names:
    holder, name = _holder_and_name(path)
    if (holder, name) in RENAMED_PARAMS:
      found[(holder, RENAMED_PARAMS[(holder, name)])] = name
  return found


def undo(renames: Renames) -> Renames:
  """The renames that map names renamed by `renames` back."""
  return {(holder, old): new for (holder, new), old in renames.items()}


def current_shapes(saved: dict[str, tuple]) -> dict[str, tuple]:
  """Parameter shapes by name ('blocks/0/mixer/w0': shape, ...) under today's names."""
  out = {}
  for path, shape in saved.items():
    holder, name = _holder_and_name(path)
    new = RENAMED_PARAMS.get((holder, name))
    out[path if new is None else f"{path.rpartition('/')[0]}/{new}"] = shape
  return out
