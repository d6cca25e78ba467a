"""Device mesh ('data', 'fsdp', 'tensor') and logical-axis -> mesh-axis rules.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) in their
`out_sharding` metadata. `logical_to_mesh` maps them through `LOGICAL_RULES`; a dimension that the
mesh axis does not divide stays replicated (so tiny models still run on big meshes).
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttt_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
)


def resolve_mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh: fixed axes multiply to {known}, which does not divide the "
                        f"{num_devices} devices")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes)} but there are "
                      f"{num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _rule(name, rules):
  for logical, mesh_axis in rules:
    if logical == name:
      return mesh_axis
  return None


def logical_to_mesh(logical: tuple | PartitionSpec | None, shape: tuple[int, ...], mesh: Mesh,
                    rules=LOGICAL_RULES) -> PartitionSpec:
  """Mesh PartitionSpec for an array of `shape` with logical axis names `logical`."""
  if not logical:
    return PartitionSpec()
  out, used = [], set()
  for name, dim in zip(logical, shape, strict=False):
    axis = _rule(name, rules) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES):
  """Pure-dict tree of NamedShardings for an (abstract) nnx.State of parameters."""
  logical = nnx.get_partition_spec(abstract_state).to_pure_dict()
  shapes = abstract_state.to_pure_dict()
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dimension over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
