"""Process start-up: `jax.distributed.initialize` from the `mesh` config section, and JAX's
persistent compilation cache from `train.compilation_cache`.

Call `initialize(config)` before anything touches devices (the CLI does). On TPU pod slices,
SLURM and Open MPI jobs every argument is auto-detected; elsewhere set `mesh.coordinator_address`,
`mesh.num_processes`, `mesh.process_id` (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables).
"""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from ttt_jax.config import ConfigError

_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def init_kwargs(mesh_cfg: ml_collections.ConfigDict, environ=os.environ) -> dict:
  """Arguments for `jax.distributed.initialize`: config values, else environment variables;
  whatever is still unset is left to JAX's cluster auto-detection."""
  kwargs = {}
  for key, env in _ENV.items():
    value = mesh_cfg.get(key)
    if value in (None, "", -1) and environ.get(env):
      value = environ[env]
    if value in (None, "", -1):
      continue
    kwargs[key] = value if key == "coordinator_address" else int(value)
  return kwargs


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Joins the multi-process job when `mesh.distributed` is set. Returns True if it did."""
  if not config.mesh.distributed or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(**init_kwargs(config.mesh))
  return True


def enable_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
  """Points JAX's persistent compilation cache at `train.compilation_cache` ("" = off).

  A relaunched or resumed run (and a repeated evaluation) then loads its compiled programs
  instead of compiling them again; entries are keyed by the program, the devices and the
  compiler flags, so a changed config simply compiles anew. Returns the directory used.
  """
  path = config.train.compilation_cache
  if not path:
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as err:
    raise ConfigError(f"train.compilation_cache={config.train.compilation_cache!r}: cannot "
                      f"create the directory ({err.strerror}); set another path or '' to turn "
                      "the cache off") from err
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def is_main_process() -> bool:
  """Process 0 alone logs, writes metrics and other non-collective files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
