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
import functools
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


def _split_axes(name: str | None, dims: Sequence[int], mesh: Mesh, rules: Rules,
                used: set) -> tuple[str, ...]:
  """The mesh axes the rules give logical axis `name`, less those in `used` and those of size 1,
  cut to the longest prefix whose product divides every one of `dims`."""
  axis = mesh_axes_of(name, rules) if name is not None else None
  axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
  axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
  while axes and any(d % math.prod(mesh.shape[a] for a in axes) for d in dims):
    axes = axes[:-1]
  return axes


def _spec(per_dim: Sequence[tuple[str, ...]]) -> PartitionSpec:
  out = [None if not a else a[0] if len(a) == 1 else tuple(a) for a in per_dim]
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


def logical_to_mesh(logical: Sequence | PartitionSpec | None, shape: Sequence[int],
                    mesh: Mesh, rules: Rules = LOGICAL_RULES,
                    taken: Sequence[str] = ()) -> PartitionSpec:
  """Mesh PartitionSpec for an array of `shape` with logical axis names `logical`.

  A mesh axis is used at most once per array (first dimension wins; `taken` ones not at all);
  axes of size 1 and axes that do not divide the dimension are dropped (that dimension is then
  replicated).
  """
  if not logical:
    return PartitionSpec()
  out, used = [], set(taken)
  for name, dim in zip(logical, shape, strict=False):
    out.append(_split_axes(name, [dim], mesh, rules, used))
    used.update(out[-1])
  return _spec(out)


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: Rules = LOGICAL_RULES
  taken: tuple[str, ...] = ()  # mesh axes an enclosing `vmap_batch` splits its batch over


_CONTEXT = _Context()


def activation_sharding(mesh: Mesh | None, rules: Rules = LOGICAL_RULES):
  """Within this context (entered while tracing), `constrain` pins activations to `mesh`."""
  return sharding_context((mesh, rules, ()))


def current_sharding() -> tuple:
  """The active (mesh, rules, taken axes), for `sharding_context` to restore where code is
  traced after its context has closed: a `jax.custom_vjp`'s backward pass is traced when the
  gradient is taken, outside the loss function that entered `activation_sharding`."""
  return _CONTEXT.mesh, _CONTEXT.rules, _CONTEXT.taken


