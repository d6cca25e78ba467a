"""Device mesh ('data', 'fsdp', 'tensor') from the config, and the shardings of a train state.

The logical-axis rules live in config.py (`LOGICAL_RULES`, `mesh.rules`); ttt_jax/sharding.py
maps logical names to PartitionSpecs and constrains activations inside models.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttt_jax.config import LOGICAL_RULES, MESH_AXES, ConfigError, Rules
from ttt_jax.sharding import logical_to_mesh, mesh_axes_of

# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------


def resolve_mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor) sizes; one of them may be -1 = all remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh: the fixed axes multiply to {known}, which does not divide the "
                        f"{num_devices} devices")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh.data*mesh.fsdp*mesh.tensor = {math.prod(sizes)} but there are "
                      f"{num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

  With the default devices, `jax.make_mesh` orders them so that the inner axes (tensor, then
  fsdp) stay within fast interconnect domains (a host / ICI slice); given devices are used in
  the order given.
  """
  if devices is None:
    shape = resolve_mesh_shape(mesh_cfg, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shape = resolve_mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Shardings of parameters and batches
# ----------------------------------------------------------------------------------------------


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """Pure-dict tree of NamedShardings for an (abstract) nnx.State of parameters."""
  logical = nnx.get_partition_spec(abstract_state).to_pure_dict()
  shapes = abstract_state.to_pure_dict()
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
  """Batch dimension over the mesh axes of the logical `batch` axis (data x fsdp by default)."""
  axes = mesh_axes_of("batch", rules)
  return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())

