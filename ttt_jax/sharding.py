"""Logical axis names -> mesh PartitionSpecs, and activation constraints for layers and models.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) in their
`out_sharding` metadata. `logical_to_mesh` maps them through the rules (`config.LOGICAL_RULES`,
or `mesh.rules` in the config); a dimension that the mesh axes do not divide stays replicated,
so tiny models still run on big meshes.

Activations are constrained the same way: models call `constrain(x, ("batch", None, "embed"))`
at block boundaries. Inside `activation_sharding(mesh, rules)` (the trainer enters it while
tracing its steps) this becomes `jax.lax.with_sharding_constraint`; outside it is a no-op.
Building the mesh and the shardings of a train state is train/sharding.py's job.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttt_jax.config import LOGICAL_RULES, MeshAxes, Rules, parse_rules


def lazy_variable_sharding():
  """A context for building modules whose parameters carry sharding metadata: they are not
  placed on a mesh when created (the train step's jit applies the shardings), so a constructor
  needs no mesh in scope. Flax's global default is left as the caller set it.

  The package's layers do not need it: their initializers (layers/common.py) create every
  parameter unplaced already, so models and layers build anywhere without it. It serves
  parameters made with other initializers.
  """
  return nnx.use_eager_sharding(False)


def rules_from_config(config: ml_collections.ConfigDict) -> Rules:
  return parse_rules(config.mesh.get("rules", ""))


def mesh_axes_of(name: str, rules: Rules) -> MeshAxes:
  """The mesh axes the rules give logical axis `name` (None = replicated)."""
  for logical, mesh_axis in rules:
    if logical == name:
      return mesh_axis
  return None


def logical_to_mesh(logical: Sequence | PartitionSpec | None, shape: Sequence[int],
                    mesh: Mesh, rules: Rules = LOGICAL_RULES) -> PartitionSpec:
  """Mesh PartitionSpec for an array of `shape` with logical axis names `logical`.

  A mesh axis is used at most once per array (first dimension wins); axes of size 1 and axes
  that do not divide the dimension are dropped (that dimension is then replicated).
  """
  if not logical:
    return PartitionSpec()
  out, used = [], set()
  for name, dim in zip(logical, shape, strict=False):
    axis = mesh_axes_of(name, rules) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    # keep the longest prefix of axes whose product divides the dimension
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    if not axes:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Rules = LOGICAL_RULES


_CONTEXT = _Context()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = LOGICAL_RULES):
  """Within this context (entered while tracing), `constrain` pins activations to `mesh`."""
  prev = (_CONTEXT.mesh, _CONTEXT.rules)
  _CONTEXT.mesh, _CONTEXT.rules = mesh, rules
  try:
    yield
  finally:
    _CONTEXT.mesh, _CONTEXT.rules = prev


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` of `x` to its logical axes, or `x` unchanged without a mesh.

  `logical` names the leading dimensions of `x` (missing trailing names = replicated).
  """
  mesh = _CONTEXT.mesh
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_mesh(tuple(logical), x.shape, mesh, _CONTEXT.rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
