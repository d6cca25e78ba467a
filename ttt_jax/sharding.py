"""Logical axis names -> mesh PartitionSpecs and activation constraints (for layers and models);
the (data, fsdp, tensor) device mesh from the config and the shardings of parameters and batches.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`, ...) in their
`out_sharding` metadata. `logical_to_mesh` maps them through the rules (`config.LOGICAL_RULES`,
or `mesh.rules` in the config); a dimension that the mesh axes do not divide stays replicated,
so tiny models still run on big meshes.

Activations are constrained the same way: models call `constrain(x, ("batch", None, "embed"))`
at block boundaries. Inside `activation_sharding(mesh, rules)` (the trainer enters it while
tracing its steps) this becomes `jax.lax.with_sharding_constraint`; outside it is a no-op.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ttt_jax.config import LOGICAL_RULES, MESH_AXES, ConfigError, MeshAxes, Rules, parse_rules


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


def batch_axes(size: int) -> tuple[str, ...] | None:
  """The mesh axes the active mesh splits a batch of `size` sequences over, None if none: the
  `spmd_axis_name` of a `jax.vmap` over sequences, whose constraints inside (`constrain`, which
  names the per-sequence dimensions) then keep the sequences split as outside it, instead of
  gathering them to every device."""
  mesh, rules = _CONTEXT.mesh, _CONTEXT.rules
  if mesh is None:
    return None
  spec = logical_to_mesh(("batch",), (size,), mesh, rules)
  if not spec:
    return None
  axes = spec[0]
  return (axes,) if isinstance(axes, str) else tuple(axes)


def alike(name: str, *sizes: int) -> str | None:
  """`name` if the active mesh splits a dimension named `name` the same way at each of `sizes`
  (e.g. query and key/value heads, whose grouping must survive the split), else None (whole)."""
  mesh, rules = _CONTEXT.mesh, _CONTEXT.rules
  if mesh is None:
    return name
  return name if len({logical_to_mesh((name,), (n,), mesh, rules) for n in sizes}) == 1 else None


def per_shard(fn, in_logical: Sequence, out_logical):
  """`fn` run on each device's shard of the active mesh (`activation_sharding`): a kernel whose
  call carries no partitioning rule (the Pallas/Triton and splash kernels) and that is
  independent per batch row and head, which XLA alone would run unsplit, its inputs gathered.

  `in_logical` names the dimensions of each positional argument (one tuple of logical names
  for every leaf of that argument), `out_logical` those of the outputs (the same for every leaf,
  or a tuple of them matching the outputs). A dimension the rules do not shard, or whose mesh
  axes do not divide it, is whole on every device. Without a mesh (or on one device) `fn`
  itself. Gradients are those of `fn` on the whole arrays: the shards of an argument replicated
  over some mesh axes get their cotangents summed over those axes by `jax.shard_map`.
  """
  mesh, rules = _CONTEXT.mesh, _CONTEXT.rules
  if mesh is None or mesh.size == 1:
    return fn

  def specs(names, tree):
    return jax.tree.map(lambda x: logical_to_mesh(tuple(names), np.shape(x), mesh, rules), tree)

  def run(*args):
    in_specs = tuple(specs(names, a) for names, a in zip(in_logical, args, strict=True))
    out = jax.eval_shape(fn, *args)
    if out_logical and isinstance(out_logical[0], (tuple, list)):
      out_specs = tuple(specs(n, o) for n, o in zip(out_logical, out, strict=True))
    else:
      out_specs = specs(out_logical, out)
    # check_vma=False: Pallas calls carry no varying-axes types; the specs above say how the
    # outputs vary (over the batch and head axes only, like the inputs)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)

  return run


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