@contextlib.contextmanager
def sharding_context(state: tuple):
  """Within this context the activation sharding is `state` (`current_sharding()`'s)."""
  prev = current_sharding()
  _CONTEXT.mesh, _CONTEXT.rules, _CONTEXT.taken = state
  try:
    yield
  finally:
    _CONTEXT.mesh, _CONTEXT.rules, _CONTEXT.taken = prev


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` of `x` to its logical axes, or `x` unchanged without a mesh.

  `logical` names the leading dimensions of `x` (missing trailing names = replicated).
  """
  mesh = _CONTEXT.mesh
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_mesh(tuple(logical), x.shape, mesh, _CONTEXT.rules, _CONTEXT.taken)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def vmap_batch(fn, size: int, **kwargs):
  """`jax.vmap(fn, **kwargs)` over a batch of `size` sequences that stays split on the active
  mesh: the vmapped axis takes the batch's mesh axes (`spmd_axis_name`) and the constraints
  inside `fn`, which name one sequence's axes, leave those axes to it. (A plain vmap makes them
  say the batch axis is whole: each device would gather every sequence.)"""
  mesh = _CONTEXT.mesh
  axes = () if mesh is None else _split_axes("batch", [size], mesh, _CONTEXT.rules,
                                             set(_CONTEXT.taken))
  if not axes:
    return jax.vmap(fn, **kwargs)

  def inside(*args):
    mesh, rules, taken = current_sharding()
    with sharding_context((mesh, rules, taken + axes)):
      return fn(*args)

  return jax.vmap(inside, spmd_axis_name=axes, **kwargs)


def shared_split(named: Sequence[tuple[Sequence, object]], mesh: Mesh, rules: Rules = LOGICAL_RULES,
                 taken: Sequence[str] = ()) -> dict[str, tuple[str, ...]]:
  """{logical name: the mesh axes it is split over} for arrays (pytrees of them) each with the
  logical names of its dimensions, [(names, tree), ...]: one split per name for all of them,
  over the axes its rule gives less those an earlier name (or `taken`) took, cut to those that
  divide every dimension it labels."""
  dims: dict[str, list[int]] = {}  # every dimension each name labels, in order of appearance
  for names, tree in named:
    for x in jax.tree.leaves(tree):
      for name, d in zip(names, np.shape(x), strict=False):
        if name is not None:
          dims.setdefault(name, []).append(d)
  used, split = set(taken), {}
  for name, ds in dims.items():
    split[name] = _split_axes(name, ds, mesh, rules, used)
    used.update(split[name])
  return split


def per_shard(fn, in_logical: Sequence, out_logical):
  """`fn` run on each device's shard of the active mesh (`activation_sharding`): a kernel whose
  call carries no partitioning rule (the Pallas/Triton and splash kernels) and that is
  independent per batch row and head, which XLA alone would run unsplit, its inputs gathered.

  `in_logical` names the dimensions of each positional argument (one tuple of logical names
  for every leaf of that argument), `out_logical` those of the outputs (the same for every leaf,
  or a tuple of them matching the outputs). A logical name is split alike wherever it appears
  (e.g. query and key/value heads, whose grouping must survive): over the mesh axes its rule
  gives, less those an earlier name took, cut to those that divide every dimension it labels;
  a dimension left unsplit is whole on every device. Without a mesh (or on one device) `fn`
  itself. Gradients are those of `fn` on the whole arrays: the shards of an argument replicated
  over some mesh axes get their cotangents summed over those axes by `jax.shard_map`.
  """
  mesh, rules = _CONTEXT.mesh, _CONTEXT.rules
  if mesh is None or mesh.size == 1:
    return fn

  def run(*args):
    out = jax.eval_shape(fn, *args)
    each = bool(out_logical) and isinstance(out_logical[0], (tuple, list))
    outs = list(zip(out_logical, out, strict=True)) if each else [(out_logical, out)]
    named = list(zip(in_logical, args, strict=True)) + outs
    split = shared_split(named, mesh, rules, _CONTEXT.taken)

    def specs(names, tree):
      return jax.tree.map(lambda x: _spec([split.get(n, ()) if n else ()
                                           for n in names[:np.ndim(x)]]), tree)

    in_specs = tuple(specs(n, a) for n, a in named[:len(args)])
    out_specs = tuple(specs(n, o) for n, o in outs) if each else specs(*outs[0])

    def body(*local):
      with activation_sharding(None):  # per device: no mesh-wide constraint applies inside
        return fn(*local)

    # check_vma=False: Pallas calls carry no varying-axes types; the specs above say how the
    # outputs vary (over the batch and head axes only, like the inputs)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
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
  logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
  shapes = nnx.to_pure_dict(abstract_state)
  return jax.tree.map(
      lambda spec, x: NamedSharding(mesh, logical_to_mesh(tuple(spec), x.shape, mesh, rules)),
      logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
  """Batch dimension over the mesh axes of the logical `batch` axis (data x fsdp by default)."""
  axes = mesh_axes_of("batch", rules)
  return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def whole_on_each_device(shardings) -> bool:
  """True if no sharding in the tree `shardings` splits its array over devices."""
  return all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


# ----------------------------------------------------------------------------------------------
# Programs outside training (evaluation, generation, TLM): on the mesh their parameters lie on
# ----------------------------------------------------------------------------------------------


def mesh_of(tree) -> Mesh | None:
  """The mesh of more than one device that the arrays of `tree` lie on (a loaded run's
  parameters: `runs/load.py` places them over every device), or None: the first array placed by
  a NamedSharding decides. None too where the mesh spans devices of other processes (evaluation
  reads its results on the host, which this process could not do for their rows)."""
  for x in jax.tree.leaves(tree):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
      local = isinstance(s.mesh, jax.sharding.AbstractMesh) or s.is_fully_addressable
      return s.mesh if s.mesh.size > 1 and local else None
  return None


def batch_ways(tree, rules: Rules = LOGICAL_RULES) -> int:
  """Into how many shares the batch axes split a batch on the mesh `tree`'s arrays lie on (1 on
  none): batches of a multiple of it rows are split over every device."""
  mesh = mesh_of(tree)
  axes = () if mesh is None else _split_axes("batch", [], mesh, rules, set())
  return math.prod(mesh.shape[a] for a in axes) if axes else 1


def whole_shares(tree, rows: int, rules: Rules = LOGICAL_RULES) -> int:
  """`rows` rounded up to a multiple of `batch_ways(tree)`: a batch that splits over every
  device."""
  ways = batch_ways(tree, rules)
  return -(-rows // ways) * ways


def split_batch(shape: Sequence[int], mesh: Mesh, rules: Rules = LOGICAL_RULES,
                dim: int = 0) -> NamedSharding:
  """An array of `shape` with dimension `dim` split as the logical `batch` axis (whole where the
  batch's mesh axes do not divide it)."""
  return NamedSharding(mesh, logical_to_mesh((None,) * dim + ("batch",), shape, mesh, rules))


def grown_split(make, size: int, mesh: Mesh, rules: Rules = LOGICAL_RULES):
  """Shardings of the arrays `make(size)` returns: in each, the dimension that grows with `size`
  (found by shaping it at `size` and `size + 1`, so no layout is assumed) split as `batch`;
  arrays without one (positions, counters) replicated."""
  small, big = (jax.eval_shape(lambda n=n: make(n)) for n in (size, size + 1))

  def one(a, b):
    grown = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)) if m != n]
    return split_batch(a.shape, mesh, rules, grown[0]) if grown else replicated(mesh)

  return jax.tree.map(one, small, big)


def placed_as(tree, mesh: Mesh):
  """The shardings of `tree`'s arrays where they lie on `mesh`, None (XLA's choice) elsewhere:
  out_shardings that hand a carried state (a cache) back placed as it came in."""

  def one(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, NamedSharding) and s.mesh == mesh else None

  return jax.tree.map(one, tree)


class OnParamsMesh:
  """`jax.jit(fn, **jit_kwargs)` of `fn(params, *args)`, run over the mesh its parameters lie on.

  Evaluation, generation and TLM are not traced by the trainer; this gives them its mesh: `fn`
  is traced under `activation_sharding(mesh, rules)`, so the model's constraints split the batch
  over the devices and its kernels run per device (`per_shard`; splash attention lowers on a
  multi-device TPU only so); the arguments at positions `batch_args` (counted after `params`)
  are placed with their first dimension split as `batch`; `out_shardings(mesh, params, *args)`
  (with the placed arguments) places the outputs, e.g. a carried cache as it came in
  (`placed_as`), so that every call has the signature of the first and compiles nothing again
  (or `out_shardings` is jax.jit's own, given as it is). Parameters on one device (or on none):
  plain `jax.jit(fn)`. One jit per mesh and output placement, as the activation context is read
  while tracing, which jax.jit's cache does not see.
  """

  def __init__(self, fn, *, batch_args: Sequence[int] = (), out_shardings=None,
               rules: Rules = LOGICAL_RULES, **jit_kwargs):
    self.fn, self.batch_args, self.out_shardings = fn, tuple(batch_args), out_shardings
    self.rules, self.jit_kwargs, self._jits = rules, jit_kwargs, {}

  def prepare(self, params, *args):
    """(the jitted function for these arguments, the arguments to call it with, placed)."""
    mesh, out = mesh_of(params), self.out_shardings
    if mesh is None:
      key, traced = None, self.fn
      kwargs = self.jit_kwargs if out is None or callable(out) else dict(
          self.jit_kwargs, out_shardings=out)
    else:
      args = tuple(self._place(a, mesh) if i in self.batch_args else a
                   for i, a in enumerate(args))
      out = out(mesh, params, *args) if callable(out) else out
      leaves, treedef = jax.tree.flatten(out)
      key = (mesh, treedef, tuple(leaves))
      kwargs = self.jit_kwargs if out is None else dict(self.jit_kwargs, out_shardings=out)

      @functools.wraps(self.fn)  # the program keeps the function's name (profiles, dumps)
      def traced(*a):
        with activation_sharding(mesh, self.rules):
          return self.fn(*a)

    if key not in self._jits:
      self._jits[key] = jax.jit(traced, **kwargs)
    return self._jits[key], (params, *args)

  def _place(self, x, mesh: Mesh):
    if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
      return x
    return jax.device_put(x, split_batch(np.shape(x), mesh, self.rules))

  def __call__(self, params, *args):
    fn, args = self.prepare(params, *args)
    return fn(*args)

  def lower(self, params, *args):
    fn, args = self.prepare(params, *args)
    return fn.lower(*args)

  def _cache_size(self) -> int:
    """Programs compiled so far, over every mesh and placement (as `jax.jit`'s)."""
    return sum(f._cache_size() for f in self._jits.values())
